#!/usr/bin/env python
"""Learnability of the task world: pre-train the toy model for a few minutes and measure strict greedy accuracy by op.

  python tools/learnability.py --workdir runs/learnability --steps 700 --eval-every 100

Trains `configs/train.py:pretrain-toy` (keeping every `--eval-every` checkpoint), then greedy-decodes `--n`
eval-split problems per op from each checkpoint and verifies them strictly (answer and every step). Writes
`learnability.json` and a Markdown table of accuracy by op against training minutes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxstages.config import apply_overrides, load_config
from jaxstages.data.pipeline import data_config
from jaxstages.evaluation import load_stage, strict_accuracy
from jaxstages.metrics import read_metrics
from jaxstages.train import run_stage


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/learnability")
  parser.add_argument("--steps", type=int, default=700)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--ops", default="2,3,4,5,6,7,8")
  parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
  args = parser.parse_args()
  workdir = Path(args.workdir)
  config = apply_overrides(load_config("configs/train.py:pretrain-toy"), [
      f"stage.steps={args.steps}", f"stage.checkpoint_every={args.eval_every}", "stage.keep_checkpoints=None",
      "stage.async_checkpoints=False", *args.overrides])
  run_stage(config, workdir)

  task_cfg = data_config(config.data).task
  seconds = {}
  elapsed = 0.0
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "step_time_s" in r]
  last = 0
  for r in rows:
    elapsed += r["step_time_s"] * (r["step"] - last)
    last = r["step"]
    seconds[r["step"]] = elapsed
  ops = [int(o) for o in args.ops.split(",")]
  results = []
  for step in range(args.eval_every, args.steps + 1, args.eval_every):
    model, tokenizer, _ = load_stage(workdir, step)
    acc = strict_accuracy(model, tokenizer, task_cfg, ops, args.n)
    results.append({"step": step, "minutes": seconds.get(step, float("nan")) / 60, "accuracy": acc})
    print(json.dumps(results[-1]), flush=True)
  (workdir / "learnability.json").write_text(json.dumps(results, indent=2))
  header = "| step | minutes | " + " | ".join(f"op {o}" for o in ops) + " |"
  lines = [header, "|" + "---:|" * (len(ops) + 2)]
  for r in results:
    lines.append(f"| {r['step']} | {r['minutes']:.1f} | " + " | ".join(f"{r['accuracy'][o]:.0%}" for o in ops) + " |")
  (workdir / "learnability.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
