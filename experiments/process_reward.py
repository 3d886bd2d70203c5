"""Does rewarding the steps, not only the answer, stop RL from learning right answers through wrong steps? RL from
the shared base on the edge range with three rewards: outcome only (the right final answer), mixed ([α·outcome +
(1−α)·process]·1[outcome], α = 0.5: the study's process-aware reward) and strict (1 only when the answer and every step
verify).

  python -m experiments.process_reward [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): process-aware rewards raise strict pass@1 (+5.2 points on their hardest range)
and cut structural errors. With small numbers a right answer by chance is common (`+` and `*` commute, and a value
mod 23 is right one time in 23), so an outcome reward also pays for wrong steps. Measured: strict pass@1, answer@1
(steps unchecked) and their difference, the share of samples whose answer is right but whose steps are not, on every
evaluated op; and the same share among the RL samples during training (`hack_rate`). The strict arm is the same run
as edge_of_competence's edge arm (shared by config hash; the edge range is the base's measured band, as there).
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, competence_bands, error_bars, fmt, \
    markdown_table, parse_args, per_op_summary, recorded_path, rl_pipeline, stage_metrics, summary, write_results
from experiments.common import check as check_results

REWARDS = {"outcome": {"grpo.reward.score": "outcome"}, "mixed": {"grpo.reward.score": "mixed",
                                                                  "grpo.reward.process_alpha": 0.5},
           "strict": {}}  # strict: the scale's RL reward
CLAIMS = [Claim("a process-aware reward raises strict pass@1 over an outcome reward", "mixed", "outcome", "edge"),
          Claim("the strict reward raises strict pass@1 over an outcome reward", "strict", "outcome", "edge"),
          Claim("RL with the strict reward raises strict pass@1 on the edge", "strict", "base", "edge")]


def plot(results: dict, ops: list[int], path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
  arms = ["base", *results["arms"]]
  color = colors(["base", *REWARDS])
  width = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    by_op = results["base"] if arm == "base" else results["arms"][arm]
    xs = [j + i * width for j in range(len(ops))]
    means, yerr = error_bars(results, arm, [(f"p/{op}", "pass@1") for op in ops])
    axes[0].bar(xs, means, width, yerr=yerr, capsize=2, label=arm, color=color[arm])
    axes[1].bar(xs, [by_op[str(op)]["right_answer_wrong_steps"]["mean"] for op in ops], width, capsize=2,
                yerr=[by_op[str(op)]["right_answer_wrong_steps"]["spread"] for op in ops], color=color[arm])
  for ax, title in zip(axes[:2], ("strict pass@1 (95% bootstrap interval)",
                                  "right answer, wrong steps (± spread over seeds)")):
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], [f"op {op}" for op in ops])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("evaluated op")
    ax.set_ylabel("share of samples")
    ax.set_ylim(bottom=0)
  axes[0].legend(fontsize=7)
  for arm, curves in results["curves"].items():
    steps = [r["step"] for r in curves[0]]
    rates = [[c[i]["hack_rate"] for c in curves] for i in range(len(steps))]
    axes[2].plot(steps, [sum(r) / len(r) for r in rates], label=arm, color=color[arm])
    axes[2].fill_between(steps, [min(r) for r in rates], [max(r) for r in rates], color=color[arm], alpha=0.2, lw=0)
  axes[2].set_title("RL samples (seed mean; band: seeds' range)", fontsize=9)
  axes[2].set_xlabel("RL step")
  axes[2].set_ylabel("right answer, wrong steps")
  axes[2].set_ylim(bottom=0)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def with_hacking(cell: dict) -> dict:
  return dict(cell, right_answer_wrong_steps=cell["answer@1"] - cell["pass@1"])


def main(argv=None) -> None:
  args = parse_args("process_reward", __doc__, argv)
  if args.check:
    return check_results(args, "process_reward")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  base = ensure_base(scale, args.workdir)
  ops = list(scale.eval_ops)
  metrics = ["pass@1", "answer@1", "right_answer_wrong_steps"]
  base_eval = evidence.start("base", base)
  bands = competence_bands(scale, base_eval)
  edge = bands["ranges"]["edge"]
  base_cells = cells(base_eval)
  results = {"base": {str(op): {m: summary([with_hacking(base_cells[("p", op)])[m]]) for m in metrics}
                      for op in ops}, "arms": {}, "curves": {}, "rl_range": edge, "runs": {}}
  for arm in chosen(list(REWARDS), args):
    per_seed, curves = [], []
    for seed in range(args.seeds):
      report, run_dir = evidence.run(rl_pipeline(scale, f"process_reward-{arm}-{seed}", base, edge, seed,
                                                 **REWARDS[arm]), arm, seed)
      per_seed.append({k: with_hacking(c) for k, c in cells(report["stages"][-1]["eval"]).items()})
      curves.append(stage_metrics(run_dir, "rl", ["hack_rate", "pass_rate", "outcome_rate"]))
      results["runs"].setdefault(arm, []).append(recorded_path(run_dir, args.workdir))
    results["arms"][arm] = per_op_summary(per_seed, ops, metrics)
    results["curves"][arm] = curves

  header = ["reward", *[f"op {op} strict pass@1" for op in ops], *[f"op {op} right answer, wrong steps" for op in ops]]
  rows = []
  for arm in ["base", *results["arms"]]:
    by_op = results["base"] if arm == "base" else results["arms"][arm]
    rows.append([f"({arm})" if arm == "base" else arm, *[fmt(by_op[str(op)]["pass@1"]) for op in ops],
                 *[fmt(by_op[str(op)]["right_answer_wrong_steps"]) for op in ops]])
  last = [[arm, *[fmt(summary([c[-1][k] for c in curves])) for k in ("pass_rate", "outcome_rate", "hack_rate")]]
          for arm, curves in results["curves"].items()]
  lo, hi = edge
  md = (f"RL from the shared base on ops {lo}-{hi} for {scale.rl_steps} steps with each reward; evaluation on context "
        f"p, {scale.eval['problems']} problems x {scale.eval['n']} samples per op at temperature "
        f"{scale.eval['temperature']}; in %, mean ± spread over {args.seeds} seeds. \"Right answer, wrong steps\" is "
        "answer@1 minus strict pass@1: the share of samples paid by an outcome reward that the strict verifier "
        "rejects.\n\n" + markdown_table(header, rows)
        + "\nThe RL samples at the last logged step (%): strict pass rate, right answer, right answer with wrong "
          "steps:\n\n" + markdown_table(["reward", "strict", "answer", "answer, wrong steps"], last))
  write_results(args, "process_reward", results, md, plot=lambda p: plot(results, ops, p), evidence=evidence,
                claims=CLAIMS, bands=bands)
  print(md)


if __name__ == "__main__":
  main()
