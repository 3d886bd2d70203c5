"""The published RL recipes (`configs/recipes/rl.py`) against the papers' own numbers: one table, each value with its
source, checked on the accelerator-scale recipe and, for the algorithm's keys, on its `-toy` variant too (which may
change only the scale: model, data, batch, group, lengths, learning rate)."""

import pytest

from jaxstages.config import load_config
from jaxstages.optim import OptimConfig
from jaxstages.stages.rl import rl_config
from jaxstages.train import check_positions, stage_model_config

DSM = "DeepSeekMath (Shao et al. 2024) §4.2 'Training and evaluating DeepSeekMath-RL'"
DSM_GRPO = "DeepSeekMath §4.1.1 'From PPO to GRPO' (eq. 3: per-sequence 1/|o_i|, KL term in the loss, eq. 4: k3)"
DAPO = "DAPO (Yu et al. 2025)"
DAPO_TRAIN = "DAPO §4.1 'Training details'"
DR = "Dr.GRPO (Liu et al. 2025, 'Understanding R1-Zero-like training') §3.2 'Dr. GRPO'"
JUSTRL = "JustRL (shared REFERENCES: 'JustRL (single-stage fixed recipe)')"
INTERPLAY = "interplay study (Zhang, Neubig, Yue, arXiv 2512.07783; shared REFERENCES, 'RL:')"

