"""How does RL scale with model size, compute and data, and what does re-using RL data cost? GRPO from bases of three
sizes pre-trained on the same tokens, the held-out error (1 − strict pass@1) against RL compute and against RL data
with a power-law fit per size; and the same number of RL steps from many prompts seen once against τ = 4 and 16
epochs over 4x and 16x fewer prompts.

  python -m experiments.rl_scaling [--seeds 3] [--scale cpu]

The claim (Tan et al. 2025, "Scaling behaviors of LLM reinforcement learning post-training", Qwen2.5 0.5B-72B): the
error falls as a power law in RL compute and in data, larger models reach a lower error with a steeper (more
efficient) curve, and re-using data for up to ~τ = 25 epochs costs little against fresh data.

Every size is pre-trained with the shared base's recipe (same data, steps and seed; `experiments.base`), then RL on
the in-distribution band of the shared base (`common.competence_bands`) with the edge_of_competence settings (its
2-layer runs are shared). The error curve comes from the RL samples themselves: with an endless prompt stream every
step's prompts are new, so the pass rate of a step's samples (before its update) is a held-out estimate; each
logged point averages `stage.log_every` steps. The error after RL is from the evaluation.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, competence_bands, error_bars, fmt, \
    markdown_table, mean_over_ops, model_params, parse_args, per_op_summary, rl_pipeline, rl_shape, stage_metrics, \
    summary, write_results
from experiments.common import check as check_results

REUSE = (1, 4, 16)  # epochs over the prompts (1: every prompt new)


def claims(sizes: list[str]) -> list[Claim]:
  """On the in-distribution ops, strict pass@1 (= 1 - error); the fitted exponents have no per-problem counts."""
  return [Claim("the largest model ends RL with a lower error than the smallest", sizes[-1], sizes[0],
                "in-distribution"),
          *(Claim(f"{size}: RL lowers the error", size, f"{size} base", "in-distribution") for size in sizes),
          Claim("16 epochs over 16x fewer prompts cost little", "τ = 16", "τ = 1", "in-distribution", sign=0)]


def size_base(scale, args, size: str):
  return ensure_base(scale, args.workdir, **{f"model.{k}": v for k, v in scale.sizes[size].items()})


def power_law(xs: list[float], ys: list[float]) -> dict:
  """Least-squares fit of log y = log a − b log x: {a, b, r2} (y = a x^−b); NaNs for fewer than two points."""
  if len(set(xs)) < 2:
    return {"a": math.nan, "b": math.nan, "r2": math.nan}
  lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-6)) for y in ys]
  mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
  sxx = sum((x - mx) ** 2 for x in lx)
  slope = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
  intercept = my - slope * mx
  ss_tot = sum((y - my) ** 2 for y in ly)
  ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(lx, ly))
  return {"a": math.exp(intercept), "b": -slope, "r2": 1 - ss_res / ss_tot if ss_tot else 0.0}


def error_curve(run_dir, log_every: int, rollouts_per_step: int) -> list[dict]:
  """(RL FLOPs, rollouts, error) at the middle of every logged window of the RL samples' strict pass rate."""
  rows = stage_metrics(run_dir, "rl", ["pass_rate", "flops"])
  out = []
  for r in rows:
    mid = r["step"] - (log_every - 1) / 2  # the window's middle step
    out.append({"step": r["step"], "flops": r["flops"] * mid / r["step"], "rollouts": mid * rollouts_per_step,
                "error": 1 - r["pass_rate"]})
  return out


