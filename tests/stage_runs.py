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
# the tokenizer a stage trains on the symbolic task world when given none, byte for byte (tests/test_tokenizer.py):
# read from the committed toy base instead of trained again (2 s of every run's start-up)
TOY_TOKENIZER = REPO / "experiments" / "artifacts" / "toy-base" / "tokenizer"
# the tiny shape every quick stage test trains
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=128", "data.batch_size=8", "stage.eval_batches=2",
         f"stage.tokenizer={str(TOY_TOKENIZER)!r}"]
# the suite's XLA flags (tests/conftest.py: 8 devices, its compile settings) for every process a test starts
ENV = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),
           JAX_PLATFORMS="cpu")


def train_cmd(config: str, workdir, *overrides) -> list[str]:
  """`jaxstages train --config configs/train.py:CONFIG --workdir WORKDIR --config.KEY=VALUE ...`."""
  args = [sys.executable, "-m", "jaxstages.cli", "train", "--config", f"configs/train.py:{config}",
          "--workdir", str(workdir)]
  return args + [f"--config.{o}" for o in overrides]


def run(cmd: list[str]) -> None:
  done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]


def spawn(cmd: list[str]) -> subprocess.Popen:
  """Starts `cmd` in the background (runs overlap: start-up and compilation are mostly single-threaded)."""
  return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
  _, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]


def loss_rows(workdir) -> list[tuple[int, float]]:
  """Every (step, loss) written, in order: a resumed run writes again the steps after its checkpoint."""
  path = Path(workdir) / "metrics.jsonl"
  return [(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r] if path.exists() else []


def losses(workdir) -> dict[int, float]:
  """step -> loss, the last value written for each step."""
  return dict(loss_rows(workdir))


def last_step(workdir) -> int:
  return max(losses(workdir), default=0)


def has_checkpoint(workdir) -> bool:
  """Whether a finalized checkpoint exists (orbax writes into a temporary folder and renames it to the step)."""
  folder = Path(workdir) / "checkpoints"
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def kill_at(cmd: list[str], workdir, step: int, timeout: float = 240) -> int:
  """Starts `cmd`, SIGKILLs it once `step` has been logged and a checkpoint is complete (so a loaded machine, on
  which an asynchronous save lags, cannot make the kill land before the first one); the kill itself may land
  mid-step or mid-save. Returns the last logged step."""
  return kill_all_at([(cmd, workdir, step)], timeout)[0]


def kill_all_at(runs: list[tuple[list[str], object, int]], timeout: float = 240) -> list[int]:
  """`kill_at` for several `(cmd, workdir, step)` runs at once; returns each one's last logged step."""
  procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
           for cmd, _, _ in runs]
  alive = set(range(len(runs)))
  deadline = time.time() + timeout
  while alive and time.time() < deadline:
    for i in list(alive):
      _, workdir, step = runs[i]
      if (last_step(workdir) >= step and has_checkpoint(workdir)) or procs[i].poll() is not None:
        if procs[i].poll() is None:
          os.kill(procs[i].pid, signal.SIGKILL)
        procs[i].wait()
        alive.discard(i)
    time.sleep(0.05)
  for i in alive:
    os.kill(procs[i].pid, signal.SIGKILL)
    procs[i].wait()
  return [last_step(workdir) for _, workdir, _ in runs]
