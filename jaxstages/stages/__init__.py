"""One module per training objective. Each gives the shared train loop (`jaxstages.train.run_stage`) an `Objective`:
its pure loss `loss(model, batch) -> (sum, count, aux sums)`, the data kinds it trains on, and, where it needs them,
a `prepare` that adds frozen-model outputs or fresh samples to each batch before the jitted step (DPO's reference
log-probs, a distillation teacher's log-probs, on-policy samples) and held-out metrics of its own.

A stage's `kind` picks the objective; an objective with options reads them from the config block named like its
kind (`OPTION_BLOCKS`, e.g. `dpo.beta`), checked key by key like every other block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxstages.config import ConfigError, check_keys
from jaxstages.stages.lm import lm_loss
from jaxstages.stages.sft import sft_per_sequence_loss

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]

# the objectives whose batches come straight from a packed pipeline (no prepare); `plan` sizes these
LOSSES: dict[str, LossFn] = {"pretrain": lm_loss, "midtrain": lm_loss, "sft": lm_loss,
                             "sft-per-sequence": sft_per_sequence_loss}
PACKED = ("pretrain", "midtrain", "sft")


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What an objective may build on: the stage, its data config, the model's shape and graph, the mesh, the
  tokenizer, and the params the stage starts from (before any resume; copy them if they must outlive the first,
  donating, step)."""

  stage: Any  # jaxstages.train.StageConfig
  data: Any  # jaxstages.data.pipeline.DataConfig
  model_cfg: Any
  graphdef: nnx.GraphDef
  mesh: Mesh
  rules: tuple
  tokenizer: Any
  initial_params: nnx.State


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a stage adds to the shared loop.

  loss            pure `(model, batch) -> (sum, count, aux sums)`; the step reports `sum / count` and aux / count
  data_kinds      pipeline kinds it trains on
  prepare         `(state, global batch, step, next_batch) -> batch` run on the host side before each step (may call
                  jitted functions: frozen-model forwards, the sampler; `next_batch()` draws one more global batch
                  from the stage's checkpointed data iterator, e.g. to refill dropped RL groups); deterministic in
                  (batch, step, params, objective state) so a resumed run repeats it exactly
  eval_loss       the held-out loss, if not `loss` (distillation reports the data NLL)
  eval_prepare    `batch -> batch` for held-out batches
  evaluate        `params -> {name: value}`: extra held-out metrics at every evaluation (DPO's KL drift)
  tokens_per_step, flops_per_step: the stage's compute per step when not the plain LM count (pairs, teacher
                  forwards, sampling)
  host_metrics    `() -> {name: value}`: what `prepare` measured for the step just taken (rewards, sampling time),
                  logged with the step's metrics
  get_state, set_state: the objective's own state (e.g. an adaptive KL coefficient), saved with every checkpoint
  minibatches, epochs: optimizer updates per step (`train.make_train_step`): RL's passes over one rollout
  """

  loss: LossFn
  data_kinds: tuple[str, ...]
  prepare: Callable[[Any, Batch, int], Batch] | None = None
  eval_loss: LossFn | None = None
  eval_prepare: Callable[[Batch], Batch] | None = None
  evaluate: Callable[[nnx.State], dict[str, float]] | None = None
  tokens_per_step: int | None = None
  flops_per_step: float | None = None
  host_metrics: Callable[[], dict[str, float]] | None = None
  get_state: Callable[[], dict] | None = None
  set_state: Callable[[dict], None] | None = None
  minibatches: int = 1
  epochs: int = 1


def _packed(loss: LossFn) -> Callable[[StageContext, Mapping], Objective]:
  return lambda ctx, block: Objective(loss=loss, data_kinds=PACKED)


def _dpo(ctx: StageContext, block: Mapping) -> Objective:
  from jaxstages.stages.dpo import dpo_objective
  return dpo_objective(ctx, block)


def _distill(ctx: StageContext, block: Mapping) -> Objective:
  from jaxstages.stages.distill import distill_objective
  return distill_objective(ctx, block)


def _grpo(ctx: StageContext, block: Mapping) -> Objective:
  from jaxstages.stages.rl import rl_objective
  return rl_objective(ctx, block, "grpo")


def _ppo(ctx: StageContext, block: Mapping) -> Objective:
  from jaxstages.stages.rl import rl_objective
  return rl_objective(ctx, block, "ppo")


OBJECTIVES: dict[str, Callable[[StageContext, Mapping], Objective]] = {
    **{kind: _packed(loss) for kind, loss in LOSSES.items()}, "dpo": _dpo, "distill": _distill, "grpo": _grpo,
    "ppo": _ppo}
OPTION_BLOCKS = ("dpo", "distill", "grpo", "ppo")  # kinds with options, each in the config block of the same name


def updates_per_step(kind: str, block: Mapping[str, Any]) -> int:
  """Optimizer updates in one step of a stage (RL: epochs x minibatches over each rollout), for the lr schedule."""
  if kind in ("grpo", "ppo"):
    from jaxstages.stages.rl import rl_config
    cfg = rl_config(block, kind)
    return cfg.epochs * cfg.minibatches
  return 1


def stage_model(kind: str, block: Mapping[str, Any], model: nnx.Module, mesh: Mesh, rules: tuple) -> nnx.Module:
  """The module a stage trains, built around the loaded policy: PPO adds its critic; every other kind trains the
  model itself."""
  if kind == "ppo":
    from jaxstages.stages.ppo import actor_critic
    from jaxstages.stages.rl import rl_config
    return actor_critic(model, rl_config(block, kind), mesh, rules)
  return model


def objective_block(kind: str, config: Mapping[str, Any]) -> dict:
  """The options block of `kind` from a training config (empty if it has none); rejects an unknown kind and the
  block of another kind (a `dpo` block in a distillation stage is a mistake, not a no-op)."""
  check_keys([kind], OBJECTIVES, "stage kinds")
  for other in OPTION_BLOCKS:
    if other != kind and config.get(other):
      raise ConfigError(f"config block {other!r} belongs to stage kind {other!r}, but stage.kind is {kind!r}")
  return dict(config.get(kind) or {}) if kind in OPTION_BLOCKS else {}
