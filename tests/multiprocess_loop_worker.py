"""One of two processes of `test_multiprocess.py`'s lost-host test: cross-process collectives in a loop, forever.

It runs both kinds of collective the training loop runs: a jitted reduction over a global array sharded across the
two processes, and a `process_allgather` of a host value (as `preempt_requested` does without JAX's preemption
service). Once a step has completed it prints `RUNNING`, so the test knows both processes are inside the loop before
it kills one.
"""

import os
import sys

# the suite's flags (conftest.py)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxstages.sharding import initialize_distributed  # noqa: E402


def main(coordinator: str, process_id: int) -> None:
  # The heartbeat timeout comes from JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS, set by the test.
  initialize_distributed(coordinator_address=coordinator, num_processes=2, process_id=process_id)

  import numpy as np
  from jax.experimental import multihost_utils

  from jaxstages.sharding import MeshConfig, global_batch_from_process_local, make_mesh

  mesh = make_mesh(MeshConfig(2, 2, 2))
  local = {"tokens": np.full((4, 16), process_id + 1, np.int32)}
  tokens = global_batch_from_process_local(local, mesh)["tokens"]
  total = jax.jit(lambda x: x.sum())
  step = 0
  while True:
    assert int(total(tokens)) == (4 * 16) * (1 + 2)
    assert np.asarray(multihost_utils.process_allgather(np.int32(step))).tolist() == [step, step]
    step += 1
    if step == 1:
      print("RUNNING", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
