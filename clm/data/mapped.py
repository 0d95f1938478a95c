"""Bounded memory over memory-mapped Arrow files, and a heap trimmed between stages.

``datasets`` reads its Arrow caches through memory maps. Every page a pass touches stays resident, and counted in
the process's RSS, for as long as the file is mapped, so a pass over a whole corpus (tokenizing it, gathering a
split's rows to pack them) would hold the whole file in RSS. ``release_mapped`` drops those pages after each
chunk: they are clean, read-only file pages, so a later read faults them back in from the page cache and nothing
but RSS changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Iterable

MADV_DONTNEED = 4
_libc: Any = None


def _c_library() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


def cache_paths(ds: Any) -> list[str]:
    """The Arrow files a ``datasets.Dataset`` is memory-mapped from (none for an in-memory one)."""
    return [f["filename"] for f in getattr(ds, "cache_files", None) or []]


def release_mapped(paths: Iterable[str]) -> None:
    """Drop this process's resident pages of the read-only memory maps of ``paths`` (Linux; elsewhere a no-op).
    Only mappings without write permission are touched, so no data can be lost."""
    wanted = {os.path.realpath(p) for p in paths}
    if not wanted or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
        libc = _c_library()
    except OSError:
        return
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "w" in parts[1] or parts[5] not in wanted:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(start, end - start, MADV_DONTNEED)


def trim_heap() -> None:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; Arrow's pool releases its
    unused memory too). The tokenizer's threads allocate and free tens of MB of per-token objects per batch;
    the allocator keeps a high-water mark of them that grows over a long pass, and the next stage would stack
    on top of it. Linux; else a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        _c_library().malloc_trim(0)
    except (OSError, AttributeError):  # a C library without malloc_trim (musl)
        return
