"""The quickstart pipeline: pretrain -> mid-train -> SFT -> GRPO on the symbolic task world with the ~1M toy model,
on a CPU in ~13 minutes. `jaxstages run --config configs/pipelines/quickstart.py`.

Stage lengths are short versions of `configs/train.py`'s toy stages: 1,800 pre-training steps (the base learns the
one-operation look-up around here), 100 mid-training steps that grow context q, 300 SFT steps on chats, then GRPO
on op-1 prompts with the strict (process-verified) reward for a budget of 4e12 FLOPs (~27 steps of 32 prompts x 8;
the stage runs until its measured FLOPs reach the budget). After each stage the report card evaluates 128 problems
per cell at ops 1-2 of contexts p and q, 8 samples each at temperature 1: strict pass@1 (the mean over samples: the
reliability RL optimises) and pass@8 (what the model can reach at all).

Not yet robust: 1,800 steps leave the base where the toy model learns the one-operation look-up, so a tiny numeric
change moves the base between ~6% and ~28% strict pass@1 at op 1, and GRPO then helps (+12 points) or hurts (-2);
README, "Pipelines", has both runs.
"""

import ml_collections


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="quickstart",
      stages=[
          dict(name="pretrain", config="train.py:pretrain-toy", steps=1800,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 300, "stage.log_every": 50,
                          "optim.warmup_fraction": 0.05}),
          dict(name="midtrain", config="train.py:midtrain-toy", steps=100,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 50, "data.batch_size": 16}),
          dict(name="sft", config="train.py:sft-toy", steps=300,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 100}),
          dict(name="rl", config="train.py:grpo-toy", flops=4e12,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 5, "grpo.eval_problems": 0,
                          "data.batch_size": 32}),
      ],
      eval=dict(ops=(1, 2), contexts=("p", "q"), problems=128, n=8, ks=(1, 8), temperature=1.0),
      compute=dict(total_flops=0.0, split={}),
      price_per_chip_hour=0.0,
  ))
