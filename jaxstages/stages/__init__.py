"""One module per training objective. Each gives the shared train loop (`jaxstages.train.run_stage`) an `Objective`
(`stages/objective.py`): its pure loss `loss(model, batch) -> (sum, count, aux sums)`, the data kinds it trains on,
and, where it needs them, a `prepare` that adds frozen-model outputs or fresh samples to each batch before the jitted
step (DPO's reference log-probs, a distillation teacher's log-probs, on-policy samples) and held-out metrics of its
own.

A stage's `kind` picks the objective; an objective with options reads them from the config block named like its
kind (`OPTION_BLOCKS`, e.g. `dpo.beta`), checked key by key like every other block. This package is the registry of
the kinds; the objectives use the layers below them (model, losses, sampling, evaluation), never the loop above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxstages.config import ConfigError, check_keys, from_config
from jaxstages.data.pipeline import PACKED_KINDS
from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.model.config import ModelConfig
from jaxstages.model.io import model_config_of
from jaxstages.model.transformer import create_model
from jaxstages.stages.distill import (DistillConfig, distill_loss_fn, distill_objective, planned_distill_flops,
                                     teacher_outputs)
from jaxstages.stages.dpo import DPOConfig, dpo_loss_fn, dpo_objective
from jaxstages.stages.grpo import grpo_loss_fn
from jaxstages.stages.lm import lm_loss
from jaxstages.stages.objective import Batch, LossFn, Objective, StageContext
from jaxstages.stages.ppo import actor_critic, ppo_loss_fn
from jaxstages.stages.rl import (ROW_KEYS, planned_rl_flops, rl_config, rl_objective, rl_plan_programs,
                                 training_batch_keys)
from jaxstages.stages.sft import sft_per_sequence_loss

__all__ = ["Batch", "LOSSES", "LossFn", "OBJECTIVES", "OPTION_BLOCKS", "Objective", "PACKED", "StageContext",
           "objective_block", "planned_step", "rl_plan_programs", "stage_model", "update_step", "updates_per_step"]

# the objectives whose batches come straight from a packed pipeline (no prepare); `plan` sizes these
LOSSES: dict[str, LossFn] = {"pretrain": lm_loss, "midtrain": lm_loss, "sft": lm_loss,
                             "sft-per-sequence": sft_per_sequence_loss}
PACKED = PACKED_KINDS  # the data kinds they train on


def _packed(loss: LossFn) -> Callable[[StageContext, Mapping], Objective]:
  return lambda ctx, block: Objective(loss=loss, data_kinds=PACKED)


OBJECTIVES: dict[str, Callable[[StageContext, Mapping], Objective]] = {
    **{kind: _packed(loss) for kind, loss in LOSSES.items()}, "dpo": dpo_objective, "distill": distill_objective,
    "grpo": lambda ctx, block: rl_objective(ctx, block, "grpo"),
    "ppo": lambda ctx, block: rl_objective(ctx, block, "ppo")}
OPTION_BLOCKS = ("dpo", "distill", "grpo", "ppo")  # kinds with options, each in the config block of the same name


def updates_per_step(kind: str, block: Mapping[str, Any]) -> int:
  """Optimizer updates in one step of a stage (RL: epochs x minibatches over each rollout), for the lr schedule."""
  if kind in ("grpo", "ppo"):
    cfg = rl_config(block, kind)
    return cfg.epochs * cfg.minibatches
  return 1


def stage_model(kind: str, block: Mapping[str, Any], model: nnx.Module, mesh: Mesh, rules: tuple) -> nnx.Module:
  """The module a stage trains, built around the loaded policy: PPO adds its critic (the policy stays its own
  subtree, `policy`, so any later stage loads it as a plain model); every other kind trains the model itself."""
  if kind == "ppo":
    return actor_critic(model, rl_config(block, kind).ppo, mesh, rules)
  return model


def objective_block(kind: str, config: Mapping[str, Any]) -> dict:
  """The options block of `kind` from a training config (empty if it has none); rejects an unknown kind and the
  block of another kind (a `dpo` block in a distillation stage is a mistake, not a no-op)."""
  check_keys([kind], OBJECTIVES, "stage kinds")
  for other in OPTION_BLOCKS:
    if other != kind and config.get(other):
      raise ConfigError(f"config block {other!r} belongs to stage kind {other!r}, but stage.kind is {kind!r}")
  return dict(config.get(kind) or {}) if kind in OPTION_BLOCKS else {}


def planned_step(kind: str, block: Mapping[str, Any], model: ModelConfig, data, teacher_model=None) -> dict:
  """Tokens and FLOPs per step of a stage from its config alone (no model is built): what a compute budget is
  divided by. RL counts its sampling (at the token limit: an upper bound, with `flops_per_step_min` the lower) and
  extra forward passes; distillation the teacher's forwards and any sampling (the teacher's shape: `teacher_model`,
  else read from `distill.teacher`). `data` is the stage's `DataConfig`."""
  if kind in ("grpo", "ppo"):
    return planned_rl_flops(model, data, rl_config(block, kind), kind)
  if kind == "distill":
    distill = from_config(DistillConfig, block, where="distill config")
    return planned_distill_flops(model, teacher_model or model_config_of(distill.teacher), data, distill)
  if kind in LOSSES:
    tokens = data.batch_size * data.seq_len
    return {"tokens_per_step": tokens, "flops_per_step": train_flops_per_token(model, data.seq_len) * tokens}
  if kind == "dpo":  # chosen and rejected sequences: a training pass of the policy and a reference forward
    tokens = 2 * data.batch_size * data.seq_len
    return {"tokens_per_step": tokens, "flops_per_step": (train_flops_per_token(model, data.seq_len)
                                                          + forward_flops_per_token(model, data.seq_len)) * tokens}
  raise ConfigError(f"stage kind {kind!r} has no FLOPs plan from its config; give the stage a length in steps")