# (recipe, block, key, published value, source). `algo` rows are the algorithm: the -toy variant must keep them too.
ALGO, SCALE = "algo", "scale"
PUBLISHED = [
    ("deepseekmath", "grpo", "advantage.estimator", "grpo", ALGO, f"{DSM_GRPO}: (r - mean) / std per group"),
    ("deepseekmath", "grpo", "advantage.scale_rewards", True, ALGO, f"{DSM_GRPO}: divided by the group std"),
    ("deepseekmath", "grpo", "policy_loss.loss_agg", "seq-mean-token-mean", ALGO, DSM_GRPO),
    ("deepseekmath", "grpo", "kl.placement", "loss", ALGO, DSM_GRPO),
    ("deepseekmath", "grpo", "kl.estimator", "k3", ALGO, DSM_GRPO),
    ("deepseekmath", "grpo", "kl.coef", 0.04, ALGO, f"{DSM}: KL coefficient 0.04"),
    ("deepseekmath", "grpo", "rollout.group_size", 64, SCALE, f"{DSM}: 64 outputs per question"),
    ("deepseekmath", "grpo", "rollout.max_new_tokens", 1024, SCALE, f"{DSM}: max length 1024"),
    ("deepseekmath", "data", "batch_size", 1024, SCALE, f"{DSM}: training batch size 1024"),
    ("deepseekmath", "optim", "lr", 1e-6, SCALE, f"{DSM}: policy learning rate 1e-6"),
    ("deepseekmath", "grpo", "minibatches", 1, ALGO, f"{DSM}: a single update after each exploration stage"),
    ("deepseekmath", "grpo", "epochs", 1, ALGO, f"{DSM}: a single update after each exploration stage"),

    ("dapo", "grpo", "policy_loss.clip_low", 0.2, ALGO, f"{DAPO} §3.1 'Clip-Higher': ε_low 0.2"),
    ("dapo", "grpo", "policy_loss.clip_high", 0.28, ALGO, f"{DAPO} §3.1 'Clip-Higher': ε_high 0.28"),
    ("dapo", "grpo", "rollout.dynamic_sampling", True, ALGO, f"{DAPO} §3.2 'Dynamic sampling'"),
    ("dapo", "grpo", "policy_loss.loss_agg", "token-mean", ALGO, f"{DAPO} §3.3 'Token-level policy gradient loss'"),
    ("dapo", "grpo", "reward.overlong_penalty", 1.0, ALGO, f"{DAPO} §3.4 'Overlong reward shaping': down to -1"),
    ("dapo", "grpo", "kl.coef", 0.0, ALGO, f"{DAPO} §2.3 'Removing KL divergence'"),
    ("dapo", "grpo", "reward.overlong_buffer", 4096, SCALE, f"{DAPO_TRAIN}: a 4,096-token soft punish cache"),
    ("dapo", "grpo", "rollout.max_new_tokens", 16384 + 4096, SCALE, f"{DAPO_TRAIN}: 16,384 expected + 4,096 = 20,480"),
    ("dapo", "grpo", "rollout.group_size", 16, SCALE, f"{DAPO_TRAIN}: 16 responses per prompt"),
    ("dapo", "data", "batch_size", 512, SCALE, f"{DAPO_TRAIN}: prompt batch 512"),
    ("dapo", "grpo", "minibatches", 16, SCALE, f"{DAPO_TRAIN}: mini-batch 512, 16 gradient updates per rollout"),
    ("dapo", "optim", "lr", 1e-6, SCALE, f"{DAPO_TRAIN}: lr 1e-6"),
    ("dapo", "optim", "warmup_steps", 20, SCALE, f"{DAPO_TRAIN}: linear warm-up over 20 rollout steps"),
    ("dapo", "optim", "schedule", "constant", ALGO, f"{DAPO_TRAIN}: constant lr"),

    ("dr-grpo", "grpo", "advantage.estimator", "grpo", ALGO, f"{DR}: GRPO's group baseline"),
    ("dr-grpo", "grpo", "advantage.scale_rewards", False, ALGO, f"{DR}: no division by the group std"),
    ("dr-grpo", "grpo", "policy_loss.loss_agg", "seq-mean-token-sum-norm", ALGO,
     f"{DR}: no 1/|o_i|, a constant instead"),
    ("dr-grpo", "grpo", "kl.coef", 0.0, ALGO, f"{DR}: no KL term"),

    ("justrl", "grpo", "rollout.group_size", 8, SCALE, f"{JUSTRL}: 256 prompts x 8 rollouts"),
    ("justrl", "data", "batch_size", 256, SCALE, f"{JUSTRL}: 256 prompts x 8 rollouts"),
    ("justrl", "grpo", "minibatches", 4, SCALE, f"{JUSTRL}: 4 updates per step"),
    ("justrl", "optim", "lr", 1e-6, SCALE, f"{JUSTRL}: lr 1e-6 constant"),
    ("justrl", "optim", "schedule", "constant", ALGO, f"{JUSTRL}: lr 1e-6 constant"),
    ("justrl", "optim", "warmup_steps", 10, SCALE, f"{JUSTRL}: 10 warmup steps"),
    ("justrl", "optim", "weight_decay", 0.1, ALGO, f"{JUSTRL}: weight decay 0.1"),
    ("justrl", "optim", "clip_norm", 1.0, ALGO, f"{JUSTRL}: clip 1.0"),
    ("justrl", "grpo", "kl.coef", 0.0, ALGO, f"{JUSTRL}: no KL"),
    ("justrl", "grpo", "policy_loss.entropy_coef", 0.0, ALGO, f"{JUSTRL}: no entropy bonus"),
    ("justrl", "grpo", "policy_loss.clip_low", 0.2, ALGO, f"{JUSTRL}: ε_low 0.2"),
    ("justrl", "grpo", "policy_loss.clip_high", 0.28, ALGO, f"{JUSTRL}: ε_high 0.28"),
    ("justrl", "grpo", "policy_loss.dual_clip", 10.0, ALGO, f"{JUSTRL}: dual-clip 10"),
    ("justrl", "grpo", "policy_loss.loss_agg", "token-mean", ALGO, f"{JUSTRL}: token-mean loss"),
    ("justrl", "grpo", "rollout.temperature", 1.0, ALGO, f"{JUSTRL}: temperature 1.0"),
    ("justrl", "grpo", "reward.overlong_buffer", 0, ALGO, f"{JUSTRL}: no length penalty"),

    ("interplay", "grpo", "rollout.group_size", 6, SCALE, f"{INTERPLAY}: 1024 prompts x 6 rollouts"),
    ("interplay", "data", "batch_size", 1024, SCALE, f"{INTERPLAY}: 1024 prompts x 6 rollouts"),
    ("interplay", "grpo", "rollout.temperature", 1.0, ALGO, f"{INTERPLAY}: temperature 1.0"),
    ("interplay", "grpo", "rollout.max_new_tokens", 1024, SCALE, f"{INTERPLAY}: max response 1024"),
    ("interplay", "optim", "lr", 1e-6, SCALE, f"{INTERPLAY}: lr 1e-6 constant"),
    ("interplay", "optim", "schedule", "constant", ALGO, f"{INTERPLAY}: lr 1e-6 constant"),
    ("interplay", "grpo", "minibatches", 4, SCALE, f"{INTERPLAY}: 4 mini-batches per step"),
    ("interplay", "grpo", "epochs", 1, ALGO, f"{INTERPLAY}: 1 epoch"),
    ("interplay", "grpo", "policy_loss.clip_low", 0.2, ALGO, f"{INTERPLAY}: clip 0.2"),
    ("interplay", "grpo", "policy_loss.clip_high", 0.2, ALGO, f"{INTERPLAY}: clip 0.2"),
    ("interplay", "grpo", "policy_loss.dual_clip", 3.0, ALGO, f"{INTERPLAY}: dual-clip 3"),
    ("interplay", "grpo", "policy_loss.loss_agg", "token-mean", ALGO, f"{INTERPLAY}: token-mean loss"),
    ("interplay", "grpo", "kl.placement", "loss", ALGO, f"{INTERPLAY}: KL as a loss term"),
    ("interplay", "grpo", "kl.coef", 1e-3, ALGO, f"{INTERPLAY}: KL 1e-3"),
    ("interplay", "grpo", "kl.estimator", "k3", ALGO, f"{INTERPLAY}: the k3 estimator"),
    ("interplay", "grpo", "policy_loss.entropy_coef", 0.0, ALGO, f"{INTERPLAY}: no entropy bonus"),
    ("interplay", "data", "task.op_range", (11, 14), SCALE, f"{INTERPLAY}: the edge RL set, op 11-14"),
    ("interplay", "stage", "steps", 200, SCALE, f"{INTERPLAY}: ~200 steps"),
]
RECIPES = sorted({row[0] for row in PUBLISHED})


