"""Does a skill learned in one context transfer to another, and how much of the new context must pre-training hold?
Bases pre-trained with the second context q at 0%, 0.1%, 1% and 10% of the problems, q only at the lowest op (context
p at every op), then RL on a 50/50 mix of p and q; strict pass@k on q across ops, before and after RL.

  python -m experiments.context_seeding [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): transfer to the new context needs a small seed of it in pre-training: with 0% or
0.1% RL does not make the model solve the new context's harder problems, with ≥ 1% it does (up to +60 points
pass@128). Evaluated on the second context only, with half the scale's problems per op. The 1% base is the shared
one (`experiments/base.py`); the other three are pre-trained the same way with only the mixture changed, once each (a
seed changes the RL prompts and sampling, not the base).
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, cells, chosen, evaluate_start, fmt, markdown_table, parse_args, per_op_summary, \
    recorded_path, rl_pipeline, run, summary, write_results

SHARES = (0.0, 0.001, 0.01, 0.1)  # of pre-training problems in the second context, at the lowest op only


def mixture(scale, share: float):
  """The base's context mixture with the second context at `share` (only at the lowest op)."""
  main, second = scale.contexts
  lowest = scale.base["overrides"].get("data.task.op_range", (1, 4))[0]
  if share == 0:
    return ((main, 1.0),)
  return ((main, round(1 - share, 6)), (second, share, (lowest, lowest)))


def arm_name(share: float) -> str:
  return f"{100 * share:g}%"


def plot(results: dict, ops: list[int], ks: list[int], second: str, path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, k in zip(axes, (ks[0], ks[-1])):
    for name, arm in results["arms"].items():
      line, = ax.plot(ops, [arm["after_rl"][str(op)][f"pass@{k}"]["mean"] for op in ops], marker="o", label=name)
      ax.plot(ops, [arm["before_rl"][str(op)][f"pass@{k}"]["mean"] for op in ops], ls=":", color=line.get_color())
    ax.set_title(f"context {second}: strict pass@{k} (dotted: before RL)", fontsize=9)
    ax.set_xlabel("op")
    ax.set_xticks(ops)
  axes[0].legend(title=f"{second} in pre-training", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("context_seeding", __doc__, argv)
  scale = SCALES[args.scale]
  main_ctx, second = scale.contexts
  hi = scale.ranges["edge"][1]
  rl_range = (scale.ranges["too-easy"][0], hi)
  ops = sorted({*range(rl_range[0], rl_range[1] + 1), hi + 1})
  ks = list(scale.eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  problems = max(1, scale.eval["problems"] // 2)  # half the scale's problems per cell: eight bases and runs to evaluate
  results = {"rl_range": rl_range, "rl_contexts": {main_ctx: 0.5, second: 0.5}, "arms": {}}
  names = {arm_name(s): s for s in SHARES}
  for name in chosen(list(names), args):
    share = names[name]
    base = ensure_base(scale, args.workdir, **{"data.task.contexts": mixture(scale, share)})
    before = cells(evaluate_start(scale, base, args.workdir, eval_ops=ops, contexts=(second,), problems=problems))
    per_seed = []
    for seed in range(args.seeds):
      report, _ = run(rl_pipeline(scale, f"context_seeding-{name}-{seed}", base, rl_range, seed, eval_ops=ops,
                                  eval_contexts=(second,), eval_problems=problems,
                                  **{"data.task.contexts": ((main_ctx, 0.5), (second, 0.5))}), args.workdir, scale)
      per_seed.append(cells(report["stages"][-1]["eval"]))
    results["arms"][name] = {
        "share": share, "base_folder": recorded_path(base, args.workdir),
        "after_rl": per_op_summary(per_seed, ops, metrics, context=second),
        "before_rl": {str(op): {m: summary([before[(second, op)][m]]) for m in metrics} for op in ops}}

  kmax = ks[-1]
  header = [f"{second} in pre-training", *[f"op {op} pass@1" for op in ops], *[f"op {op} pass@{kmax}" for op in ops]]
  rows = []
  for name, arm in results["arms"].items():
    for key, label in (("before_rl", "before RL"), ("after_rl", "after RL")):
      rows.append([f"{name}, {label}", *[fmt(arm[key][str(op)]["pass@1"]) for op in ops],
                   *[fmt(arm[key][str(op)][f"pass@{kmax}"]) for op in ops]])
  md = (f"Context {second} in pre-training only at op {mixture(scale, 0.01)[1][2][0]}; RL for {scale.rl_steps} steps "
        f"on ops {rl_range[0]}-{rl_range[1]}, half {main_ctx}, half {second}. Strict pass@k (%) on context {second}, "
        f"{problems} problems x {scale.eval['n']} samples per op at temperature {scale.eval['temperature']}; after RL "
        f"mean ± spread over {args.seeds} seeds (before RL: the one base).\n\n" + markdown_table(header, rows))
  write_results(args, "context_seeding", results, md, plot=lambda p: plot(results, ops, ks, second, p))
  print(md)


if __name__ == "__main__":
  main()
