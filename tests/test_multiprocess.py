"""Two processes on 127.0.0.1 (4 CPU devices each, gloo collectives) compute the same loss as one process with 8."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxstages.model import model_config

REPO = Path(__file__).resolve().parents[1]


def model_and_batch():
  cfg = model_config("tiny", num_heads=8, num_kv_heads=4, head_dim=8)
  tok = np.random.default_rng(7).integers(0, cfg.vocab_size, (8, 33)).astype(np.int32)
  mask = np.ones((8, 32), np.float32)
  mask[5, 10:] = 0
  return cfg, dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=mask)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, devices):
  from flax import nnx

  from jaxstages.losses import make_loss_and_grad
  from jaxstages.model import create_model
  from jaxstages.sharding import MeshConfig, make_mesh, shard_batch

  coordinator = f"127.0.0.1:{_free_port()}"
  out = tmp_path / "result.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", coordinator, str(i), str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  result = json.loads(out.read_text())

  cfg, batch = model_and_batch()
  mesh = make_mesh(MeshConfig(2, 2, 2))
  model = create_model(cfg, seed=0, mesh=mesh)
  loss, _, grad_norm = make_loss_and_grad(model, mesh)(nnx.state(model), shard_batch(batch, mesh))
  assert abs(result["loss"] - float(loss)) <= 1e-5 * float(loss)
  assert abs(result["grad_norm"] - float(grad_norm)) <= 1e-5 * float(grad_norm)
