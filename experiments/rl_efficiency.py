"""Where is RL efficient? The gain per 1k rollouts of RL on four prompt buckets (too easy, in-distribution, the edge,
too hard) against the base's pass rate on the bucket, next to the reward entropy H(p) and the fraction of
zero-variance groups, and against SFT on the gold solutions of the same buckets.

  python -m experiments.rl_efficiency [--seeds 3] [--scale cpu]

The claim (Ord; Patel, "bits per sample"): a sampled reward with success probability p carries at most H(p) bits, so
RL learns fastest where the pass rate is moderate and nothing where it is 0 or 1; there every GRPO group of G samples
has zero reward variance (probability p^G + (1 − p)^G) and no gradient. SFT on gold solutions is not limited that way.

The RL arms are edge_of_competence's runs (shared by config hash). The base's per-problem pass rates p_i come from
its evaluation (n samples of each eval problem of the bucket's ops), so H(p) = mean_i H(p_i) in bits and the expected
zero-variance fraction is mean_i (p_i^G + (1 − p_i)^G); the observed one is the RL run's own, in its first logged
steps and over the whole run (the rest are the informative rollouts, the only ones with a non-zero advantage). The
SFT arm trains on the gold solutions of the bucket's problems as documents (the pre-training format, loss on every
token) at the mid-training lr, as many steps as RL, on the RL arm's own prompts (the same task, seed and problem
indices, revisited over epochs). Gain = strict pass@1 after − before on the bucket's evaluated ops. The buckets are
the bands of the base's measured competence (`common.competence_bands`), else the scale's fixed ranges.
"""

from __future__ import annotations

import math
from pathlib import Path

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, competence_bands, fmt, \
    markdown_table, mean_over_ops, parse_args, pipeline, rl_data, rl_pipeline, rl_shape, stage, stage_metrics, \
    summary, write_results
from experiments.common import check as check_results
from jaxstages.config import load_config
from jaxstages.data import tasks
from jaxstages.data.tokenizer import load_tokenizer

BUCKETS = ("too-easy", "in-distribution", "edge", "too-hard")
CLAIMS = [Claim("RL on the edge raises strict pass@1 there", "RL edge", "base", "edge"),
          Claim("RL on in-distribution problems raises strict pass@1 there", "RL in-distribution", "base",
                "in-distribution"),
          Claim("RL on too-hard problems gains nothing (no reward)", "RL too-hard", "base", "too-hard", sign=0),
          Claim("SFT on gold solutions gains where RL cannot (too hard)", "SFT too-hard", "RL too-hard", "too-hard")]


def entropy_bits(p: float) -> float:
  """H(p) of a Bernoulli reward, in bits."""
  return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bucket_ops(scale, ranges, bucket: str) -> list[int]:
  lo, hi = ranges[bucket]
  return [op for op in range(lo, hi + 1) if op in scale.eval_ops]


def base_statistics(base_cells: dict, ops: list[int], group: int) -> dict:
  """The base's pass rate on the bucket, mean H(p_i) and the expected zero-variance fraction of groups of `group`."""
  per_problem = [c / base_cells[("p", op)]["samples"] for op in ops for c in base_cells[("p", op)]["correct"]]
  return {"pass_rate": sum(per_problem) / len(per_problem),
          "entropy_bits": sum(entropy_bits(p) for p in per_problem) / len(per_problem),
          "zero_variance_expected": sum(p ** group + (1 - p) ** group for p in per_problem) / len(per_problem)}


def sft_pipeline(scale, ranges, bucket: str, base, seed: int) -> dict:
  lo, hi = ranges[bucket]
  rl_task = rl_data(scale).task
  # the RL arm's prompts: the same task, seed and indices (the first steps x batch of the stream), revisited
  sft = stage(scale.midtrain, "sft", start=base, steps=scale.rl_steps, **{
      "data.sources": (dict(name="gold", format="pretrain", task=dict(op_range=(lo, hi))),),
      "data.task.contexts": rl_task.contexts, "data.schedule": (), "data.seed": 100 + seed,
      "data.num_examples": scale.rl_steps * rl_shape(scale)["batch"], "data.batch_size": rl_shape(scale)["batch"]})
  return pipeline(scale, f"rl_efficiency-sft-{bucket}-{seed}", [sft], seed,
                  eval_ops=bucket_ops(scale, ranges, bucket))


