"""Does a small model gain more from a strong teacher than from RL? For the smallest of rl_scaling's bases (the
student), distillation from the largest (the teacher; both pre-trained on the same tokens with one tokenizer)
against RL, at equal compute with the teacher's FLOPs counted: off-policy distillation (the teacher's own samples,
forward KL) and on-policy distillation (the student's samples, reverse KL to the teacher at every token).

  python -m experiments.distill_vs_rl [--seeds 3] [--scale cpu]

The claim (Qwen3 technical report, strong-to-weak distillation; Agarwal et al. 2024, GKD; Thinking Machines 2025,
"On-policy distillation"): for small models distillation from a strong teacher beats RL at a fraction of the
compute, and on-policy distillation (on the student's own samples, dense per-token signal) beats off-policy
distillation, which trains on states the student does not reach.

The RL arm is rl_scaling's smallest size (the same runs). Each distillation arm gets the FLOPs that seed's RL run
spent, as a budget the stage turns into steps from its planned cost per step (the teacher's forwards and the
sampling, every row to the token limit: an upper bound, so it spends somewhat less). Prompts: the in-distribution
range (the shared base's band, as rl_scaling's) as documents, 32 a step, one completion each.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, competence_bands, error_bars, fmt, \
    markdown_table, model_params, parse_args, per_op_summary, pipeline, rl_max_new_tokens, rl_pipeline, rl_prompt_len, \
    run, stage, summary, write_results
from experiments.common import check as check_results
from experiments.rl_scaling import size_base

ARMS = {"rl": "RL (GRPO)", "off-policy": "off-policy distillation (teacher samples, forward KL)",
        "on-policy": "on-policy distillation (student samples, reverse KL)"}
CLAIMS = [Claim("on-policy distillation beats RL", "on-policy", "rl", "in-distribution"),
          Claim("off-policy distillation beats RL", "off-policy", "rl", "in-distribution"),
          Claim("on-policy distillation beats off-policy", "on-policy", "off-policy", "in-distribution"),
          Claim("RL gains over the student", "rl", "student", "in-distribution")]


def model_shape(folder: Path) -> dict:
  """A base's model block (without the vocabulary, which the tokenizer sets)."""
  model = json.loads((Path(folder) / "config.json").read_text())["model"] if (Path(folder) / "config.json").exists() \
      else json.loads((Path(folder) / "model_config.json").read_text())
  return {k: v for k, v in model.items() if k != "vocab_size"}


def distill_pipeline(scale, arm: str, student, teacher, seed: int, flops: float, ops: tuple[int, int]) -> dict:
  lo, hi = ops
  on = arm == "on-policy"
  s = stage(scale.distill, "distill", start=student, flops=flops, **{
      "distill.teacher": str(teacher), "distill.on_policy_fraction": 1.0 if on else 0.0,
      "distill.off_policy": "teacher", "distill.divergence": "reverse_kl" if on else "forward_kl",
      "distill.max_new_tokens": rl_max_new_tokens(scale, hi), "distill.seed": seed, "data.task.op_range": (lo, hi),
      "data.seed": 100 + seed, **rl_prompt_len(scale, student, (lo, hi))})
  return pipeline(scale, f"distill_vs_rl-{arm}-{seed}", [s], seed, model=model_shape(student))


def plot(results: dict, ops: list[int], ks: list[int], path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  labels = ["student", "teacher", *results["arms"]]
  color = colors(["student", "teacher", *ARMS])
  for ax, k in zip(axes, (ks[0], ks[-1])):
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
      means, yerr = error_bars(results, label, [(f"p/{op}", f"pass@{k}") for op in ops])
      ax.bar([j + i * width for j in range(len(ops))], means, width, yerr=yerr, capsize=2, label=label,
             color=color[label])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], [f"op {op}" for op in ops])
    ax.set_xlabel("evaluated op")
    ax.set_ylabel(f"strict pass@{k} (95% bootstrap interval)")
    ax.set_ylim(0, 1)
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("distill_vs_rl", __doc__, argv)
  if args.check:
    return check_results(args, "distill_vs_rl")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  sizes = list(scale.sizes)
  student, teacher = size_base(scale, args, sizes[0]), size_base(scale, args, sizes[-1])
  bands = competence_bands(scale, evidence.start("base", ensure_base(scale, args.workdir)))
  lo, hi = bands["ranges"]["in-distribution"]
  ops, ks = list(scale.eval_ops), list(scale.eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  results = {"student_size": sizes[0], "teacher_size": sizes[-1], "student_params": model_params(student),
             "teacher_params": model_params(teacher),
             "student": per_op_summary([cells(evidence.start("student", student))], ops, metrics),
             "teacher": per_op_summary([cells(evidence.start("teacher", teacher))], ops, metrics),
             "arms": {}}
  model = {**scale.model, **scale.sizes[sizes[0]]}
  rl_flops = []
  for seed in range(args.seeds):  # the RL arm sets every seed's budget (recorded with the arms below)
    name = f"rl_scaling-{sizes[0].replace(' ', '')}-{seed}"
    report, _ = run(rl_pipeline(scale, name, student, (lo, hi), seed, model=model), args.workdir, scale)
    rl_flops.append(report["total_flops"])
  for arm in chosen(list(ARMS), args):
    per_seed, flops, steps = [], [], []
    for seed in range(args.seeds):
      config = (rl_pipeline(scale, f"rl_scaling-{sizes[0].replace(' ', '')}-{seed}", student, (lo, hi), seed,
                            model=model) if arm == "rl"
                else distill_pipeline(scale, arm, student, teacher, seed, rl_flops[seed], (lo, hi)))
      report, _ = evidence.run(config, arm, seed)
      per_seed.append(cells(report["stages"][-1]["eval"]))
      flops.append(report["total_flops"])
      steps.append(report["stages"][-1]["steps"])
    results["arms"][arm] = {"flops": summary(flops), "steps": steps, "eval": per_op_summary(per_seed, ops, metrics)}

  kmax = ks[-1]
  header = ["model / arm", "steps", "FLOPs", *[f"op {op} pass@1" for op in ops],
            *[f"op {op} pass@{kmax}" for op in ops]]
  row = lambda name, steps, flops, ev: [name, steps, flops, *[fmt(ev[str(op)]["pass@1"]) for op in ops],
                                        *[fmt(ev[str(op)][f"pass@{kmax}"]) for op in ops]]
  rows = [row(f"student: {sizes[0]} base ({results['student_params'] / 1e6:.2f}M)", "", "", results["student"]),
          row(f"teacher: {sizes[-1]} base ({results['teacher_params'] / 1e6:.2f}M)", "", "", results["teacher"])]
  rows += [row(ARMS[a], "/".join(map(str, r["steps"])), f"{r['flops']['mean']:.3g}", r["eval"])
           for a, r in results["arms"].items()]
  md = (f"From the {sizes[0]} base, on ops {lo}-{hi} as documents, each arm spending the FLOPs of {scale.rl_steps} "
        f"RL steps (teacher forwards and sampling counted). Strict pass@k (%) on context p, {scale.eval['problems']} "
        f"problems x {scale.eval['n']} samples per op at temperature {scale.eval['temperature']}; mean ± spread over "
        f"{args.seeds} seeds (steps per seed).\n\n" + markdown_table(header, rows))
  write_results(args, "distill_vs_rl", results, md, plot=lambda p: plot(results, ops, ks, p), evidence=evidence,
                claims=CLAIMS, bands=bands)
  print(md)


if __name__ == "__main__":
  main()
