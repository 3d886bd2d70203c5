"""What a stage's objective gives the shared train loop (`Objective`) and what it may build on (`StageContext`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What an objective may build on: the stage, its data config, the model's shape and graph, the mesh, the
  tokenizer, where the trained params live (`params_sharding`), and the params the stage starts from
  (`initial_params`: before any resume; copy them if they must outlive the first, donating, step).

  `initial_params` is read on demand: a resumed stage restores its train state from a checkpoint and loads the
  starting params (from `stage.init_from`, or a fresh initialisation) only for an objective that reads them (a
  reference or drift model); other objectives never have them in memory next to the restored state."""

  stage: Any  # jaxstages.train.StageConfig (the loop's config, a layer above: only read here)
  data: Any  # jaxstages.data.pipeline.DataConfig
  model_cfg: Any
  graphdef: nnx.GraphDef
  mesh: Mesh
  rules: tuple
  tokenizer: Any
  params_sharding: Any  # a tree like the params, of NamedShardings
  starting_params: Callable[[], nnx.State]  # loads (or returns) the stage's starting params; see `initial_params`

  @property
  def initial_params(self) -> nnx.State:
    return self.starting_params()


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
  get_state, set_state: the objective's own state (e.g. an adaptive KL coefficient), saved with every checkpoint;
                  an entry `flops_spent` in it is the FLOPs the stage's steps have spent so far, measured, for a stage
                  whose steps vary (RL: sampling as executed): the loop logs it as `flops`, and MFU, the summary and a
                  FLOP budget use it instead of `flops_per_step` (a plan; for RL an upper bound)
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
