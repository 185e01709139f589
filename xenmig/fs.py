"""Small blocking file-system primitives: fsync, atomic writes, free space, holes."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import os
import pwd
import shutil
from dataclasses import dataclass

from twisted.python.filepath import FilePath

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# The process's own symbols, libc's among them: ctypes.util.find_library would
# run ldconfig (tens of milliseconds at every start).
_libc = ctypes.CDLL(None, use_errno=True)
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


#: What direct I/O asks of a write's offset, length and memory here (a page:
#: at least any logical block size).
DIRECT_ALIGN = 4096


def openDirect(path: str) -> int | None:
    """
    Blocking: ``path`` opened again for writing with ``O_DIRECT`` (writes that
    go to the disk without a copy into the page cache), or None where the
    filesystem does not offer it.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def directlyWritable(data: bytes | memoryview, offset: int) -> bool:
    """
    Whether ``data`` may be written at ``offset`` with direct I/O: offset,
    length and memory aligned to L{DIRECT_ALIGN} (only a writable buffer's
    address can be asked here: read-only ones are written through the cache).
    """
    if offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not data:
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return address % DIRECT_ALIGN == 0


def fsyncDirectory(path: str) -> None:
    """Blocking: make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeAtomically(path: FilePath, data: bytes, syncDirectory: bool = True) -> None:
    """
    Blocking: replace ``path`` with ``data`` durably (write, fsync, rename,
    fsync the directory).  ``syncDirectory=False`` leaves that last fsync to
    a caller that makes several files in the directory and fsyncs it once.
    """
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
        unlinkQuietly(temporary.path)  # a full disk keeps no half-written file
        raise
    if syncDirectory:
        fsyncDirectory(path.dirname())


def unlinkQuietly(path: str) -> None:
    """Blocking: remove the file ``path`` if it can be, and say nothing if not."""
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


#: fcntl's F_SETLEASE (Linux): a write lease is refused while anyone has the file open.
_F_SETLEASE = 1024


def holdersOf(path: str, directory: int | None = None) -> list[tuple[str, int]]:
    """
    Blocking: the processes (name, pid) other than this one that have ``path``
    open (relative to the directory descriptor ``directory``, if given).

    A write lease (``F_SETLEASE``) answers cheaply whether anyone has it open;
    only then, or where leases are not to be had, ``/proc/*/fd`` names them.
    An absent ``path`` has none.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, dir_fd=directory)
    except FileNotFoundError:
        return []
    held = False
    try:
        st = os.fstat(fd)
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            held = e.errno == errno.EAGAIN  # else no lease here: look anyway
        else:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
            return []
    finally:
        os.close(fd)
    found = _processesWith(st.st_dev, st.st_ino)
    if held and not found:
        return [("a process this host cannot name", 0)]
    return found


def _processesWith(device: int, inode: int) -> list[tuple[str, int]]:
    """The processes other than this one with a descriptor on that file."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                st = os.stat(f"/proc/{entry}/fd/{fd}")
                if (st.st_dev, st.st_ino) == (device, inode):
                    with open(f"/proc/{entry}/comm") as comm:
                        found.append((comm.read().strip(), int(entry)))
                    break
        except OSError:
            continue  # gone, or not ours to look at
    return found


def describeHolders(holders: list[tuple[str, int]]) -> str:
    """``qemu-system-x86 (pid 42), ...`` for a message."""
    return ", ".join(f"{name} (pid {pid})" if pid else name for name, pid in holders)


#: The mode of an installed file when nobody says otherwise (and of staged files).
DEFAULT_MODE = 0o600


@dataclass(frozen=True)
class InstallAs:
    """Who owns an installed file, and its mode; None: left as it is."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    def over(self, other: InstallAs) -> InstallAs:
        """These attributes, each one not given taken from ``other``."""
        return InstallAs(
            other.uid if self.uid is None else self.uid,
            other.gid if self.gid is None else self.gid,
            other.mode if self.mode is None else self.mode,
        )

    def apply(self, fd: int) -> None:
        """Blocking: give the open file ``fd`` this owner, group and mode."""
        if self.uid is not None or self.gid is not None:
            os.fchown(fd, -1 if self.uid is None else self.uid,
                      -1 if self.gid is None else self.gid)  # fmt: skip
        if self.mode is not None:
            os.fchmod(fd, self.mode)


def parseMode(text: str) -> int:
    """
    A permission mode in octal (``0640``): read, write and execute bits only.

    @raise ValueError: saying what is wrong.
    """
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode such as 0640")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r}: a mode has permission bits only (0 to 0777)")
    return mode


def checkOwner(text: str) -> tuple[str, str]:
    """
    ``USER[:GROUP]`` split (either may be a name or a number, either may be
    empty, not both).

    @raise ValueError: saying what is wrong.
    """
    user, _, group = text.partition(":")
    if not (user or group) or ":" in group:
        raise ValueError(f"{text!r} is not USER, USER:GROUP or :GROUP")
    return user, group


def parseOwner(text: str) -> InstallAs:
    """
    ``USER[:GROUP]`` resolved on this host to numbers (blocking: it may ask
    NSS).

    @raise ValueError: naming the user or group that does not exist here.
    """
    user, group = checkOwner(text)
    uid = gid = None
    if user:
        try:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ValueError(f"no user {user!r} on this host")
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no group {group!r} on this host")
    return InstallAs(uid, gid)
