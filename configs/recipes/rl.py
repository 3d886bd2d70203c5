"""Published RL recipes as presets: `jaxstages train --config configs/recipes/rl.py:dapo` (accelerator scale, the
interplay study's RL setup with the recipe's algorithm) or `...:dapo-toy` (the same algorithm on the CPU toy setup of
`configs/train.py:grpo-toy`).

A recipe sets the algorithm: advantages, loss aggregation, clipping, KL, sampling and the optimizer as published. The
`-toy` variants keep every algorithmic choice and change only the scale (model, data and start point, prompts per
step, group size, lengths, at most 4 minibatches) and the learning rate (a 1M-parameter model needs a far larger one
than a 100M-7B model). Sources are cited per recipe; settings not stated there keep the interplay study's.
"""

from jaxstages.config import load_config

RECIPES = {
    # DeepSeekMath GRPO (Shao et al. 2024): group-normalised advantages (r - mean) / std, per-sequence length
    # normalisation, KL to the reference in the loss (k3) with beta 0.04, 64 samples per question, batch 1024,
    # lr 1e-6, one update per rollout, max length 1024
    "deepseekmath": dict(
        grpo=dict(rollout=dict(group_size=64, max_new_tokens=1024),
                  advantage=dict(estimator="grpo", scale_rewards=True),
                  policy_loss=dict(loss_agg="seq-mean-token-mean", dual_clip=0.0),
                  kl=dict(coef=0.04, placement="loss", estimator="k3"),
                  minibatches=1),
        optim=dict(lr=1e-6), batch_size=1024),
    # DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28, dynamic sampling (drop all-0 / all-1 groups, refill), token-level
    # loss, soft overlong penalty (max 20480 = 16384 + a 4096-token buffer), no KL; 512 prompts x 16 responses,
    # 16 updates per rollout, lr 1e-6 with a 20-step warmup; the model's positions raised to fit prompt + 20480
    "dapo": dict(
        grpo=dict(rollout=dict(group_size=16, max_new_tokens=20480, dynamic_sampling=True, max_sampling_rounds=8),
                  reward=dict(overlong_buffer=4096),
                  advantage=dict(estimator="grpo"),
                  policy_loss=dict(loss_agg="token-mean", clip_low=0.2, clip_high=0.28, dual_clip=0.0),
                  kl=dict(coef=0.0),
                  minibatches=16),
        optim=dict(lr=1e-6, warmup_steps=20), batch_size=512, model=dict(max_position_embeddings=1024 + 20480)),
    # Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division, token sums divided by a
    # constant (the generation budget) instead of each sequence's length, no KL; otherwise GRPO
    "dr-grpo": dict(
        grpo=dict(rollout=dict(group_size=8),
                  advantage=dict(estimator="grpo", scale_rewards=False),
                  policy_loss=dict(loss_agg="seq-mean-token-sum-norm", dual_clip=0.0),
                  kl=dict(coef=0.0)),
        optim=dict(lr=1e-6), batch_size=1024),
    # JustRL (shared REFERENCES): 256 prompts x 8, 4 updates per step, lr 1e-6 constant with 10 warmup steps, weight
    # decay 0.1, grad clip 1.0, no KL, no entropy bonus, clip 0.2 / 0.28, dual-clip 10, token-mean, temperature 1.0,
    # no length penalty
    "justrl": dict(
        grpo=dict(rollout=dict(group_size=8, temperature=1.0),
                  reward=dict(overlong_buffer=0),
                  advantage=dict(estimator="grpo"),
                  policy_loss=dict(loss_agg="token-mean", clip_low=0.2, clip_high=0.28, dual_clip=10.0,
                                   entropy_coef=0.0),
                  kl=dict(coef=0.0),
                  minibatches=4),
        optim=dict(lr=1e-6, warmup_steps=10, weight_decay=0.1, clip_norm=1.0), batch_size=256),
    # the interplay study (Zhang, Neubig, Yue 2025; shared REFERENCES): GRPO, 1024 prompts x 6, token-mean, KL loss
    # 1e-3 (k3), clip 0.2, dual-clip 3, 4 minibatches, 1 epoch, lr 1e-6 constant
    "interplay": dict(
        grpo=dict(rollout=dict(group_size=6),
                  advantage=dict(estimator="grpo"),
                  policy_loss=dict(loss_agg="token-mean", clip_low=0.2, clip_high=0.2, dual_clip=3.0),
                  kl=dict(coef=1e-3, placement="loss", estimator="k3"),
                  minibatches=4, epochs=1),
        optim=dict(lr=1e-6), batch_size=1024),
}

# the toy scale: what every -toy variant overrides on top of the recipe (configs/train.py:grpo-toy's setup)
TOY = dict(lr=3e-4, warmup_steps=0, overlong_buffer=8)


def get_config(name: str = "interplay"):
  toy = name.endswith("-toy")
  recipe_name = name.removesuffix("-toy")
  if recipe_name not in RECIPES:
    import difflib
    names = sorted(RECIPES) + [f"{n}-toy" for n in sorted(RECIPES)]
    raise KeyError(f"unknown recipe {name!r}; did you mean {difflib.get_close_matches(name, names)}? Known: {names}")
  recipe = RECIPES[recipe_name]
  cfg = load_config("train.py:grpo-interplay")
  for key, value in recipe["grpo"].items():
    if isinstance(value, dict):  # a block (rollout, reward, advantage, policy_loss, kl): the keys it sets
      for sub, v in value.items():
        cfg.grpo[key][sub] = v
    else:
      cfg.grpo[key] = value
  for key, value in recipe["optim"].items():
    cfg.optim[key] = value
  cfg.data.batch_size = recipe["batch_size"]
  for key, value in recipe.get("model", {}).items():  # at accelerator scale only: -toy replaces the model below
    cfg.model[key] = value
  if toy:  # the toy setup's model, data, start point and evaluation; the recipe's algorithm
    base = load_config("train.py:grpo-toy")
    cfg.model, cfg.data, cfg.stage, cfg.mesh = base.model, base.data, base.stage, base.mesh
    for block, key in (("rollout", "group_size"), ("rollout", "max_new_tokens"), ("reward", "score")):
      cfg.grpo[block][key] = base.grpo[block][key]
    cfg.grpo.eval_problems = base.grpo.eval_problems
    cfg.grpo.minibatches = min(cfg.grpo.minibatches, 4)
    if cfg.grpo.reward.overlong_buffer:
      cfg.grpo.reward.overlong_buffer = TOY["overlong_buffer"]
    cfg.optim.lr = TOY["lr"]
    if cfg.optim.warmup_steps:
      cfg.optim.warmup_steps = TOY["warmup_steps"]
  cfg.stage.name = f"grpo-{recipe_name}"
  return cfg