def plot(results: dict, path) -> None:
  import matplotlib.pyplot as plt
  from matplotlib.ticker import NullFormatter
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  color = colors(list(results["sizes"]))
  for size, s in results["sizes"].items():
    for ax, x in ((axes[0], "flops"), (axes[1], "rollouts")):
      xs, ys = [p[x] for p in s["curve"]], [p["error"] for p in s["curve"]]
      ax.plot(xs, ys, "o", ms=3, label=f"{size} ({s['params'] / 1e6:.2f}M)", color=color[size])
      fit = s[f"fit_{x}"]
      ax.plot(xs, [fit["a"] * v ** -fit["b"] for v in xs], "-", lw=1, color=color[size])
  for ax, label in ((axes[0], "RL FLOPs"), (axes[1], "RL rollouts")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.set_ylabel("error of the RL samples (1 − strict pass rate)")
    ax.set_title("seed mean per logged window; line: power-law fit", fontsize=8)
  axes[0].legend(fontsize=7)
  taus = list(results["reuse"])
  for i, op in enumerate(results["reuse_ops"]):
    points = [error_bars(results, f"τ = {t}", [(f"p/{op}", "pass@1")]) for t in taus]
    axes[2].bar([j + 0.35 * i for j in range(len(taus))], [means[0] for means, _ in points], 0.35, capsize=3,
                yerr=np.hstack([yerr for _, yerr in points]) if points else None, label=f"op {op}", color=f"C{i}")
    axes[2].axhline(results["reuse_base"][str(op)], ls=":", lw=0.8, color=f"C{i}")
  axes[2].set_xticks([j + 0.175 for j in range(len(taus))], [f"τ = {t}" for t in taus])
  axes[2].set_xlabel("epochs over the RL prompts")
  axes[2].set_ylabel("pass@1 after RL (95% int.; dotted: base)")
  axes[2].set_ylim(0, 1)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("rl_scaling", __doc__, argv)
  if args.check:
    return check_results(args, "rl_scaling")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  shared = ensure_base(scale, args.workdir)  # the shared base: the bands, the data reuse runs
  bands = competence_bands(scale, evidence.start("base", shared))
  lo, hi = bands["ranges"]["in-distribution"]
  ops = list(range(lo, hi + 1))
  ks = list(scale.eval["ks"])
  rl = rl_shape(scale)
  per_step = rl["batch"] * rl["group"]
  results = {"ops": ops, "sizes": {}, "reuse": {}, "reuse_ops": ops}
  for size in chosen(list(scale.sizes), args):
    base = size_base(scale, args, size)
    model = {**scale.model, **scale.sizes[size]}
    base_cells = cells(evidence.start(f"{size} base", base))
    curves, errors, flops = [], [], []
    for seed in range(args.seeds):
      config = rl_pipeline(scale, f"edge_of_competence-in-distribution-{seed}" if model == scale.model
                           else f"rl_scaling-{size.replace(' ', '')}-{seed}", base, (lo, hi), seed, model=model)
      report, run_dir = evidence.run(config, size, seed)
      after = cells(report["stages"][-1]["eval"])
      errors.append(1 - mean_over_ops(after, ops))
      flops.append(report["total_flops"])
      curves.append(error_curve(run_dir, rl["log_every"], per_step))
    curve = [{k: sum(c[i][k] for c in curves) / len(curves) for k in curves[0][i]} for i in range(len(curves[0]))]
    results["sizes"][size] = {
        "params": model_params(base), "base_folder": base.name,
        "base_error": 1 - mean_over_ops(base_cells, ops),
        "error_after": summary(errors), "flops": summary(flops), "curve": curve, "curves": curves,
        "fit_flops": power_law([p["flops"] for p in curve], [p["error"] for p in curve]),
        "fit_rollouts": power_law([p["rollouts"] for p in curve], [p["error"] for p in curve])}

  # data reuse: the shared base (the scale's own size), the same steps over fewer prompts
  base_cells = evidence.evals["base"][0]["cells"]  # (context, op) -> cell
  results["reuse_base"] = {str(op): base_cells[("p", op)]["pass@1"] for op in ops}
  prompts = scale.rl_steps * rl["batch"]
  for tau in REUSE if not args.arms else ():  # --arms picks sizes; the reuse runs only in a full run
    per_seed = []
    for seed in range(args.seeds):
      # τ > 1: evaluated on the RL ops only (each op's problems and samples are the same with or without the others)
      extra = {} if tau == 1 else {"data.num_examples": max(1, prompts // tau), "eval_ops": ops}
      name = f"edge_of_competence-in-distribution-{seed}" if tau == 1 else f"rl_scaling-reuse{tau}-{seed}"
      report, _ = evidence.run(rl_pipeline(scale, name, shared, (lo, hi), seed, **extra), f"τ = {tau}", seed)
      per_seed.append(cells(report["stages"][-1]["eval"]))
    results["reuse"][tau] = {"prompts": max(1, prompts // tau),
                             "eval": per_op_summary(per_seed, ops, [f"pass@{k}" for k in ks])}

  rows = []
  for size, s in results["sizes"].items():
    gain = summary([100 * (s["base_error"] - e) / (f / 1e15) for e, f in zip(s["error_after"]["values"],
                                                                             s["flops"]["values"])])
    rows.append([size, f"{s['params'] / 1e6:.2f}M", f"{100 * s['base_error']:.1f}", fmt(s["error_after"]),
                 f"{s['flops']['mean']:.3g}", fmt(gain, 1, 0),
                 f"{s['curve'][0]['error'] * 100:.1f} → {s['curve'][-1]['error'] * 100:.1f}",
                 f"{s['fit_flops']['b']:.3f} (R² {s['fit_flops']['r2']:.2f})",
                 f"{s['fit_rollouts']['b']:.3f} (R² {s['fit_rollouts']['r2']:.2f})"])
  kmax = ks[-1]
  reuse_rows = [[f"τ = {t}", r["prompts"], *[fmt(r["eval"][str(op)]["pass@1"]) for op in ops],
                 *[fmt(r["eval"][str(op)][f"pass@{kmax}"]) for op in ops]] for t, r in results["reuse"].items()]
  md = (f"GRPO on ops {lo}-{hi} for {scale.rl_steps} steps ({per_step} rollouts a step) from bases of each size "
        f"pre-trained on the same tokens. Error = 1 − strict pass@1, mean over ops {lo}-{hi}; after RL from the "
        f"evaluation ({scale.eval['problems']} problems x {scale.eval['n']} samples per op), along RL from the "
        f"samples of each logged window (new prompts every step). Fit: error = a · x^−b over the windows (mean of "
        f"{args.seeds} seeds); b is the exponent.\n\n"
        + markdown_table(["size", "parameters", "base error %", "error after RL %", "RL FLOPs",
                          "points of error removed per PFLOP", "RL-sample error % (first → last window)",
                          "b vs FLOPs", "b vs rollouts"], rows)
        + f"\nData reuse on the {scale.model.get('num_layers', '')}-layer base: {scale.rl_steps} steps from "
          f"{prompts} prompts seen once (τ = 1) or τ epochs over {prompts} / τ prompts. Strict pass@k (%):\n\n"
        + markdown_table(["epochs", "prompts", *[f"op {op} pass@1" for op in ops],
                          *[f"op {op} pass@{kmax}" for op in ops]], reuse_rows))
  write_results(args, "rl_scaling", results, md, plot=lambda p: plot(results, p), evidence=evidence,
                claims=claims(list(scale.sizes)), bands=bands)
  print(md)


if __name__ == "__main__":
  main()