def documents_per_step(scale, ranges, base, bucket: str) -> float:
  """Gold-solution documents in one SFT step (rows x row length / the mean document's tokens)."""
  tok = load_tokenizer(Path(base) / "tokenizer")
  data = rl_data(scale)
  lo, hi = ranges[bucket]
  lengths = [len(tok.encode(tasks.generate(data.task, 0, "train", i, op=lo + i % (hi - lo + 1)).text())) + 1
             for i in range(256)]
  seq_len = scale.midtrain["overrides"].get("data.seq_len", load_config(scale.midtrain["config"]).data.seq_len)
  return rl_shape(scale)["batch"] * seq_len / (sum(lengths) / len(lengths))


def plot(results: dict, path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
  buckets = list(results["buckets"])
  color = colors(["rl", "sft"])
  p = [results["buckets"][b]["base"]["pass_rate"] for b in buckets]
  for kind, marker in (("rl", "o"), ("sft", "s")):
    ys = [results["buckets"][b][kind]["gain_per_1k"]["mean"] for b in buckets]
    ends = [results["buckets"][b][kind]["gain_per_1k_interval"] for b in buckets]
    es = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ends)], [max(0.0, hi - y) for y, (_, hi) in zip(ys, ends)]]
    axes[0].errorbar(p, ys, yerr=es, marker=marker, capsize=3, ls="", color=color[kind],
                     label="RL (per 1k rollouts)" if kind == "rl" else "SFT (per 1k gold solutions)")
  for b, x in zip(buckets, p):
    axes[0].annotate(b, (x, results["buckets"][b]["rl"]["gain_per_1k"]["mean"]), fontsize=7)
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set_xlabel("base pass rate on the bucket")
  axes[0].set_ylabel("pass@1 gain per 1k (points, 95% int.)")
  axes[0].legend(fontsize=7)
  xs = [i / 100 for i in range(101)]
  axes[1].plot(xs, [entropy_bits(x) for x in xs], color="0.6", label="H(p) of one reward")
  axes[1].scatter(p, [results["buckets"][b]["base"]["entropy_bits"] for b in buckets], label="mean H(p_i), base")
  axes[1].set_xlabel("base pass rate")
  axes[1].set_ylabel("bits per sample")
  axes[1].legend(fontsize=7)
  axes[2].scatter(p, [results["buckets"][b]["base"]["zero_variance_expected"] for b in buckets], label="expected")
  axes[2].scatter(p, [results["buckets"][b]["rl"]["zero_variance_observed"]["mean"] for b in buckets], marker="x",
                  label="observed (RL, first steps)")
  axes[2].scatter(p, [results["buckets"][b]["rl"]["zero_variance_run"]["mean"] for b in buckets], marker="+",
                  label="observed (RL, whole run)")
  axes[2].set_xlabel("base pass rate")
  axes[2].set_ylabel("share of zero-variance groups")
  axes[2].set_ylim(0, 1.02)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("rl_efficiency", __doc__, argv)
  if args.check:
    return check_results(args, "rl_efficiency")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  base = ensure_base(scale, args.workdir)
  base_eval = evidence.start("base", base)
  bands = competence_bands(scale, base_eval)
  ranges = bands["ranges"]
  base_cells = cells(base_eval)
  group = rl_shape(scale)["group"]
  rollouts = scale.rl_steps * rl_shape(scale)["batch"] * group
  results = {"rollouts": rollouts, "group_size": group, "buckets": {}}
  for bucket in chosen(BUCKETS, args):
    ops = bucket_ops(scale, ranges, bucket)
    before = mean_over_ops(base_cells, ops)
    docs = scale.rl_steps * documents_per_step(scale, ranges, base, bucket)
    arm = {"ops": ops, "base": base_statistics(base_cells, ops, group), "sft_documents": docs}
    for kind in ("rl", "sft"):
      gains, flops, zero_var, zero_var_run = [], [], [], []
      for seed in range(args.seeds):
        config = (rl_pipeline(scale, f"edge_of_competence-{bucket}-{seed}", base, ranges[bucket], seed)
                  if kind == "rl" else sft_pipeline(scale, ranges, bucket, base, seed))
        report, run_dir = evidence.run(config, f"{kind.upper()} {bucket}", seed)
        after = cells(report["stages"][-1]["eval"])
        gains.append(mean_over_ops(after, ops) - before)
        flops.append(report["total_flops"])
        if kind == "rl":
          logged = [r["zero_variance_groups"] for r in stage_metrics(run_dir, "rl", ["zero_variance_groups"])]
          zero_var.append(logged[0])
          zero_var_run.append(sum(logged) / len(logged))  # the rows are means over equal spans of steps
      seen = rollouts if kind == "rl" else docs
      gain = evidence.claim(Claim("gain", f"{kind.upper()} {bucket}", "base", tuple(ops)), ranges)
      arm[kind] = {"gain": summary(gains), "gain_per_1k": summary([100 * g / (seen / 1000) for g in gains]),
                   "gain_per_1k_interval": [100 * gain[e] / (seen / 1000) for e in ("low", "high")],
                   "gain_per_pflop": summary([100 * g / (f / 1e15) for g, f in zip(gains, flops)]),
                   "flops": summary(flops)}
      if kind == "rl":
        # the rollouts in groups with reward variance over the whole run: the only ones GRPO learns from
        # (undefined for a seed that had none)
        informative = [rollouts * (1 - z) for z in zero_var_run]
        per_informative = [100 * g / (n / 1000) for g, n in zip(gains, informative) if n > 0]
        arm[kind].update(zero_variance_observed=summary(zero_var), zero_variance_run=summary(zero_var_run),
                         informative_rollouts=summary(informative),
                         gain_per_1k_informative=summary(per_informative) if per_informative else None)
    results["buckets"][bucket] = arm

  rows = []
  for bucket, a in results["buckets"].items():
    lo, hi = ranges[bucket]
    per_informative = fmt(a["rl"]["gain_per_1k_informative"], 1, 2) if a["rl"]["gain_per_1k_informative"] else "–"
    rows.append([f"{bucket} ({lo}-{hi})", f"{100 * a['base']['pass_rate']:.1f}", f"{a['base']['entropy_bits']:.3f}",
                 f"{100 * a['base']['zero_variance_expected']:.0f}", fmt(a["rl"]["zero_variance_observed"], digits=0),
                 fmt(a["rl"]["zero_variance_run"], digits=0), fmt(a["rl"]["gain"]),
                 fmt(a["rl"]["gain_per_1k"], 1, 2), per_informative, fmt(a["sft"]["gain"]),
                 fmt(a["sft"]["gain_per_1k"], 1, 2), fmt(a["rl"]["gain_per_pflop"], 1, 1),
                 fmt(a["sft"]["gain_per_pflop"], 1, 1)])
  header = ["bucket (ops)", "base pass rate %", "mean H(p_i) bits", "zero-var. groups expected %",
            "observed, first steps %", "observed, whole run %", "RL gain (points)", "RL gain / 1k rollouts",
            "RL gain / 1k informative rollouts", "SFT gain (points)",
            "SFT gain / 1k solutions", "RL gain / PFLOP", "SFT gain / PFLOP"]
  md = (f"Strict pass@1 gain on each bucket's evaluated ops ({scale.eval['problems']} problems x {scale.eval['n']} "
        f"samples per op at temperature {scale.eval['temperature']}) after {scale.rl_steps} steps of RL "
        f"({rollouts} rollouts, groups of {group}) or SFT on gold solutions (~{round(docs)} documents for the last "
        f"bucket); mean ± spread over {args.seeds} seeds. Base statistics from the base's evaluation of the same "
        f"ops; zero-variance groups observed in RL's first logged steps and over its whole run; informative "
        f"rollouts: those in groups with reward variance over the run (GRPO's advantage is 0 in the others).\n\n"
        + markdown_table(header, rows))
  write_results(args, "rl_efficiency", results, md, plot=lambda p: plot(results, p), evidence=evidence,
                claims=CLAIMS, bands=bands)
  print(md)


if __name__ == "__main__":
  main()
