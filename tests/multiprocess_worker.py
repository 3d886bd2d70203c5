"""One of two processes of `test_multiprocess.py`: 4 CPU devices each, gloo collectives, a (2, 2, 2) global mesh.

Each process loads only its own half of the batch; `jax.make_array_from_process_local_data` assembles the global
array. Process 0 writes the loss and gradient norm to the given JSON file.
"""

import json
import os
import sys

# the suite's flags (conftest.py)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxstages.sharding import initialize_distributed  # noqa: E402


def main(coordinator: str, process_id: int, out_path: str) -> None:
  initialize_distributed(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

  from flax import nnx

  from jaxstages.losses import make_loss_and_grad
  from jaxstages.model import create_model
  from jaxstages.sharding import MeshConfig, global_batch_from_process_local, make_mesh
  from tests.test_multiprocess import model_and_batch

  cfg, batch = model_and_batch()
  mesh = make_mesh(MeshConfig(2, 2, 2))
  model = create_model(cfg, seed=0, mesh=mesh)
  rows = batch["tokens"].shape[0] // 2
  local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
  global_batch = global_batch_from_process_local(local, mesh)
  loss, _, grad_norm = make_loss_and_grad(model, mesh)(nnx.state(model), global_batch)
  if process_id == 0:
    with open(out_path, "w") as f:
      json.dump({"loss": float(loss), "grad_norm": float(grad_norm)}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
