"""Helpers for tests that run stages as real processes: the command line, the logged losses, and SIGKILL at a given
step. Shared by the train-loop and post-training resume tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxstages.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
# the tiny shape every quick stage test trains
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=128", "data.batch_size=8", "stage.eval_batches=2"]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def train_cmd(config: str, workdir, *overrides) -> list[str]:
  """`jaxstages train --config configs/train.py:CONFIG --workdir WORKDIR --config.KEY=VALUE ...`."""
  args = [sys.executable, "-m", "jaxstages.cli", "train", "--config", f"configs/train.py:{config}",
          "--workdir", str(workdir)]
  return args + [f"--config.{o}" for o in overrides]


def run(cmd: list[str]) -> None:
  done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]


def loss_rows(workdir) -> list[tuple[int, float]]:
  """Every (step, loss) written, in order: a resumed run writes again the steps after its checkpoint."""
  path = Path(workdir) / "metrics.jsonl"
  return [(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r] if path.exists() else []


def losses(workdir) -> dict[int, float]:
  """step -> loss, the last value written for each step."""
  return dict(loss_rows(workdir))


def last_step(workdir) -> int:
  return max(losses(workdir), default=0)


def kill_at(cmd: list[str], workdir, step: int, timeout: float = 240) -> int:
  """Starts `cmd`, SIGKILLs it once `step` has been logged (mid-run, possibly mid-save); returns the last logged
  step."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while time.time() < deadline and last_step(workdir) < step and proc.poll() is None:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  return last_step(workdir)
