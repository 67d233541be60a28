"""Process memory: the peak a measurement reached, and freed heap memory handed back to the operating system.

Peak memory is CUDA's max allocated on a GPU and the peak resident set size
(VmHWM) on a CPU; `reset_peak_memory` starts a new measurement.

glibc keeps the pages of freed blocks inside its heap for reuse. A loop that
frees and re-allocates activations of many sizes (slicing, layer after layer)
then grows its resident set long after the tensors are gone; `malloc_trim`
returns those pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import re
import resource
from pathlib import Path

import torch


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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 2**20  # bytes: every block from 1 MiB up gets pages of its own, handed back when freed


def return_large_blocks() -> bool:
    """Give every block of 1 MiB or more its own pages, returned to the system when it is freed (glibc).

    By default glibc raises this threshold each time such a block is freed (up to
    32 MiB), after which tensors of a layer's size land in the heap and stay
    resident after they are freed: the peak of a layer-by-layer loop then drifts
    by tens of MB from run to run. A fixed threshold keeps it at what is live.
    """
    if _trim() is None:
        return False
    return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement: CUDA's counter, or the process's peak RSS on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # off Linux the peak counts from the start of the process
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB since the last reset: max allocated on CUDA, peak RSS of the process on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS
