"""A mid-size CPU pipeline: pretrain -> mid-train -> SFT -> GRPO with the ~5.7M-parameter `small` model shape on the
symbolic task world, for a longer CPU run than the quickstart: ~9e14 FLOPs, ~25x the quickstart's (a few hours on a
2-core CPU, by the quickstart's FLOPs per second; minutes on one accelerator).
`jaxstages run --config configs/pipelines/cpu-medium.py`.

The model is `configs/models.py:small` (hidden 256, 6 layers, 8 query / 2 KV heads); the stages are the toy configs
of `configs/train.py` with longer lengths, and mid-training and RL share a fixed FLOP budget 50 / 50 through
`compute.split`, the knob the interplay study turns (set another split to move compute between them). The
evaluation after each stage: strict pass@1 on ops 1-4 of contexts p and q (q is seeded at 1% in pre-training and
grown in mid-training).
"""

import ml_collections

SMALL = {"model.hidden_size": 256, "model.num_layers": 6, "model.num_heads": 8, "model.num_kv_heads": 2,
         "model.intermediate_size": 1024, "model.rope_theta": 1_000_000.0}
QUIET = {"stage.eval_every": 0}


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="cpu-medium",
      stages=[
          dict(name="pretrain", config="train.py:pretrain-toy", steps=4000,
               overrides={**SMALL, **QUIET, "data.batch_size": 16, "stage.checkpoint_every": 500,
                          "stage.log_every": 50, "optim.lr": 1e-3}),
          dict(name="midtrain", config="train.py:midtrain-toy",
               overrides={**SMALL, **QUIET, "stage.checkpoint_every": 100, "optim.lr": 5e-4}),
          dict(name="sft", config="train.py:sft-toy", steps=600,
               overrides={**SMALL, **QUIET, "stage.checkpoint_every": 200, "optim.lr": 5e-4}),
          dict(name="rl", config="train.py:grpo-toy",
               overrides={**SMALL, **QUIET, "stage.checkpoint_every": 10, "grpo.eval_problems": 0,
                          "data.batch_size": 32, "data.task.op_range": (1, 2), "optim.lr": 1e-4}),
      ],
      eval=dict(ops=(1, 2, 3, 4), contexts=("p", "q"), problems=128),
      compute=dict(total_flops=2e14, split={"midtrain": 0.5, "rl": 0.5}),
      price_per_chip_hour=0.0,
  ))
