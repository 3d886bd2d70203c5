"""The quickstart pipeline: pretrain -> mid-train -> SFT -> GRPO on the symbolic task world with the toy model cut to
2 layers (~0.46M parameters), on a 2-core CPU in ~12 minutes. `jaxstages run --config configs/pipelines/quickstart.py`.

Stage lengths are short versions of `configs/train.py`'s toy stages. The 2-layer toy takes about half the time per
step of the 4-layer one and learns the one-operation look-up at least as fast per step (docs/learnability.md,
run 16), so 3,000 pre-training steps leave the base past the point where it learns the look-up (strict pass@1 at
op 1 39-40% in each of three seeds) instead of on it. Then 100 mid-training steps that grow context q, 200 SFT steps
on chats, and GRPO on op-1 prompts with the strict (process-verified) reward for a budget of 8e12 FLOPs at lr 1.5e-4
(~100 steps of 32 prompts x 8; the stage runs until its measured FLOPs reach the budget; RL beat SFT by 3.0-5.9
points in three seeds, README "Pipelines"). After each stage the report card evaluates 128 problems per cell at ops
1-2 of contexts p and q, 8 samples each at temperature 1: strict pass@1 (the mean over samples: the reliability RL
optimises) and pass@8 (what the model can reach at all). `overrides` apply to every stage:
`jaxstages run --config configs/pipelines/quickstart.py:SEED` sets `stage.seed` (model initialisation and sampling)
for the whole run.
"""

import ml_collections


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="quickstart",
      overrides=dict(model=dict(num_layers=2), stage=dict(seed=int(name or 0))),
      stages=[
          dict(name="pretrain", config="train.py:pretrain-toy", steps=3000,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 300, "stage.log_every": 50,
                          "optim.warmup_fraction": 0.05}),
          dict(name="midtrain", config="train.py:midtrain-toy", steps=100,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 50, "data.batch_size": 16}),
          dict(name="sft", config="train.py:sft-toy", steps=200,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 100}),
          dict(name="rl", config="train.py:grpo-toy", flops=8e12,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 10, "grpo.eval_problems": 0,
                          "data.batch_size": 32, "optim.lr": 1.5e-4}),
      ],
      eval=dict(ops=(1, 2), contexts=("p", "q"), problems=128, n=8, ks=(1, 8), temperature=1.0),
      compute=dict(total_flops=0.0, split={}),
      price_per_chip_hour=0.0,
  ))
