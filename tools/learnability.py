#!/usr/bin/env python
"""Learnability of the task world: pre-train the toy model for a few minutes and measure strict greedy accuracy by op.

  python tools/learnability.py --workdir runs/learnability [--steps N] [--eval-every K] [config overrides]

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
from jaxstages.evaluation import EvalConfig, evaluate, load_stage
from jaxstages.metrics import read_metrics
from jaxstages.train import run_stage


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/learnability")
  parser.add_argument("--steps", type=int, default=None, help="default: the config's stage.steps")
  parser.add_argument("--eval-every", type=int, default=None, help="default: a quarter of the steps")
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--ops", default="1,2,3,4,6")
  parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
  args = parser.parse_args()
  workdir = Path(args.workdir)
  base = apply_overrides(load_config("configs/train.py:pretrain-toy"), args.overrides)
  args.steps = args.steps or base.stage.steps
  args.eval_every = args.eval_every or max(1, args.steps // 4)
  config = apply_overrides(load_config("configs/train.py:pretrain-toy"), [
      f"stage.steps={args.steps}", f"stage.checkpoint_every={args.eval_every}", "stage.keep_checkpoints=1000",
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
    cells = evaluate(model, tokenizer, task_cfg, EvalConfig(ops=tuple(ops), contexts=(task_cfg.mixture[0].context,),
                                                            problems=args.n), show_progress=False)["cells"]
    results.append({"step": step, "minutes": seconds.get(step, float("nan")) / 60,
                    "accuracy": {c["op"]: c["pass@1"] for c in cells},
                    "answer_accuracy": {c["op"]: c["answer@1"] for c in cells}})
    print(json.dumps(results[-1]), flush=True)
  (workdir / "learnability.json").write_text(json.dumps(results, indent=2))
  # strict accuracy, and in brackets the share with the right final answer (steps unchecked)
  header = "| step | minutes | " + " | ".join(f"op {o}" for o in ops) + " |"
  lines = [header, "|" + "---:|" * (len(ops) + 2)]
  for r in results:
    lines.append(f"| {r['step']} | {r['minutes']:.1f} | " + " | ".join(
        f"{r['accuracy'][o]:.0%} ({r['answer_accuracy'][o]:.0%})" for o in ops) + " |")
  (workdir / "learnability.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