def update_step(kind: str, block: Mapping[str, Any], model: ModelConfig, data, batch: Mapping[str, Any]
                ) -> tuple[LossFn, dict, int, int]:
  """What one update of a stage trains on, from its config alone (nothing loaded, nothing sampled), for planning:
  `(loss, abstract batch, minibatches, epochs)`. `batch` is one batch of the stage's pipeline (shapes suffice); the
  objective's `prepare` adds to it (DPO's reference log-probs, a teacher's outputs) or replaces it (RL's rollout
  rows, distillation's samples), at the shapes it adds them in."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  b = data.batch_size
  if kind in LOSSES:
    return LOSSES[kind], dict(batch), 1, 1
  if kind == "dpo":
    cfg = from_config(DPOConfig, block, where="dpo config")
    reference = {"ref_chosen": f32(b), "ref_rejected": f32(b)} if cfg.loss != "simpo" else {}
    return dpo_loss_fn(cfg), {**batch, **reference}, 1, 1
  if kind == "distill":
    cfg = from_config(DistillConfig, block, where="distill config")
    if cfg.samples:  # rows of prompt + completion (`completion_rows`)
      t = data.prompt_len + cfg.max_new_tokens - 1
      batch = {**{k: i32(b, t) for k in ROW_KEYS}, "loss_mask": f32(b, t), "on_policy": f32(b)}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(model, 0)))  # the teacher shares the vocab
    teacher = jax.eval_shape(lambda st, x: teacher_outputs(cfg)(nnx.merge(graphdef, st), x), state, batch)
    return distill_loss_fn(cfg), {**batch, **teacher}, 1, 1
  if kind in ("grpo", "ppo"):
    cfg = rl_config(block, kind)
    rows, t = b * cfg.rollout.group_size, data.prompt_len + cfg.rollout.max_new_tokens - 1
    batch = {**{k: i32(rows, t) for k in ROW_KEYS},
             **{k: f32(rows, cfg.rollout.max_new_tokens) for k in training_batch_keys(cfg, kind)}}
    loss = ppo_loss_fn(cfg) if kind == "ppo" else grpo_loss_fn(cfg.policy_loss_config())
    return loss, batch, cfg.minibatches, cfg.epochs
  raise ConfigError(f"stage kind {kind!r} has no update step to plan")
