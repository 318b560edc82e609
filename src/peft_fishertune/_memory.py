"""Give freed host memory back to the operating system.

glibc keeps freed heap pages of a long-lived process mapped (its mmap threshold grows to 32 MiB once large
blocks are freed, so weight-sized tensors come from the heap): after stage 2 frees its accumulators, the
process would go on holding them as resident memory. `release_freed_memory()` runs the garbage collector and
then `malloc_trim(0)`, which returns free heap pages to the kernel. It is a no-op where glibc is not the
allocator (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import gc
import sys

_TRIM = None


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                _TRIM = False
    return _TRIM


def release_freed_memory() -> bool:
    """gc.collect(), then glibc's malloc_trim(0) where available; True when the trim ran."""
    gc.collect()
    trim = _malloc_trim()
    if not trim:
        return False
    trim(0)
    return True
