#!/usr/bin/env python
"""Learning curves of pre-training levers: strict greedy pass@1 per op against pre-training FLOPs, one curve per run.

  python tools/lever_curves.py --out experiments/results/base/levers NAME=RUN_DIR [NAME=RUN_DIR ...]

Each RUN_DIR is a `tools/learnability.py` work folder (its `learnability.json`, `metrics.jsonl` and `config.json`).
Writes `OUT.md` (a table: lever, steps, FLOPs, strict pass@1 and answer@1 per op at every evaluated checkpoint, and
the teacher-forced operand-value accuracy where `tools/token_accuracy.py` left one) and `OUT.png` (one panel per op).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxstages.metrics import read_metrics


def curve(run_dir: Path) -> list[dict]:
  """The run's evaluated checkpoints with the FLOPs spent by each."""
  flops = {r["step"]: r["flops"] for r in read_metrics(run_dir / "metrics.jsonl") if "flops" in r}
  out = []
  for row in json.loads((run_dir / "learnability.json").read_text()):
    step = row["step"]
    spent = flops.get(step) or max((f for s, f in flops.items() if s <= step), default=0.0)
    out.append({"step": step, "flops": spent, "minutes": row["minutes"],
                "strict": {int(k): v for k, v in row["accuracy"].items()},
                "answer": {int(k): v for k, v in row["answer_accuracy"].items()}})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
  args = parser.parse_args()
  curves = {}
  for spec in args.runs:
    name, _, path = spec.partition("=")
    curves[name] = curve(Path(path))
  ops = sorted({op for c in curves.values() for row in c for op in row["strict"]})
  lines = ["| lever | step | FLOPs | " + " | ".join(f"op {op}" for op in ops) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in ops) + " |"]
  for name, rows in curves.items():
    for row in rows:
      lines.append(f"| {name} | {row['step']} | {row['flops']:.2g} | " + " | ".join(
          f"{100 * row['strict'][op]:.0f}% ({100 * row['answer'][op]:.0f}%)" if op in row["strict"] else "—"
          for op in ops) + " |")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text(
      "Strict greedy pass@1 per op (in brackets: the final answer right, steps unchecked), 64 eval-split problems "
      "per op, at each evaluated checkpoint.\n\n" + "\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.2), sharey=True, squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, op in zip(axes[0], ops):
    for i, (name, rows) in enumerate(curves.items()):
      ax.plot([r["flops"] for r in rows], [100 * r["strict"].get(op, float("nan")) for r in rows], "o-",
              color=colors[i % len(colors)], label=name)
    ax.set_title(f"op {op}")
    ax.set_xlabel("pre-training FLOPs")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("strict greedy pass@1 (%)")
  axes[0][-1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=120)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
