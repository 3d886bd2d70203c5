"""Online RL against offline preference optimisation from one SFT start: GRPO, DPO on task-world pairs, DPO on pairs
sampled once from the start model (offline), and DPO on pairs sampled from the current policy (online DPO), on the
same prompts for the same number of steps; then strict pass@k on every evaluated op and the KL drift from the start
over the steps.

  python -m experiments.online_vs_offline [--seeds 3] [--scale cpu]

The claim (Xu et al. 2024, "Is DPO superior to PPO for LLM alignment?"; Tang et al. 2024, "Understanding the
performance gap between online and offline alignment algorithms"): offline DPO trains on responses that drift away
from what the policy now generates (a distribution shift), so it can raise the likelihood of out-of-distribution
responses and drift far from the start without gaining; online methods (GRPO, online DPO) sample from the policy
itself and correct themselves. The KL drift is `evaluation.kl_drift_fn`: KL(π‖π_start) on held-out prompts, summed
over a sampled completion, at every `stage.eval_every` steps, the same estimator for every arm.

The start: chat SFT of the shared base on context p (ops 1-3). Every arm trains on chat prompts of ops 1-2 (the
in-distribution range), 32 prompts a step, seeds changing the prompts and the sampling.
"""

from __future__ import annotations

from experiments.base import ensure_base
from experiments.common import SCALES, Claim, Evidence, cells, chosen, colors, ensure_stage, error_bars, fmt, \
    markdown_table, parse_args, per_op_summary, pipeline, rl_max_new_tokens, stage, stage_metrics, summary, \
    write_results
from experiments.common import check as check_results

ARMS = {"grpo": "GRPO (online)",
        "dpo-task": "DPO, task pairs (gold vs. perturbed)",
        "dpo-offline": "DPO, pairs sampled from the start (offline)",
        "dpo-online": "DPO, pairs sampled from the policy (online)"}
TRAIN_OPS = {"cpu": (1, 2), "minimal": (1, 1), "accelerator": (7, 10)}
CHAT_PROMPT_LEN = {"cpu": 96, "minimal": 96, "accelerator": 1024}
EVAL_PROBLEMS = {"cpu": 256, "minimal": 2, "accelerator": 128}
START = "SFT start"


def claims(ops: tuple) -> list[Claim]:
  """On the training ops, strict pass@1 (the KL drift, a training-time curve, has no per-problem counts)."""
  return [Claim("online DPO beats offline DPO", "dpo-online", "dpo-offline", ops),
          Claim("GRPO beats offline DPO", "grpo", "dpo-offline", ops),
          Claim("GRPO gains over the start", "grpo", START, ops),
          Claim("offline DPO gains nothing over the start", "dpo-offline", START, ops, sign=0)]


def arm_pipeline(scale, arm: str, start, seed: int) -> dict:
  lo, hi = TRAIN_OPS[scale.name]
  # chat answers carry the turn's end token: 64 tokens (DPO's default pair length) for every arm at cpu scale
  n_new = max(rl_max_new_tokens(scale, hi), 64 if scale.name == "cpu" else 0)
  shared = {"data.task.op_range": (lo, hi), "data.seed": 100 + seed, "data.prompt_len": CHAT_PROMPT_LEN[scale.name]}
  if arm == "grpo":
    s = stage(scale.rl, "grpo", start=start, steps=scale.rl_steps, **{
        **shared, "data.prompt": "chat", "grpo.rollout.max_new_tokens": n_new,
        "grpo.drift_prompts": scale.dpo["overrides"]["dpo.drift_prompts"],
        "stage.eval_every": scale.dpo["overrides"]["stage.eval_every"], "stage.eval_batches": 1})
  else:
    s = stage(scale.dpo, "dpo", start=start, steps=scale.rl_steps, **{
        **shared, "dpo.pairs": {"dpo-task": "task", "dpo-offline": "reference", "dpo-online": "policy"}[arm],
        "dpo.pair_max_new_tokens": n_new, "dpo.drift_max_new_tokens": n_new})
  return pipeline(scale, f"online_vs_offline-{arm}-{seed}", [s], seed, problems=EVAL_PROBLEMS[scale.name],
                  samples=scale.light_eval)


