"""Give freed heap memory back to the operating system (glibc's malloc_trim), between passes.

Measured with 1000 clients (2,228 MiniLM adapters) in one process: training grew the resident
size by 885 MiB for 163 MiB of trained adapters, because glibc keeps freed activation buffers of
varying sizes in a fragmented heap. Trimming after every training pass brought that to 255 MiB.
A fixed mmap threshold (MALLOC_MMAP_THRESHOLD_) did as well for memory but slowed training by
23-45% (fresh pages every step); a trim costs milliseconds per pass. No-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when glibc did it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
