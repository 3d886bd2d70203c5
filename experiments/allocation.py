"""The allocation frontier: how should a compute budget after the base be split between stages? Each split of the
budget runs as one pipeline from the shared base, its stages in the given order, each given its share of the FLOPs
(a share of 0 drops the stage); every pipeline is evaluated, and the metric is plotted against the split with 95%
bootstrap intervals.

  python -m experiments.allocation --stages midtrain,sft,rl --budget 3e12 \
      --splits 0.5/0.25/0.25,0.25/0.25/0.5,0/0/1 [--seeds 3] [--scale cpu] [--range edge]

The stages (`STAGES`), all on the ops of one band of the base's competence (`--range`, default the edge):
- `midtrain`: continued pre-training, 80% problems of the range and 20% replay of the pre-training stream, at the
  re-warmed mid-training lr (the scale's `midtrain` block);
- `sft`: chat SFT on the range's gold solutions (the scale's `sft` block); the stages after it read chat prompts;
- `rl`: GRPO with the strict reward on the range (the scale's `rl` block), on documents straight after the base or
  mid-training, on chat prompts after SFT.
A stage given FLOPs runs the steps that spend them (RL: until its measured FLOPs, sampling included, reach its share).
Runs live in `--workdir` by config hash like every experiment's: a re-run resumes, and two commands that need the
same pipeline share it. Results: `experiments/results/allocation-<stages>/` at cpu scale (`--out` to choose), with
each split's gain over the base per claim row. `experiments.compute_allocation` is this tool's mid-training vs RL
preset.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import numpy as np

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, Scale, cells, chosen, colors, competence_bands, error_bars, \
    fmt, markdown_table, parse_args, per_op_summary, pipeline, rl_max_new_tokens, rl_prompt_len, stage, summary, \
    write_results
from experiments.common import check as check_results


def midtrain_stage(scale: Scale, ops: tuple[int, int], seed: int, **kw) -> dict:
  return stage(scale.midtrain, "midtrain", **kw, **{
      "data.sources": (dict(name="midtrain", format="pretrain", task=dict(op_range=ops)),
                       dict(name="replay", format="pretrain", seed=0)),
      "data.schedule": ((0, dict(midtrain=0.8, replay=0.2)),), "data.schedule_interp": "constant",
      "data.seed": 200 + seed})


def sft_stage(scale: Scale, ops: tuple[int, int], seed: int, **kw) -> dict:
  return stage(scale.sft, "sft", **kw, **{"data.task.op_range": ops, "data.seed": 300 + seed})


def rl_stage(scale: Scale, ops: tuple[int, int], seed: int, base, chat: bool = False, **kw) -> dict:
  return stage(scale.rl, "rl", **kw, **{
      "data.task.op_range": ops, "data.seed": 100 + seed,
      "grpo.rollout.max_new_tokens": rl_max_new_tokens(scale, ops[1]),
      **rl_prompt_len(scale, base, ops, chat=chat), **({"data.prompt": "chat"} if chat else {})})


BASE = "base"  # the shared base, evaluated with the splits' protocol
STAGES: dict[str, Callable[..., dict]] = {"midtrain": midtrain_stage, "sft": sft_stage, "rl": rl_stage}


def parse_splits(text: str, stages: Sequence[str]) -> list[tuple[float, ...]]:
  """`"0.5/0.25/0.25,0/0/1"` -> [(0.5, 0.25, 0.25), (0, 0, 1)]: one share per stage, summing to 1."""
  splits = []
  for part in text.split(","):
    try:
      shares = tuple(float(x) for x in part.split("/"))
    except ValueError:
      raise SystemExit(f"--splits: {part!r} is not shares separated by '/' (e.g. 0.5/0.25/0.25)") from None
    if len(shares) != len(stages) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
      raise SystemExit(f"--splits: {part!r} needs {len(stages)} non-negative shares (one per stage of "
                       f"{','.join(stages)}) summing to 1")
    splits.append(shares)
  return splits


def arm_name(stages: Sequence[str], shares: Sequence[float]) -> str:
  """`midtrain50-sft25-rl25`."""
  return "-".join(f"{s}{round(100 * x)}" for s, x in zip(stages, shares))


def arm_pipeline(scale: Scale, stages: Sequence[str], shares: Sequence[float], budget: float, base, seed: int,
                 ops: tuple[int, int], eval_ops: Sequence[int], problems: int, experiment: str) -> dict:
  entries, chat = [], False
  for name, share in zip(stages, shares):
    if share == 0:
      continue
    kw = dict(start=None if entries else base, flops=share * budget)
    entries.append(rl_stage(scale, ops, seed, base, chat=chat, **kw) if name == "rl"
                   else STAGES[name](scale, ops, seed, **kw))
    chat = chat or name == "sft"
  return pipeline(scale, f"{experiment}-{arm_name(stages, shares)}-{seed}", entries, seed, eval_ops=eval_ops,
                  problems=problems)


def plot(results: dict, ops: list[int], ks: list[int], path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  arms = list(results["arms"])
  color = colors([f"op {op}" for op in ops])
  xs = list(range(len(arms)))
  for ax, k in zip(axes, (ks[0], ks[-1])):
    for op in ops:
      ax.axhline(results["base"][str(op)][f"pass@{k}"]["mean"], ls=":", lw=0.8, color=color[f"op {op}"])
      points = [error_bars(results, arm, [(f"p/{op}", f"pass@{k}")]) for arm in arms]
      if points:
        ax.errorbar(xs, [means[0] for means, _ in points], yerr=np.hstack([yerr for _, yerr in points]), marker="o",
                    capsize=3, color=color[f"op {op}"], label=f"op {op}")
    ax.set_xticks(xs, ["/".join(str(round(100 * s)) for s in results["arms"][a]["shares"].values()) for a in arms],
                  fontsize=7, rotation=30)
    ax.set_xlabel(f"split of the budget (%): {' / '.join(results['stages'])}")
    ax.set_ylabel(f"strict pass@{k} (95% bootstrap interval)")
    ax.set_title("dotted: the base", fontsize=9)
    ax.set_ylim(0, 1)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def allocate(args: argparse.Namespace, experiment: str, stages: Sequence[str], splits: Sequence[Sequence[float]],
             budget: float, band: str = "edge", claims: Callable[[list[str], int], list[Claim]] | None = None) -> dict:
  """Runs every split (`args.seeds` seeds each) from the shared base, evaluates each on the band's ops and the first
  too-hard op (the scale's problems per op), writes the results and returns them. `claims(arm names, k)`: the
  experiment's own claims (default: each split's gain over the base at pass@1 and the largest k)."""
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  unknown = [s for s in stages if s not in STAGES]
  if unknown or len(set(stages)) != len(stages):
    raise SystemExit(f"--stages: {','.join(stages)} must name distinct stages among {','.join(STAGES)}")
  base = ensure_base(scale, args.workdir)
  base_eval = evidence.start(BASE, base)
  bands = competence_bands(scale, base_eval)
  lo, hi = bands["ranges"][band]
  ops = sorted({*range(lo, hi + 1), bands["ranges"]["too-hard"][0]})
  ks = list(scale.eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  problems = scale.eval["problems"]
  base_cells = cells(base_eval)
  results = {"stages": list(stages), "budget_flops": budget, "range": [lo, hi], "band": band,
             "base": {str(op): {m: summary([base_cells[("p", op)][m]]) for m in metrics} for op in ops}, "arms": {}}
  names = {arm_name(stages, s): s for s in splits}
  for name in chosen(list(names), args):
    shares = names[name]
    per_seed, flops, steps = [], [], []
    for seed in range(args.seeds):
      report, _ = evidence.run(arm_pipeline(scale, stages, shares, budget, base, seed, (lo, hi), ops, problems,
                                            experiment), name, seed)
      per_seed.append(cells(report["stages"][-1]["eval"]))
      flops.append({r["stage"]: (r["planned_flops"], r["flops"]) for r in report["stages"]})
      steps.append({r["stage"]: r["steps"] for r in report["stages"]})
    results["arms"][name] = {"shares": dict(zip(stages, shares)), "flops": flops, "steps": steps,
                             "eval": per_op_summary(per_seed, ops, metrics)}
  arms = list(results["arms"])
  if claims is None:
    claims = lambda arms, k: [Claim(f"{a}: gain over the base", a, BASE, (lo, hi), m, +1)
                              for a in arms for m in ("pass@1", f"pass@{k}")]
  kmax = ks[-1]
  header = ["split", f"steps ({' / '.join(stages)})", "FLOPs spent", *[f"op {op} pass@1" for op in ops],
            *[f"op {op} pass@{kmax}" for op in ops]]
  rows = [["(base)", "", "", *[fmt(results["base"][str(op)]["pass@1"]) for op in ops],
           *[fmt(results["base"][str(op)][f"pass@{kmax}"]) for op in ops]]]
  for name, arm in results["arms"].items():
    spent = summary([sum(f[1] for f in fl.values()) for fl in arm["flops"]])
    rows.append([" / ".join(f"{s} {round(100 * x)}%" for s, x in arm["shares"].items()),
                 " / ".join(str(arm["steps"][0].get(s, 0)) for s in stages), f"{spent['mean']:.3g}",
                 *[fmt(arm["eval"][str(op)]["pass@1"]) for op in ops],
                 *[fmt(arm["eval"][str(op)][f"pass@{kmax}"]) for op in ops]])
  md = (f"A budget of {budget:.3g} FLOPs after the base, split between {', '.join(stages)} (in that order) on ops "
        f"{lo}-{hi} (the {band} band). Strict pass@k (%) on context p, {problems} problems x {scale.eval['n']} "
        f"samples per op at temperature {scale.eval['temperature']}, with the prompts of each pipeline's last stage; "
        f"mean ± spread over {args.seeds} seeds (steps of seed 0).\n\n" + markdown_table(header, rows))
  write_results(args, experiment, results, md, plot=lambda p: plot(results, ops, ks, p), evidence=evidence,
                claims=claims(arms, kmax), bands=bands)
  print(md)
  return results


def main(argv=None) -> None:
  def extra(parser):
    parser.add_argument("--stages", required=True, help=f"comma-separated, in order, among {','.join(STAGES)}")
    parser.add_argument("--budget", type=float, default=None, help="FLOPs after the base (default: the scale's)")
    parser.add_argument("--splits", required=True, help="one share per stage, '/'-separated, splits ','-separated")
    parser.add_argument("--range", default="edge", help="the band whose ops every stage trains on")
  args = parse_args("allocation", __doc__, argv, extra=extra)
  stages = args.stages.split(",")
  experiment = f"allocation-{'-'.join(stages)}"
  if args.check:
    return check_results(args, experiment)
  if args.range not in SCALES[args.scale].ranges:
    raise SystemExit(f"--range {args.range!r}: one of {list(SCALES[args.scale].ranges)}")
  allocate(args, experiment, stages, parse_splits(args.splits, stages),
           args.budget or SCALES[args.scale].budget_flops, band=args.range)


if __name__ == "__main__":
  main()
