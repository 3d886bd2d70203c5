"""Does RL extend what the base can do, and on which problems? RL from the shared base on four op ranges (too easy,
in-distribution, the edge of competence, too hard), then strict pass@k on every evaluated op.

  python -m experiments.edge_of_competence [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): RL on the edge range raises pass@k at large k (new problems solved at all), RL on
in-distribution problems raises pass@1 but not pass@k at large k (it sharpens what the base already does), RL on
too-hard problems does nothing (no sample is ever rewarded), and RL on too-easy problems (already solved) does not
reach the edge either. Every arm takes the same number of RL steps; a seed
changes the RL prompts and sampling (the base is shared). Reward curves come from each run's `metrics.jsonl`. The
op ranges are the bands of the base's measured competence (`common.competence_bands`), else the scale's fixed ones.
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, competence_bands, error_bars, fmt, \
    markdown_table, parse_args, per_op_summary, rl_pipeline, stage_metrics, summary, write_results
from experiments.common import check as check_results

ARMS = ("too-easy", "in-distribution", "edge", "too-hard")


def claims(k: int) -> list[Claim]:
  """The differences the claim rests on (k: the largest evaluated k)."""
  return [Claim("RL on the edge solves new edge problems", "edge", "base", "edge", f"pass@{k}", +1),
          Claim("RL on the edge extends more than in-distribution RL", "edge", "in-distribution", "edge",
                f"pass@{k}", +1),
          Claim("in-distribution RL sharpens: pass@1 up", "in-distribution", "base", "in-distribution", "pass@1", +1),
          Claim("in-distribution RL sharpens: pass@k unchanged", "in-distribution", "base", "in-distribution",
                f"pass@{k}", 0),
          Claim("RL on too-easy problems leaves the edge unchanged", "too-easy", "base", "edge", f"pass@{k}", 0),
          Claim("RL on the edge beats RL on too-easy problems there", "edge", "too-easy", "edge", f"pass@{k}", +1),
          # "changes nothing" band by band: a mean over every op would let a gain on one op cancel a loss on another
          Claim("RL on too-hard problems changes nothing there", "too-hard", "base", "too-hard", f"pass@{k}", 0),
          Claim("RL on too-hard problems leaves in-distribution pass@1 unchanged", "too-hard", "base",
                "in-distribution", "pass@1", 0)]


def plot(results: dict, ks: list[int], ops: list[int], path) -> None:
  import matplotlib.pyplot as plt
  panels = len(ops) + 1  # one per op and the reward curves, at most five to a row
  ncols = min(panels, 5)
  nrows = -(-panels // ncols)
  fig, grid = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
  axes = list(grid.flat)
  for ax in axes[panels:]:
    ax.axis("off")
  color = colors(["base", *ARMS])
  band = {op: arm for arm, (lo, hi) in results["ranges"].items() for op in range(lo, hi + 1)}
  for ax, op in zip(axes, ops):
    for arm in ["base", *results["arms"]]:
      ys, yerr = error_bars(results, arm, [(f"p/{op}", f"pass@{k}") for k in ks])
      ax.errorbar(ks, ys, yerr=yerr, marker="o", ms=3, capsize=2, label=arm, ls="--" if arm == "base" else "-",
                  color=color[arm])
    ax.set_xscale("log", base=2)
    ax.set_title(f"op {op} ({band[op]})" if op in band else f"op {op}")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylim(0, 1)
  for row in grid:
    row[0].set_ylabel("strict pass@k (95% bootstrap interval)", fontsize=8)
  axes[0].legend(fontsize=7)
  ax = axes[panels - 1]
  for arm, curves in results["reward_curves"].items():
    steps = [r["step"] for r in curves[0]]
    rates = [[c[i]["pass_rate"] for c in curves] for i in range(len(steps))]
    ax.plot(steps, [sum(r) / len(r) for r in rates], label=arm, color=color[arm])
    ax.fill_between(steps, [min(r) for r in rates], [max(r) for r in rates], color=color[arm], alpha=0.2, lw=0)
  ax.set_title("RL samples (band: seeds' range)", fontsize=9)
  ax.set_xlabel("RL step")
  ax.set_ylabel("strict pass rate of the samples")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("edge_of_competence", __doc__, argv)
  if args.check:
    return check_results(args, "edge_of_competence")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  base = ensure_base(scale, args.workdir)
  ops, ks = list(scale.eval_ops), list(scale.eval["ks"])
  base_eval = evidence.start("base", base)
  bands = competence_bands(scale, base_eval)
  ranges = bands["ranges"]
  base_cells = cells(base_eval)
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  results = {"base": {str(op): {m: summary([base_cells[("p", op)][m]]) for m in metrics} for op in ops},
             "arms": {}, "reward_curves": {}, "ranges": {a: ranges[a] for a in ARMS}}
  for arm in chosen(ARMS, args):
    per_seed, curves = [], []
    for seed in range(args.seeds):
      report, run_dir = evidence.run(rl_pipeline(scale, f"edge_of_competence-{arm}-{seed}", base, ranges[arm], seed),
                                     arm, seed)
      per_seed.append(cells(report["stages"][-1]["eval"]))
      curves.append(stage_metrics(run_dir, "rl", ["pass_rate", "reward_mean", "zero_variance_groups"]))
    results["arms"][arm] = per_op_summary(per_seed, ops, metrics)
    results["reward_curves"][arm] = curves

  kmax = ks[-1]
  header = ["RL on (ops)", *[f"op {op} pass@1" for op in ops], *[f"op {op} pass@{kmax}" for op in ops]]
  rows = [["(base)", *[fmt(results["base"][str(op)]["pass@1"]) for op in ops],
           *[fmt(results["base"][str(op)][f"pass@{kmax}"]) for op in ops]]]
  for arm, by_op in results["arms"].items():
    lo, hi = ranges[arm]
    rows.append([f"{arm} ({lo}-{hi})", *[fmt(by_op[str(op)]["pass@1"]) for op in ops],
                 *[fmt(by_op[str(op)][f"pass@{kmax}"]) for op in ops]])
  first = {a: [c[0]["pass_rate"] for c in results["reward_curves"][a]] for a in results["reward_curves"]}
  last = {a: [c[-1]["pass_rate"] for c in results["reward_curves"][a]] for a in results["reward_curves"]}
  curve_rows = [[a, fmt(summary(first[a])), fmt(summary(last[a]))] for a in first]
  md = (f"Strict pass@k (%) on context p after {scale.rl_steps} RL steps from the shared base, "
        f"{scale.eval['problems']} problems x {scale.eval['n']} samples per op at temperature "
        f"{scale.eval['temperature']}; mean ± spread over {args.seeds} seeds.\n\n"
        + markdown_table(header, rows)
        + "\nStrict pass rate of the RL samples (%), first and last logged step:\n\n"
        + markdown_table(["RL on", "first", "last"], curve_rows))
  write_results(args, "edge_of_competence", results, md, plot=lambda p: plot(results, ks, ops, p), evidence=evidence,
                claims=claims(ks[-1]), bands=bands)
  print(md)


if __name__ == "__main__":
  main()
