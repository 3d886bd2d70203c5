"""`experiments/pending/collect.py`, the command that keeps an experiment's runs in the repository between machines:
run as a session runs it (from a checkout's root), it keeps finished runs without checkpoints, unfinished runs and
the experiments' own bases with their latest checkpoint only, and the start models' cached evaluations; `--restore`
puts them all back where the experiments look for them and leaves a run already there alone."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

COLLECT = Path(__file__).resolve().parents[1] / "experiments/pending/collect.py"


def write(path: Path, text: str = "x") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def run(name: str, report: dict | None, steps: tuple[int, ...], root: Path) -> None:
  write(root / "config.json", json.dumps({"name": name}))
  if report is not None:
    write(root / "report.json", json.dumps(report))
  for step in steps:
    write(root / "rl" / "checkpoints" / str(step) / "params")
  write(root / "rl" / "tensorboard" / "events")


def collect(cwd: Path, *args: str) -> str:
  done = subprocess.run([sys.executable, str(COLLECT), *args], cwd=cwd, capture_output=True, text=True, check=True)
  return done.stdout


def test_collect_keeps_runs_and_restore_puts_them_back(tmp_path):
  work = tmp_path / "runs/experiments/cpu"
  cell = lambda op, p1, p64: {"op": op, "pass@1": p1, "pass@64": p64}
  run("demo-edge-0", {"stages": [{"eval": {"cells": [cell(1, 0.5, 0.9), cell(2, 0.25, 0.75)]}}]}, (10, 20),
      work / "runs/aaa111")
  run("demo-edge-1", None, (5, 15), work / "runs/bbb222")  # still running
  run("other-arm-0", {"stages": [{"eval": {"cells": [cell(1, 1.0, 1.0)]}}]}, (1,), work / "runs/ccc333")
  for step in (100, 200):
    write(work / "base-ddd444" / "pretrain" / "checkpoints" / str(step) / "params")
  write(work / "evals/start.json", '{"cells": []}')
  write(tmp_path / "experiments/results/base/results.json",
        json.dumps({"base": "b", "bases": {"b": {"eval": {"cells": [cell(1, 0.125, 0.5), cell(2, 0.0, 0.25)]}}}}))

  collect(tmp_path, "demo", "--unfinished")
  pending = tmp_path / "experiments/pending"
  assert (pending / "demo/aaa111/report.json").exists() and not (pending / "demo/aaa111/rl/checkpoints").exists()
  assert not (pending / "demo/aaa111/rl/tensorboard").exists() and not (pending / "demo/ccc333").exists()
  assert sorted(p.name for p in (pending / "demo/unfinished/bbb222/rl/checkpoints").iterdir()) == ["15"]
  assert sorted(p.name for p in (pending / "bases/base-ddd444/pretrain/checkpoints").iterdir()) == ["200"]
  assert (pending / "evals/start.json").read_text() == '{"cells": []}'
  table = (pending / "demo/README.md").read_text()
  assert "| base | `experiments/artifacts/base-cpu` | 12.5 / 50.0 | 0.0 / 25.0 |" in table
  assert "| edge-0 | `aaa111` | 50.0 / 90.0 | 25.0 / 75.0 |" in table

  # a fresh machine: nothing under runs/ but one run that is further along than the kept copy
  (work / "runs/bbb222/rl/checkpoints/15").rename(work / "runs/bbb222/rl/checkpoints/30")
  for folder in ("runs/aaa111", "runs/ccc333", "base-ddd444", "evals"):
    shutil.rmtree(work / folder)
  out = collect(tmp_path, "--restore")
  assert (work / "runs/aaa111/report.json").exists() and "runs/aaa111" in out
  assert sorted(p.name for p in (work / "runs/bbb222/rl/checkpoints").iterdir()) == ["30", "5"]  # left alone
  assert sorted(p.name for p in (work / "base-ddd444/pretrain/checkpoints").iterdir()) == ["200"]
  assert (work / "evals/start.json").exists() and not (work / "runs/ccc333").exists()
  assert collect(tmp_path, "--restore") == ""  # a second restore finds everything in place
