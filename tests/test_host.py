"""The host allocator set-up (`jaxstages/host.py`, applied when jaxstages is imported, which conftest does first): a
block larger than glibc pools by default (over 32 MB, and over a worker thread's 64 MB arena), allocated and freed
over and over on a thread other than the main one, as XLA:CPU's workers allocate each call's temporaries, is reused:
its pages are faulted in once, not on every allocation (glibc's default maps it afresh every time)."""

import ctypes
import resource
import threading

from jaxstages import host

BLOCK = 96 << 20  # bytes


def test_a_worker_threads_large_blocks_are_reused_not_faulted_in_again():
  assert host.keep_freed_memory()  # glibc here: the set-up applies
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p

  def allocate_touch_free():
    block = libc.malloc(BLOCK)
    ctypes.memset(block, 1, BLOCK)
    libc.free(ctypes.c_void_p(block))

  worker = threading.Thread(target=lambda: [allocate_touch_free() for _ in range(5)])
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  worker.start()
  worker.join()
  blocks_faulted = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (BLOCK >> 12)
  assert blocks_faulted < 1.5, f"{blocks_faulted:.1f} blocks' worth of pages faulted in over 5 rounds"
