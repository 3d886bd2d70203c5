"""Optimizer and learning-rate schedules: optax AdamW with global-norm clipping and weight-decay masks.

Schedules (`OptimConfig.schedule`):
- `cosine`: linear warmup from `init_lr` to `lr`, cosine decay to `end_lr_ratio * lr`;
- `wsd`: warmup, stable at `lr`, then a final linear decay over `decay_fraction` of the steps (warmup-stable-decay);
- `constant`: warmup, then `lr`.
Re-warmup for mid-training is the same schedule with `init_lr` set to the previous stage's final learning rate
(and typically a longer warmup, e.g. 15% in the interplay study).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax

from jaxstages.config import ConfigError, check_bounds, from_config


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4
  schedule: str = "cosine"  # cosine | wsd | constant
  warmup_steps: int | None = None  # default: warmup_fraction of total_steps
  warmup_fraction: float = 0.05
  init_lr: float = 0.0  # warmup start; a previous stage's final lr for re-warmup
  end_lr_ratio: float = 0.1  # cosine / wsd end as a fraction of lr
  decay_fraction: float = 0.2  # wsd: share of steps in the final decay
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: tuple[str, ...] = ("norm", "bias", "embed")  # parameter groups without weight decay
  clip_norm: float | None = 1.0
  # dtype of Adam's first moment (None: the params'); "bfloat16" halves it (optax's mu_dtype; the second moment,
  # whose small values bf16 would flush, stays in the params' dtype)
  mu_dtype: str | None = None

  def __post_init__(self):
    # lr=0 is allowed: a stage that must not move its params (a check that a start is what it loaded)
    check_bounds(self, "optimizer config", lr=">=0", warmup_steps=">=0", warmup_fraction="in [0, 1]", init_lr=">=0",
                 end_lr_ratio=">=0", decay_fraction="in [0, 1]", b1="in [0, 1)", b2="in [0, 1)", eps=">0",
                 weight_decay=">=0", clip_norm=">0")
    if self.schedule not in ("cosine", "wsd", "constant"):
      raise ConfigError(f"optimizer schedule {self.schedule!r} is not one of ['cosine', 'wsd', 'constant']")
    unknown = set(self.no_decay) - {"norm", "bias", "embed"}
    if unknown:
      raise ConfigError(f"no_decay groups {sorted(unknown)} unknown; choose from ['bias', 'embed', 'norm']")
    object.__setattr__(self, "no_decay", tuple(self.no_decay))
    if self.mu_dtype not in (None, "float32", "bfloat16"):
      raise ConfigError(f"optimizer mu_dtype {self.mu_dtype!r} is not one of [None, 'bfloat16', 'float32']")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> "OptimConfig":
    return from_config(cls, config, where="optimizer config", **overrides)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
  warmup = max(0, min(warmup, total_steps))
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(cfg.init_lr, cfg.lr, warmup, max(total_steps, warmup + 1), end)
  ramp = optax.linear_schedule(cfg.init_lr, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
  if cfg.schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(cfg.lr)], [warmup])
  decay_steps = max(1, int(cfg.decay_fraction * total_steps))
  stable_end = max(warmup, total_steps - decay_steps)
  return optax.join_schedules(
      [ramp, optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay_steps)], [warmup, stable_end])


def _group(path) -> str:
  """Which weight-decay group a parameter belongs to, from its path in the model."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  leaf = next((n for n in reversed(names) if n != "value"), "")
  if leaf == "scale":
    return "norm"
  if leaf.endswith("_bias"):
    return "bias"
  if leaf == "embed":
    return "embed"
  return "weight"


def decay_mask(params, no_decay: tuple[str, ...]):
  """A tree like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _group(path) not in no_decay, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ global-norm clipping) and its learning-rate schedule, for a stage of `total_steps` updates."""
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=lambda params: decay_mask(params, cfg.no_decay), mu_dtype=cfg.mu_dtype)
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*chain, adamw), schedule
