"""Small blocking file-system primitives: fsync, atomic writes, free space, holes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil

from twisted.python.filepath import FilePath

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_ZEROS = bytes(1024 * 1024)


def punchHole(fd: int, offset: int, length: int) -> None:
    """Blocking: make ``length`` bytes at ``offset`` read as zeros, sparsely."""
    result = _libc.fallocate(
        fd,
        _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    if result == 0:
        return
    if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    end = offset + length
    while offset < end:
        offset += os.pwrite(
            fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - offset)], offset
        )


_SYNC_FILE_RANGE_WRITE = 2
#: Ask for writeback after this many bytes were written.
WRITEBACK_STEP = 32 * 1024 * 1024
_syncFileRange = getattr(_libc, "sync_file_range", None)


def startWriteback(fd: int, offset: int, length: int) -> None:
    """
    Blocking but brief: ask the kernel to start writing this range to disk now,
    so that the fsync at the end has little left to do (it runs in the paused
    window).  Where the call is missing or fails, the fsync does it all.
    """
    if _syncFileRange is not None:
        _syncFileRange(
            fd,
            ctypes.c_longlong(offset),
            ctypes.c_longlong(length),
            ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
        )


def fsyncDirectory(path: str) -> None:
    """Blocking: make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeAtomically(path: FilePath, data: bytes) -> None:
    """Blocking: replace ``path`` with ``data`` durably (write, fsync, rename)."""
    temporary = path.siblingExtension(".tmp")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:  # a short write (a disk filling up) is not the end
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary.path, path.path)
    except OSError:
        _unlinkQuietly(temporary.path)  # a full disk keeps no half-written file
        raise
    fsyncDirectory(path.dirname())


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def removeTree(path: str) -> None:
    """Blocking: remove a file or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def freeBytes(path: str) -> int:
    """Blocking: bytes available to unprivileged writers on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
