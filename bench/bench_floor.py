"""
What a copy of dense data over mutual TLS must cost at least on this machine,
per GiB of CPU on each side, against the goals of issue 16.

Each step alone, timed by the CPU of the thread that does it, with no Python
loop of xenmig's around it:

- read: the source file into a 1 MiB buffer (``preadv``);
- blake3: the digest of 1 GiB (what each side computes);
- AES-256-GCM: the cipher the two sides negotiate, in 16 KiB records (TLS's),
  through ``cryptography``'s OpenSSL (the one the daemon's TLS runs on);
- loopback TCP: 1 GiB sent in 1 MiB writes, received with ``recv_into``;
- write: 1 GiB into ``--dir``, then fsync.

The sender must at least read, hash, encrypt and send; the receiver receive,
decrypt, hash and write.  The sums are the floor that framing, Python and the
event loop then add to; the goals are printed as shares of it.

::

    python bench/bench_floor.py [--runs 2] [--dir /dev/shm/...] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
from benchlib import DENSE_CACHE, MiB, sourceFile
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

GiB = 1024 * MiB
RECORD = 16 * 1024
#: Issue 16: CPU seconds per GiB, with digests and fsync kept.
GOALS = {"sender": 0.75, "receiver": 0.9}


def cpuOf(step: Callable[[], None]) -> float:
    """The CPU seconds ``step`` takes in this thread."""
    started = time.thread_time()
    step()
    return time.thread_time() - started


def read(path: Path) -> float:
    buffer = memoryview(bytearray(MiB))
    fd = os.open(path, os.O_RDONLY)

    def step() -> None:
        offset = 0
        while offset < GiB:
            offset += os.preadv(fd, [buffer], offset)

    try:
        return cpuOf(step)
    finally:
        os.close(fd)


def digest() -> float:
    block = os.urandom(MiB)

    def step() -> None:
        hasher = blake3.blake3()
        for _ in range(GiB // MiB):
            hasher.update(block)

    return cpuOf(step)


def cipher() -> tuple[float, float]:
    aead, nonce, record = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(RECORD)
    sealed = aead.encrypt(nonce, record, None)
    count = GiB // RECORD

    def seal() -> None:
        for _ in range(count):
            aead.encrypt(nonce, record, None)

    def open_() -> None:
        for _ in range(count):
            aead.decrypt(nonce, sealed, None)

    return cpuOf(seal), cpuOf(open_)


def loopback() -> tuple[float, float]:
    """Each side's CPU for 1 GiB over a loopback TCP connection."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[float] = []

    def receive() -> None:
        connection, _ = server.accept()
        buffer = memoryview(bytearray(MiB))

        def step() -> None:
            got = 0
            while got < GiB:
                count = connection.recv_into(buffer)
                if not count:
                    raise SystemExit("bench: the loopback copy ended early")
                got += count

        received.append(cpuOf(step))
        connection.close()

    receiver = threading.Thread(target=receive)
    receiver.start()
    block = os.urandom(MiB)
    with socket.create_connection(server.getsockname()) as sender:

        def send() -> None:
            for _ in range(GiB // MiB):
                sender.sendall(block)

        sent = cpuOf(send)
    receiver.join()
    server.close()
    return sent, received[0]


def write(directory: Path) -> float:
    block = os.urandom(MiB)
    path = directory / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def step() -> None:
        for _ in range(GiB // MiB):
            os.write(fd, block)
        os.fsync(fd)

    try:
        return cpuOf(step)
    finally:
        os.close(fd)
        path.unlink()


def measure(source: Path, directory: Path) -> dict[str, float]:
    encrypt, decrypt = cipher()
    send, receive = loopback()
    return {
        "read": read(source),
        "blake3": digest(),
        "encrypt": encrypt,
        "decrypt": decrypt,
        "send": send,
        "receive": receive,
        "write": write(directory),
    }


SIDES = {
    "sender": ("read", "blake3", "encrypt", "send"),
    "receiver": ("receive", "decrypt", "blake3", "write"),
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the write goes")
    parser.add_argument("--cache", default=DENSE_CACHE, help="the source file")
    args = parser.parse_args(argv)
    source = sourceFile(Path(args.cache), GiB)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="xm-floor-", dir="/dev/shm"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        runs = [measure(source, directory) for _ in range(args.runs)]
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(
        f"CPU seconds per GiB, each step alone (median of {args.runs}; "
        f"writes into {args.dir or '/dev/shm'}):"
    )
    steps = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for key, value in steps.items():
        print(f"  {key:>8}: {value:6.3f}")
    for side, keys in SIDES.items():
        floor = sum(steps[key] for key in keys)
        goal = GOALS[side]
        print(
            f"{side} floor ({' + '.join(keys)}): {floor:.3f} s per GiB; "
            f"the goal of {goal} s is {goal / floor:.0%} of it"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
