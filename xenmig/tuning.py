"""Process-wide tuning that xenmig's entry points apply (and only they)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys

from twisted.logger import Logger

log = Logger()

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tuneAllocator(
    mmapThreshold: int = 32 * 1024 * 1024, trimThreshold: int = 128 * 1024 * 1024
) -> bool:
    """
    Tune both allocators for the data path: megabyte-sized buffers (records,
    file chunks, TLS output) stay on the heap, and what is already imported
    leaves the garbage collector's sight.

    glibc serves allocations above 128 KiB with a fresh ``mmap`` and unmaps them
    when freed, so every 1 MiB record costs hundreds of page faults: measured
    here, that was 40% of the sending process's CPU.  Raising the thresholds makes
    the allocator reuse freed buffers; memory stays bounded by the peak in use.
    Returns False where the C library is not glibc.

    Also moves every object alive so far (the modules imported: an entry point
    calls this once they are) out of the garbage collector's sight: a full
    collection no longer walks them, which it otherwise did every few thousand
    allocations of the data path (3-4 % of the sender's CPU per GiB).
    """
    gc.freeze()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmapThreshold)
        and mallopt(_M_TRIM_THRESHOLD, trimThreshold)
    )


def raiseOpenFiles(wanted: int) -> int:
    """
    Raise this process's soft limit of open files towards ``wanted`` (never
    above the hard limit, never lower than it is); the soft limit then.  The
    reactor polls with epoll, so many descriptors cost nothing until used,
    while the usual soft limit (1,024) is less than the daemon's default
    connection limits hold.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            log.failure("could not raise the limit of open files to {n}", n=target)
    return soft
