"""The host process's C allocator, set up for XLA:CPU (Linux with glibc; elsewhere nothing changes).

XLA:CPU allocates each call's temporaries as one block (the `toy` train step's: 146 MB), with `posix_memalign` on one
of its worker threads. glibc serves a block that large with a fresh `mmap` (a worker thread's arena grows to 64 MB at
most, and blocks over 32 MB are mapped rather than pooled) and unmaps it when it is freed, so every call faults its
temporaries in again, page by page: 37,000 page faults and ~27% of the `toy` train step spent in the kernel, where
PyTorch, which allocates on its own thread in smaller blocks, faults almost never (`benchmarks/RESULTS.md`).
`keep_freed_memory` makes every thread allocate from the main heap and keeps what is freed there for the next call
(`mallopt`: one arena, no mapped blocks, no trimming). The cost: the process keeps its peak memory until it exits.

It must run before a second thread first allocates (glibc fixes its number of arenas then, and importing jax starts
a thread), so `jaxstages/__init__.py` calls it when the package is imported: import jaxstages before jax. Set
`JAXSTAGES_MALLOC=system` in the environment to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory() -> bool:
  """Sets glibc's allocator as the module docstring says; returns whether it did (False: not glibc, or
  `JAXSTAGES_MALLOC=system`)."""
  if os.environ.get("JAXSTAGES_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None)  # the C library this process runs on
  if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt is not glibc's
    return False
  return all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)
