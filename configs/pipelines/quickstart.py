"""The quickstart pipeline: pretrain -> mid-train -> SFT -> GRPO on the symbolic task world with the ~1M toy model,
on a CPU. `jaxstages run --config configs/pipelines/quickstart.py`.

Stage lengths here are short versions of `configs/train.py`'s toy stages; the evaluation table after each stage is
strict pass@1 (greedy) on ops 1-2 of context p. Not yet tuned: a run takes ~13.5 min on a 2-core CPU, and its 15
GRPO steps (op 1) do not yet beat the SFT stage (44% -> 41% strict pass@1 at op 1 on 64 problems, within noise).
"""

import ml_collections


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="quickstart",
      stages=[
          dict(name="pretrain", config="train.py:pretrain-toy", steps=2400,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 300, "stage.log_every": 50,
                          "optim.warmup_fraction": 0.05}),
          dict(name="midtrain", config="train.py:midtrain-toy", steps=100,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 50, "data.batch_size": 16}),
          dict(name="sft", config="train.py:sft-toy", steps=300,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 100}),
          dict(name="rl", config="train.py:grpo-toy", steps=15,
               overrides={"stage.eval_every": 0, "stage.checkpoint_every": 5, "grpo.eval_problems": 0,
                          "data.batch_size": 32}),
      ],
      eval=dict(ops=(1, 2), contexts=("p",), problems=64),
      compute=dict(total_flops=0.0, split={}),
      price_per_chip_hour=0.0,
  ))
