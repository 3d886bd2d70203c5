"""Under a fixed compute budget after the base, how should it be split between mid-training and RL? Five splits from
all-mid-training to all-RL, each spending the same FLOPs (from the ledger, RL sampling included), then strict pass@k on
the edge and harder ops.

  python -m experiments.compute_allocation [--seeds 3] [--scale cpu]

The claim (Zhang, Neubig, Yue 2025): every mid-training + RL mix beats all-RL (+10.8 points on the hardest range), and
heavy mid-training with light RL wins on medium-difficulty tasks. Mid-training here is continued pre-training on
the edge range (80%) with replay of the pre-training stream (20%), at the re-warmed mid-training lr; RL is the
scale's GRPO on the same edge range. A stage given FLOPs runs the steps that spend them (RL: until its measured
FLOPs reach its share). This is `experiments.allocation`'s preset for these two stages and five splits:

  python -m experiments.allocation --stages midtrain,rl --splits 1/0,0.75/0.25,0.5/0.5,0.25/0.75,0/1
"""

from __future__ import annotations

from experiments.allocation import BASE, allocate, arm_name
from experiments.common import SCALES, Claim, parse_args
from experiments.common import check as check_results

STAGES = ("midtrain", "rl")
MIDTRAIN_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the budget; RL gets the rest


def claims(arms: list[str], k: int) -> list[Claim]:
  all_rl, heavy, light = (arm_name(STAGES, (s, 1 - s)) for s in (0.0, 0.75, 0.25))
  mixes = [arm_name(STAGES, (s, 1 - s)) for s in MIDTRAIN_SHARES if 0 < s < 1]
  return [*(Claim(f"{mix} beats all-RL", mix, all_rl, "edge", f"pass@{k}", +1) for mix in mixes),
          Claim("heavy mid-training, light RL beats the reverse at pass@1", heavy, light, "edge", "pass@1", +1),
          Claim("all-RL gains over the base", all_rl, BASE, "edge", "pass@1", +1)]


def main(argv=None) -> None:
  args = parse_args("compute_allocation", __doc__, argv)
  if args.check:
    return check_results(args, "compute_allocation")
  allocate(args, "compute_allocation", STAGES, [(s, 1 - s) for s in MIDTRAIN_SHARES], SCALES[args.scale].budget_flops,
           claims=claims)


if __name__ == "__main__":
  main()
