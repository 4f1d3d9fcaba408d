"""glibc's allocator in a long-running worker.

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what is freed in
it for that thread. A worker has several such threads (its store thread, the interest refresher,
LanceDB's and torch's pools); their freed transients (a shard read, a count of 100k users' recent
items) stayed resident in separate arenas. Fewer arenas make them reuse each other's freed memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def limit_arenas(arenas: int) -> bool:
    """Allow at most ``arenas`` malloc arenas from now on (0: leave glibc's default); True if applied
    (False off glibc, e.g. musl or macOS, where there is nothing to set)."""
    if arenas <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
