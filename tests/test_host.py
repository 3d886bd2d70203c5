"""The host allocator set-up (`jaxstages/host.py`, applied when jaxstages is imported): in a fresh process that
imports jaxstages first, as the `jaxstages` command does, a block larger than glibc pools by default (over 32 MB,
and over a worker thread's 64 MB arena), allocated and freed over and over on a thread other than the main one, as
XLA:CPU's workers allocate each call's temporaries, is reused: its pages are faulted in once, not on every
allocation (glibc's default maps it afresh every time: 5 blocks' worth here). A fresh process, because glibc fixes
its number of arenas when a second thread first allocates, and a pytest worker may have started threads before."""

import subprocess
import sys

from jaxstages import host

BLOCK = 96 << 20  # bytes

SCRIPT = f"""
import ctypes, resource, threading
import jaxstages  # sets the allocator up
assert jaxstages.host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def allocate_touch_free():
  block = libc.malloc({BLOCK})
  ctypes.memset(block, 1, {BLOCK})
  libc.free(ctypes.c_void_p(block))
worker = threading.Thread(target=lambda: [allocate_touch_free() for _ in range(5)])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker.start()
worker.join()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / ({BLOCK} >> 12))
"""


def test_a_worker_threads_large_blocks_are_reused_not_faulted_in_again():
  assert host.keep_freed_memory()  # glibc here: the set-up applies
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
  blocks_faulted = float(out.stdout.split()[-1])
  assert blocks_faulted < 1.5, f"{blocks_faulted:.1f} blocks' worth of pages faulted in over 5 rounds"
