"""Process memory behaviour that matters for a layer that allocates tens of MB per call.

glibc returns large freed blocks to the OS (munmap) and the next allocation of the same size
page-faults again: on the development VM a fresh 34 MB buffer costs 8 ms to touch versus 1 ms
when reused, which doubled a decode-size MoE backward. :func:`keep_freed_memory` raises glibc's
mmap and trim thresholds so freed blocks stay in the heap and are reused (RSS then settles at the
working set's peak instead of breathing). Applied once, on the first MoE call; set
``KT_JIT_MALLOC_TUNE=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import functools
import sys

from . import knobs

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tune glibc malloc (once per process); returns whether it was applied."""
    if not knobs.malloc_tune() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # glibc 2.36 accepts 1 GiB; older ones cap the threshold at 32 MiB (and return 0 above it)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(ok)
