"""The reference interplay study's schedule at its own scale, for a TPU or GPU: pre-training -> mid-training (CPT)
-> GRPO (Zhang, Neubig, Yue 2025; shared REFERENCES). `jaxstages run --config configs/pipelines/interplay.py`.

- model: `interplay-100m` (Qwen2 shape, hidden 768, 12 layers, 12 / 2 heads, tied embeddings, bf16);
- pre-training (`configs/train.py:pretrain-interplay`): ~10B tokens of op 2-10 problems on the story surface,
  2048-token rows, 512k tokens a step, lr 1e-4 cosine to 3e-5, warmup 5%, weight decay 0.1, clip 1.0;
- mid-training (`midtrain-interplay`): 80% op 11-14 / 20% replay of the pre-training stream, warmup 15%; the study
  varies its length against RL's under a fixed budget (set `compute.total_flops` and `compute.split`); 1B tokens
  here;
- RL (`grpo-interplay`): 1024 prompts x 6 on op 11-14, token-mean, KL loss 1e-3 (k3), clip 0.2, dual-clip 3,
  lr 1e-6 constant, 200 steps.
The evaluation after each stage: strict pass@1 on in-distribution (7, 10), edge (12, 14) and too-hard (18) ops.
"""

import ml_collections


def get_config(name: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="interplay",
      stages=[
          dict(name="pretrain", config="train.py:pretrain-interplay", tokens=10e9),
          dict(name="midtrain", config="train.py:midtrain-interplay", tokens=1e9),
          dict(name="rl", config="train.py:grpo-interplay", steps=200,
               overrides={"data.task.contexts": "story-uniform"}),
      ],
      eval=dict(ops=(7, 10, 12, 14, 18), problems=128, max_new_tokens=1024),
      compute=dict(total_flops=0.0, split={}),
      price_per_chip_hour=0.0,
  ))