def plot(results: dict, ops: list[int], path) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  color = colors([START, *ARMS])
  for arm in [START, *results["arms"]]:
    means, yerr = error_bars(results, arm, [(f"p/{op}", "pass@1") for op in ops])
    axes[0].errorbar(ops, means, yerr=yerr, marker="o", capsize=3, label=arm, color=color[arm],
                     ls=":" if arm == START else "-")
    if arm == START:
      continue
    curves = results["arms"][arm]["drift"]
    steps = [r["step"] for r in curves[0]]
    kls = [[c[i]["kl_from_reference"] for c in curves] for i in range(len(steps))]
    axes[1].plot([0] + steps, [0.0] + [sum(k) / len(k) for k in kls], marker="o", ms=3, label=arm, color=color[arm])
    axes[1].fill_between([0] + steps, [0.0] + [min(k) for k in kls], [0.0] + [max(k) for k in kls], color=color[arm],
                         alpha=0.2, lw=0)
  axes[0].set_xlabel("op")
  axes[0].set_ylabel("strict pass@1 (95% bootstrap interval)")
  axes[0].set_ylim(0, 1)
  axes[0].set_xticks(ops)
  axes[0].legend(fontsize=7)
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("KL(policy || start), nats per completion")
  axes[1].set_title("seed mean (band: seeds' range)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args("online_vs_offline", __doc__, argv)
  if args.check:
    return check_results(args, "online_vs_offline")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  base = ensure_base(scale, args.workdir)
  evidence.note_base(base)
  start = ensure_stage(scale, args.workdir, "sft", scale.sft, base)
  ops, ks = list(scale.eval_ops), list(scale.light_eval["ks"])
  metrics = [f"pass@{k}" for k in ks] + ["answer@1"]
  start_cells = cells(evidence.start(START, start, problems=EVAL_PROBLEMS[scale.name], samples=scale.light_eval,
                                     prompt="chat"))
  results = {"train_ops": TRAIN_OPS[scale.name], "start_folder": start.name,
             "start": per_op_summary([start_cells], ops, metrics),
             "arms": {}}
  for arm in chosen(list(ARMS), args):
    per_seed, drift, train = [], [], []
    for seed in range(args.seeds):
      report, run_dir = evidence.run(arm_pipeline(scale, arm, start, seed), arm, seed)
      per_seed.append(cells(report["stages"][-1]["eval"]))
      name = "grpo" if arm == "grpo" else "dpo"
      drift.append(stage_metrics(run_dir, name, ["kl_from_reference", "drift_length"]))
      keys = ["pass_rate"] if arm == "grpo" else ["accuracy", "sampled_chosen", "sampled_rejected"]
      train.append(stage_metrics(run_dir, name, keys))
    results["arms"][arm] = {
        "eval": per_op_summary(per_seed, ops, metrics),
        "drift": drift, "train": train,
        "final_kl": summary([d[-1]["kl_from_reference"] for d in drift])}

  kmax = ks[-1]
  header = ["arm", *[f"op {op} pass@1" for op in ops], *[f"op {op} pass@{kmax}" for op in ops],
            "KL from start (final)"]
  rows = [["(SFT start)", *[fmt(results["start"][str(op)]["pass@1"]) for op in ops],
           *[fmt(results["start"][str(op)][f"pass@{kmax}"]) for op in ops], "0"]]
  for arm, a in results["arms"].items():
    rows.append([ARMS[arm], *[fmt(a["eval"][str(op)]["pass@1"]) for op in ops],
                 *[fmt(a["eval"][str(op)][f"pass@{kmax}"]) for op in ops], fmt(a["final_kl"], 1, 2)])
  drift_rows = []
  for arm, a in results["arms"].items():
    steps = [r["step"] for r in a["drift"][0]]
    drift_rows.append([arm, *[fmt(summary([d[i]["kl_from_reference"] for d in a["drift"]]), 1, 2)
                              for i in range(len(steps))]])
  steps = [r["step"] for r in next(iter(results["arms"].values()))["drift"][0]] if results["arms"] else []
  lo, hi = TRAIN_OPS[scale.name]
  md = (f"From the chat SFT start, {scale.rl_steps} steps on ops {lo}-{hi}. Strict pass@k (%) on context p, "
        f"{EVAL_PROBLEMS[scale.name]} held-out problems x {scale.light_eval['n']} samples per op at temperature "
        f"{scale.eval['temperature']}, chat prompts; mean ± spread over {args.seeds} seeds.\n\n"
        + markdown_table(header, rows)
        + "\nKL(policy ‖ start) on held-out prompts (nats per completion) over the steps:\n\n"
        + markdown_table(["arm", *[f"step {s}" for s in steps]], drift_rows))
  write_results(args, "online_vs_offline", results, md, plot=lambda p: plot(results, ops, p), evidence=evidence,
                claims=claims(tuple(range(lo, hi + 1))))
  print(md)


if __name__ == "__main__":
  main()
