"""controlSocketInUse: the kernel's table of unix sockets tells a held socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xenmig.devices.vtpm.source import controlSocketInUse


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    # A name with a space and a prefix of another socket's name, as a host may have.
    path = str(tmp_path / "ctrl sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path + "2")
    other.listen(1)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    yield path, server
    server.close()
    other.close()


@contextmanager
def accepted(path: str, server: socket.socket) -> Iterator[None]:
    """A connection to ``path`` that ``server`` accepted, open while inside."""
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    peer, _ = server.accept()
    try:
        yield
    finally:
        peer.close()
        client.close()


def test_freeSocketIsNotInUse(listening: tuple[str, socket.socket]) -> None:
    path, _ = listening
    held = socket.socket(socket.AF_UNIX)
    held.connect(path + "2")  # another socket's connection does not count
    try:
        assert controlSocketInUse(path) is False
    finally:
        held.close()


def test_acceptedConnectionIsInUse(listening: tuple[str, socket.socket]) -> None:
    path, server = listening
    with accepted(path, server):
        assert controlSocketInUse(path) is True
    assert controlSocketInUse(path) is False


def test_undecodableNameIsFound(tmp_path: Path) -> None:
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/ctrl-\xff")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    try:
        with accepted(path, server):
            assert controlSocketInUse(path) is True
    finally:
        server.close()
