"""The quickstart pipeline: pretrain -> mid-train -> SFT -> GRPO on the symbolic task world with the ~1M toy model,
on a CPU. `jaxstages run --config configs/pipelines/quickstart.py`.

Stage lengths here are short versions of `configs/train.py`'s toy stages; the evaluation table after each stage is
strict pass@1 (greedy) on ops 1-2 of context p.
"""

import ml_collections


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="quickstart",
      stages=[
          dict(name="pretrain", config="train.py:pretrain-toy", steps=1200,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 300, "stage.log_every": 50,
                          "optim.warmup_fraction": 0.05}),
          dict(name="midtrain", config="train.py:midtrain-toy", steps=150,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 50, "data.batch_size": 16}),
          dict(name="sft", config="train.py:sft-toy", steps=200,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 100}),
          dict(name="rl", config="train.py:grpo-toy", steps=20,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 10, "grpo.eval_problems": 0}),
      ],
      eval=dict(ops=(1, 2), contexts=("p",), problems=64),
      compute=dict(total_flops=0.0, split={}),
      price_per_chip_hour=0.0,
  ))