def _value(cfg, block: str, key: str):
  """A key of a loaded recipe, read through the dataclass that parses it (so defaults count)."""
  if block == "grpo":
    value = rl_config(cfg.grpo, "grpo")
    for part in key.split("."):
      value = getattr(value, part)
    return value
  if block == "optim":
    return getattr(OptimConfig.from_config(cfg.optim), key)
  value = cfg[block]
  for part in key.split("."):
    value = value[part]
  return tuple(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_have_their_papers_values(recipe):
  """Each value of the table in the recipe at accelerator scale, and each algorithmic one in its `-toy` variant."""
  full, toy = (load_config(f"configs/recipes/rl.py:{recipe}{suffix}") for suffix in ("", "-toy"))
  wrong = []
  for name, block, key, want, kind, source in PUBLISHED:
    if name != recipe:
      continue
    for variant, cfg in (("", full), ("-toy", toy)) if kind == ALGO else (("", full),):
      got = _value(cfg, block, key)
      if got != pytest.approx(want) if isinstance(want, float) else got != want:
        wrong.append(f"{recipe}{variant} {block}.{key} = {got!r}, published {want!r} ({source})")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dr_grpo_constant_is_the_generation_budget_and_recipes_fit_their_model(recipe):
  """Dr.GRPO's constant (the loss's `norm_length`) is the generation budget `max_new_tokens` at both scales, and
  every recipe's prompt + completion fits its model's positions (the stage would refuse to build otherwise)."""
  for suffix in ("", "-toy"):
    cfg = load_config(f"configs/recipes/rl.py:{recipe}{suffix}")
    rl = rl_config(cfg.grpo, "grpo")
    if rl.policy_loss.loss_agg == "seq-mean-token-sum-norm":
      assert rl.policy_loss_config().norm_length == rl.rollout.max_new_tokens
    check_positions(stage_model_config(cfg.model, 2048), {"data.prompt_len": cfg.data.prompt_len,
                                                          "grpo.rollout.max_new_tokens": rl.rollout.max_new_tokens})


def test_toy_variants_differ_from_their_recipe_only_in_scale():
  """The `-toy` variant keeps every algorithmic key of the table; its scale is the CPU setup of `grpo-toy`."""
  base = load_config("configs/train.py:grpo-toy")
  for recipe in RECIPES:
    toy = load_config(f"configs/recipes/rl.py:{recipe}-toy")
    assert toy.model == base.model and toy.data == base.data and toy.stage.init_from == base.stage.init_from
    assert toy.grpo.rollout.max_new_tokens == base.grpo.rollout.max_new_tokens
    assert toy.grpo.rollout.group_size == base.grpo.rollout.group_size
    with pytest.raises(KeyError, match="did you mean"):
      load_config(f"configs/recipes/rl.py:{recipe}x")
