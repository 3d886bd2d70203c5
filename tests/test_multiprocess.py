"""Two processes on 127.0.0.1 (4 CPU devices each, gloo collectives) compute the same loss as one process with 8,
and when one of them dies the other stops with an error instead of waiting forever."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.slow  # the loss function as 2 processes; the default run has the commands (tests/test_hosts.py)
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


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator_dies", "other_dies"])
def test_survivor_stops_when_the_other_process_dies(tmp_path, victim):
  """A collective waiting on a dead peer does not fail by itself (gloo waits for minutes at least); the coordination
  service's heartbeat must abort the survivor. Process 0 hosts that service, so its death is noticed differently
  from process 1's: test both."""
  heartbeat_s = 5
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env["JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS"] = str(heartbeat_s)
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multiprocess_loop_worker", coordinator, str(i)],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while not all("RUNNING" in log.read_text() for log in logs):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          "\n".join(log.read_text()[-2000:] for log in logs)
      time.sleep(0.1)

    procs[victim].send_signal(signal.SIGKILL)
    survivor = procs[1 - victim]
    try:
      survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running 60 s after process {victim} was killed "
                  f"(heartbeat timeout {heartbeat_s} s):\n{logs[1 - victim].read_text()[-3000:]}")
  finally:
    for p in procs:
      p.kill()
      p.wait()
  out = logs[1 - victim].read_text()
  assert survivor.returncode != 0, out[-3000:]
  # JAX's own message (the process aborts from a C++ thread, so there is no Python traceback to add to)
  assert "JAX distributed service detected fatal errors" in out and "another task died" in out, out[-3000:]


def test_distributed_timeouts_are_checked_before_starting(monkeypatch):
  from jaxstages.config import ConfigError
  from jaxstages.sharding import initialize_distributed

  monkeypatch.setenv("JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS", "5s")
  with pytest.raises(ConfigError, match="JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS"):
    initialize_distributed("127.0.0.1:1", num_processes=2, process_id=0)
  monkeypatch.delenv("JAXSTAGES_HEARTBEAT_TIMEOUT_SECONDS")
  with pytest.raises(ConfigError, match="shutdown_timeout_seconds"):
    initialize_distributed("127.0.0.1:1", num_processes=2, process_id=0, shutdown_timeout_seconds=0)
