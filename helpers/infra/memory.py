"""Hand freed heap memory back to the operating system, so that resident memory follows the live tensors.

glibc keeps the pages of freed blocks inside its heap for reuse. A loop that
frees and re-allocates activations of many sizes (slicing, layer after layer)
then grows its resident set long after the tensors are gone; `malloc_trim`
returns those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform


@functools.cache
def _trim():
    """glibc's malloc_trim, or None on other C libraries and systems."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc's malloc_trim); False where there is no such call."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
