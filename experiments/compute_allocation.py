"""Under a fixed compute budget after the base, how should it be split between mid-training and RL? Five splits from
all-mid-training to all-RL, each spending the same FLOPs (from the ledger, RL sampling included), then strict pass@k on
the edge and harder ops.

  python -m experiments.compute_allocation [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): every mid-training + RL mix beats all-RL (+10.8 points on the hardest range), and
heavy mid-training with light RL wins on medium-difficulty tasks. Mid-training here is continued pre-training on
the edge range (80%) with replay of the pre-training stream (20%), at the re-warmed mid-training lr; RL is the
scale's GRPO on the same edge range. A stage given FLOPs runs the steps that spend them (RL: until its measured
FLOPs reach its share).
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, cells, chosen, evaluate_start, fmt, markdown_table, parse_args, per_op_summary, \
    pipeline, rl_max_new_tokens, rl_prompt_len, run, stage, summary, write_results

MIDTRAIN_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the budget; RL gets the rest


def arm_name(share: float) -> str:
  """`mid75`: 75% of the budget to mid-training, the rest to RL."""
  return f"mid{round(100 * share)}"


def arm_label(share: float) -> str:
  return f"mid {round(100 * share)}% / RL {round(100 * (1 - share))}%"


def arm_pipeline(scale, share: float, base, seed: int, eval_ops) -> dict:
  lo, hi = scale.ranges["edge"]
  stages = []
  if share > 0:
    stages.append(stage(scale.midtrain, "midtrain", start=base, flops=share * scale.budget_flops, **{
        "data.sources": (dict(name="midtrain", format="pretrain", task=dict(op_range=(lo, hi))),
                         dict(name="replay", format="pretrain", seed=0)),
        "data.schedule": ((0, dict(midtrain=0.8, replay=0.2)),), "data.schedule_interp": "constant",
        "data.seed": 200 + seed}))
  if share < 1:
    stages.append(stage(scale.rl, "rl", start=None if stages else base, flops=(1 - share) * scale.budget_flops, **{
        "data.task.op_range": (lo, hi), "data.seed": 100 + seed, "grpo.rollout.max_new_tokens": rl_max_new_tokens(scale, hi),
        **rl_prompt_len(scale, base, (lo, hi))}))
  return pipeline(scale, f"compute_allocation-{round(100 * share)}-{seed}", stages, seed, eval_ops=eval_ops,
                  problems=eval_problems(scale))


def eval_problems(scale) -> int:
  """Half the scale's problems per cell: up to two evaluations for each of 15 runs."""
  return max(1, scale.eval["problems"] // 2)


def plot(results: dict, ops: list[int], ks: list[int], path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  shares = [a["midtrain_share"] for a in results["arms"].values()]
  for op in ops:
    for ax, k in zip(axes, (ks[0], ks[-1])):
      means = [a["eval"][str(op)][f"pass@{k}"]["mean"] for a in results["arms"].values()]
      spreads = [a["eval"][str(op)][f"pass@{k}"]["spread"] for a in results["arms"].values()]
      ax.errorbar(shares, means, yerr=spreads, marker="o", capsize=3, label=f"op {op}")
      ax.axhline(results["base"][str(op)][f"pass@{k}"]["mean"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
      ax.set_title(f"strict pass@{k} (dotted: the base)", fontsize=9)
  for ax in axes:
    ax.set_xlabel("mid-training share of the budget (rest: RL)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("compute_allocation", __doc__, argv)
  scale = SCALES[args.scale]
  base = ensure_base(scale, args.workdir)
  lo, hi = scale.ranges["edge"]
  ops = sorted({*range(lo, hi + 1), scale.ranges["too-hard"][0]})
  ks = list(scale.eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  base_cells = cells(evaluate_start(scale, base, args.workdir, eval_ops=ops, problems=eval_problems(scale)))
  results = {"budget_flops": scale.budget_flops, "base": {str(op): {m: summary([base_cells[("p", op)][m]])
                                                                    for m in metrics} for op in ops}, "arms": {}}
  names = {arm_name(s): s for s in MIDTRAIN_SHARES}
  for name in chosen(list(names), args):
    share = names[name]
    per_seed, flops, steps = [], [], []
    for seed in range(args.seeds):
      report, run_dir = run(arm_pipeline(scale, share, base, seed, ops), args.workdir, scale)
      per_seed.append(cells(report["stages"][-1]["eval"]))
      flops.append({r["stage"]: (r["planned_flops"], r["flops"]) for r in report["stages"]})
      steps.append({r["stage"]: r["steps"] for r in report["stages"]})
    results["arms"][name] = {
        "midtrain_share": share, "flops": flops, "steps": steps,
        "eval": per_op_summary(per_seed, ops, metrics)}

  kmax = ks[-1]
  header = ["split", "steps (mid / RL)", "FLOPs spent (mid + RL)", *[f"op {op} pass@1" for op in ops],
            *[f"op {op} pass@{kmax}" for op in ops]]
  rows = [["(base)", "", "", *[fmt(results["base"][str(op)]["pass@1"]) for op in ops],
           *[fmt(results["base"][str(op)][f"pass@{kmax}"]) for op in ops]]]
  for name, arm in results["arms"].items():
    st = arm["steps"][0]
    spent = summary([sum(f[1] for f in fl.values()) for fl in arm["flops"]])
    rows.append([arm_label(arm["midtrain_share"]), f"{st.get('midtrain', 0)} / {st.get('rl', 0)}",
                 f"{spent['mean']:.3g}",
                 *[fmt(arm["eval"][str(op)]["pass@1"]) for op in ops],
                 *[fmt(arm["eval"][str(op)][f"pass@{kmax}"]) for op in ops]])
  md = (f"A budget of {scale.budget_flops:.3g} FLOPs after the base, split between mid-training (80% ops {lo}-{hi}, "
        f"20% replay) and GRPO on ops {lo}-{hi}. Strict pass@k (%) on context p, {eval_problems(scale)} problems x "
        f"{scale.eval['n']} samples per op at temperature {scale.eval['temperature']}; mean ± spread over "
        f"{args.seeds} seeds (steps of seed 0).\n\n" + markdown_table(header, rows))
  write_results(args, "compute_allocation", results, md, plot=lambda p: plot(results, ops, ks, p))
  print(md)


if __name__ == "__main__":
  main()
