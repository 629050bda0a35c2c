"""Process memory: handing freed memory back to the OS, and the resident size.

glibc's malloc keeps memory freed by large temporaries inside its heap, where live tensors
allocated later pin it; `release_freed_memory` returns it to the OS.
"""

from __future__ import annotations

import ctypes
import os


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc keeps it otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _proc_field(path: str, key: str) -> int:
    """A 'Key:  123 kB' line of a /proc file, in bytes (0 when unknown)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    """Resident memory of this process (0 when unknown)."""
    return _proc_field("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (VmHWM; 0 when unknown)."""
    return _proc_field("/proc/self/status", "VmHWM")


def available_bytes() -> int:
    """Memory the OS can give now without swapping (MemAvailable; total RAM when unknown)."""
    return _proc_field("/proc/meminfo", "MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_memory(device) -> int:
    """Memory that can be allocated now on `device` (a torch.device or its name): MemAvailable on
    the CPU, the free memory of that GPU on CUDA."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()
