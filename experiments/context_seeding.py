"""Does a skill learned in one context transfer to another, and how much of the new context must pre-training hold?
Bases pre-trained with the second context q at 0%, 0.1%, 1% and 10% of the documents, q only at the lowest op
(context p as in the shared base's mixture, sharing the rest), then RL on a 50/50 mix of p and q; strict pass@k on q
across ops, before and after RL.

  python -m experiments.context_seeding [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): transfer to the new context needs a small seed of it in pre-training: with 0% or
0.1% RL does not make the model solve the new context's harder problems, with ≥ 1% it does (up to +60 points
pass@128). Evaluated on the second context only (the scale's problems per op). The base whose mixture is the
scale's own is the shared one (`experiments/base.py`; 0% at cpu scale, 1% at minimal); the other three are
pre-trained the same way with only the mixture changed, once each (a seed changes the RL prompts and sampling, not the
base). The RL ops run from the base's too-easy band to the top of its edge band (`common.competence_bands`).
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, block_config, cells, chosen, colors, competence_bands, \
    error_bars, fmt, markdown_table, parse_args, per_op_summary, recorded_path, rl_pipeline, summary, write_results
from experiments.common import check as check_results
from jaxstages.data.pipeline import data_config

SHARES = (0.0, 0.001, 0.01, 0.1)  # of pre-training problems in the second context, at the lowest op only


def mixture(scale, share: float) -> tuple:
  """The base's context mixture with the second context at `share` of the documents (only at the main context's
  lowest op) and the main context's entries (their op ranges kept) sharing the rest in their proportions."""
  main, second = scale.contexts
  entries = [e for e in base_task(scale).mixture if e.context == main]
  total = sum(e.weight for e in entries)
  scaled = tuple((main, round((1 - share) * e.weight / total, 6), *([e.op_range] if e.op_range else []))
                 for e in entries)
  lowest = lowest_op(scale)
  return scaled if share == 0 else (*scaled, (second, share, (lowest, lowest)))


def base_task(scale):
  """The shared base's task config (its mixture)."""
  return data_config(block_config(scale, scale.base).data).task


def lowest_op(scale) -> int:
  """The main context's lowest pre-trained op: where the second context is seeded."""
  return base_task(scale).op_range_of(scale.contexts[0])[0]


def arm_name(share: float) -> str:
  return f"{100 * share:g}%"


def claims(harder: tuple, k: int, second: str) -> list[Claim]:
  """On the second context's ops above the seeded one (`harder`), at the largest evaluated k."""
  return [Claim(f"{second} seeded at 1%: RL solves its harder problems", "1%", "1% before RL", harder, f"pass@{k}",
                +1, second),
          Claim(f"{second} seeded at 10%: RL solves its harder problems", "10%", "10% before RL", harder,
                f"pass@{k}", +1, second),
          Claim(f"{second} absent: RL does not", "0%", "0% before RL", harder, f"pass@{k}", 0, second),
          Claim(f"{second} at 0.1%: RL does not", "0.1%", "0.1% before RL", harder, f"pass@{k}", 0, second),
          Claim(f"after RL, 1% seeding beats none on {second}", "1%", "0%", harder, f"pass@{k}", +1, second)]


def plot(results: dict, ops: list[int], ks: list[int], second: str, path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  color = colors([arm_name(s) for s in SHARES])
  for ax, k in zip(axes, (ks[0], ks[-1])):
    for name in results["arms"]:
      for label, style in ((name, "-"), (f"{name} before RL", ":")):
        means, yerr = error_bars(results, label, [(f"{second}/{op}", f"pass@{k}") for op in ops])
        ax.errorbar(ops, means, yerr=yerr, marker="o", ls=style, capsize=2, color=color[name],
                    label=name if style == "-" else None)
    ax.set_title(f"context {second} (dotted: before RL)", fontsize=9)
    ax.set_xlabel("op")
    ax.set_ylabel(f"strict pass@{k} (95% bootstrap interval)")
    ax.set_xticks(ops)
  axes[0].legend(title=f"{second} in pre-training", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("context_seeding", __doc__, argv)
  if args.check:
    return check_results(args, "context_seeding")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  main_ctx, second = scale.contexts
  bands = competence_bands(scale, evidence.start("base", ensure_base(scale, args.workdir)))
  hi = bands["ranges"]["edge"][1]
  rl_range = (bands["ranges"]["too-easy"][0], hi)
  ops = sorted({*range(rl_range[0], rl_range[1] + 1), hi + 1})
  ks = list(scale.eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  problems = scale.eval["problems"]
  results = {"rl_range": rl_range, "rl_contexts": {main_ctx: 0.5, second: 0.5}, "arms": {}}
  names = {arm_name(s): s for s in SHARES}
  for name in chosen(list(names), args):
    share = names[name]
    base = ensure_base(scale, args.workdir, **{"data.task.contexts": mixture(scale, share)})
    before = cells(evidence.start(f"{name} before RL", base, eval_ops=ops, contexts=(second,), problems=problems))
    per_seed = []
    for seed in range(args.seeds):
      report, _ = evidence.run(rl_pipeline(scale, f"context_seeding-{name}-{seed}", base, rl_range, seed,
                                           eval_ops=ops, eval_contexts=(second,), eval_problems=problems,
                                           **{"data.task.contexts": ((main_ctx, 0.5), (second, 0.5))}), name, seed)
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
  md = (f"Context {second} in pre-training only at op {lowest_op(scale)}; RL for {scale.rl_steps} steps "
        f"on ops {rl_range[0]}-{rl_range[1]}, half {main_ctx}, half {second}. Strict pass@k (%) on context {second}, "
        f"{problems} problems x {scale.eval['n']} samples per op at temperature {scale.eval['temperature']}; after RL "
        f"mean ± spread over {args.seeds} seeds (before RL: the one base).\n\n" + markdown_table(header, rows))
  lowest = lowest_op(scale)
  write_results(args, "context_seeding", results, md, plot=lambda p: plot(results, ops, ks, second, p),
                evidence=evidence, claims=claims(tuple(op for op in ops if op > lowest), ks[-1], second), bands=bands)
  print(md)


if __name__ == "__main__":
  main()
