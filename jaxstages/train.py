"""The one train step and the one train loop every stage uses.

`step(state, batch) -> (state, metrics)`: the stage supplies only a loss function
`loss_fn(model, micro_batch) -> (loss_sum, count, aux_metrics)`. The step splits the global batch into micro-batches
(`lax.scan`), accumulates the gradient of the loss *sum* and the count, and divides both by the count of the whole
global batch at the end. The result is the same loss and gradient however the batch is split into micro-batches or
sharded over devices, which per-micro-batch or per-device means do not give (the normalisation bug class that hit
TRL and verl).

`run_stage(config, workdir)` is the loop around it: mesh, model (fresh, or a previous stage's / an imported
checkpoint), tokenizer, data, optimizer, then steps with metrics every `log_every` steps (the only host syncs),
held-out loss, checkpoints every `checkpoint_every` steps and at the end, and exact resume from the latest checkpoint
(train state and data iterator position) when the same command is run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax._src import distributed as _jax_distributed  # the preemption service's state: no public accessor
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.apply import make_apply, split_micro_batches
from jaxstages.checkpoint import Checkpointer, check_fits
from jaxstages.config import ConfigError, check_bounds, check_keys, from_config, to_dict
from jaxstages.data.pipeline import PACKED_KINDS, DataConfig, data_config, make_pipeline
from jaxstages.data.tokenizer import load_tokenizer, task_tokenizer
from jaxstages.flops import train_flops_per_token
from jaxstages.metrics import MetricsWriter, TrainProgress, write_atomic
from jaxstages.model import create_model, param_count
from jaxstages.model.config import check_positions, stage_model_config
from jaxstages.model.io import load_model, model_config_of
from jaxstages.optim import OptimConfig, make_optimizer
from jaxstages.runfolder import local, locked, start_or_restore
from jaxstages.sharding import (DEFAULT_RULES, LogicalRules, MeshConfig, batch_sharding, check_batch_divisible,
                                data_parallel_size, global_batch_from_process_local, initialize_distributed,
                                make_mesh, sync_processes, use_mesh)
from jaxstages.stages import (OBJECTIVES, OPTION_BLOCKS, StageContext, objective_block, planned_step,
                              rl_plan_programs, stage_model, update_step, updates_per_step)
from jaxstages.state import TrainState, abstract_train_state, init_train_state, state_shardings

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    mesh: Mesh, shardings: TrainState, schedule: optax.Schedule | None = None,
                    micro_batches: int = 1, rules: LogicalRules = DEFAULT_RULES, minibatches: int = 1,
                    epochs: int = 1):
  """The jitted, sharded `step(state, batch) -> (state, metrics)`; `state` is donated.

  One step is one optimizer update of the whole batch, or, with `minibatches` / `epochs` (RL's inner loop: several
  passes over one rollout), `epochs x minibatches` updates, each on a minibatch of the rows, reshuffled every epoch
  with the state's rng (`fold_in(rng, step)`). Each update splits its rows into `micro_batches` and accumulates.

  metrics: `loss` (mean over the (mini)batch), `count` (units counted: tokens, sequences or pairs), `grad_norm`,
  `lr`, `nonfinite` (1 where a NaN / Inf loss or gradient made the update a no-op), and the loss function's aux
  metrics, which it returns either as sums over the same units (reported divided by `count`) or as `(sum, count)`
  pairs of their own (reported as sum / count, e.g. a token mean under a sequence-level loss). With several
  updates, every metric is the mean over the updates, and `<name>_first` holds the first update's value of `loss`,
  `ratio` and `abs_log_ratio` (where the loss reports them): at the first update the params are those that sampled
  the rollout.
  """

  def loss_sum(params, micro_batch):
    total, count, aux = loss_fn(nnx.merge(graphdef, params), micro_batch)
    return total, (count, aux)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  is_pair = lambda x: isinstance(x, tuple)

  def gradients(params, batch):
    """(grads, loss, count, aux) of one update's batch, accumulated over its micro-batches; aux not yet divided."""
    if micro_batches == 1:
      (total, (count, aux)), grads = grad_fn(params, batch)
      return grads, total, count, aux
    micro = split_micro_batches(batch, micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def accumulate(carry, micro_batch):
      grads_acc, total_acc, count_acc, aux_acc = carry
      (total, (count, aux)), grads = grad_fn(params, micro_batch)
      return (jax.tree.map(jnp.add, grads_acc, grads), total_acc + total, count_acc + count,
              jax.tree.map(jnp.add, aux_acc, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_fn(nnx.merge(graphdef, params), first)[2]))
    (grads, total, count, aux), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, aux_zeros), micro)
    return grads, total, count, aux

  def update(params, opt_state, batch):
    grads, total, count, aux = gradients(params, batch)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    # a NaN / Inf loss or gradient skips the update: params and optimizer state stay as they were (so no checkpoint
    # ever holds them), and `nonfinite` counts it; the loop stops after `stage.max_nonfinite` such steps in a row
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)
    metrics = {"loss": total / denominator, "count": count, "grad_norm": grad_norm,
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    for k, v in aux.items():
      metrics[k] = v[0] / jnp.maximum(v[1], 1.0) if is_pair(v) else v / denominator
    return params, opt_state, metrics

  def step(state: TrainState, batch: Batch):
    if minibatches == 1 and epochs == 1:
      params, opt_state, metrics = update(state.params, state.opt_state, batch)
    else:
      rows = next(iter(batch.values())).shape[0]
      key = jax.random.fold_in(state.rng, state.step)

      def one_epoch(carry, epoch):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), rows)
        shuffled = split_micro_batches({k: v[order] for k, v in batch.items()}, minibatches)

        def one_update(carry, minibatch):
          params, opt_state = carry
          params, opt_state, metrics = update(params, opt_state, minibatch)
          return (params, opt_state), metrics

        return jax.lax.scan(one_update, carry, shuffled)

      (params, opt_state), per_update = jax.lax.scan(one_epoch, (state.params, state.opt_state),
                                                     jnp.arange(epochs))
      metrics = jax.tree.map(lambda x: jnp.mean(x), per_update)
      metrics.update({f"{k}_first": per_update[k][0, 0] for k in ("loss", "ratio", "abs_log_ratio")
                      if k in per_update})
    if schedule is not None:
      metrics["lr"] = schedule(state.step * minibatches * epochs)
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  compiled = {}

  def jitted(batch: Batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in compiled:
      rows, shards = next(iter(batch.values())).shape[0], data_parallel_size(mesh, rules)
      if rows % (minibatches * micro_batches * shards):
        per_update = f"minibatches ({minibatches}) x " if minibatches > 1 else ""
        raise ConfigError(f"global batch of {rows} rows must be a multiple of {per_update}micro_batches "
                          f"({micro_batches}) x data-parallel shards ({shards}) of mesh {dict(mesh.shape)}")
      in_batch = {k: batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
      compiled[key] = jax.jit(step, in_shardings=(shardings, in_batch), out_shardings=(shardings, replicated),
                              donate_argnums=0)
    return compiled[key]

  def call(state: TrainState, batch: Batch):
    with use_mesh(mesh, rules):
      return jitted(batch)(state, batch)

  def lower(state: TrainState, batch: Batch):
    """Ahead-of-time lowering (arguments may be `jax.ShapeDtypeStruct`s): for planning memory and FLOPs."""
    with use_mesh(mesh, rules):
      return jitted(batch).lower(state, batch)

  call.lower = lower
  return call


# -- the loop -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """The `stage` block of a training config (the others: `model`, `data`, `optim`, `mesh`)."""

  name: str = "pretrain"
  kind: str = "pretrain"  # the objective: a key of jaxstages.stages.OBJECTIVES
  steps: int = 100  # optimizer updates (with `flops_budget`: the most)
  # stop at the first step boundary where the FLOPs spent (RL: measured, sampling as executed) are within half a
  # step of this budget; a pipeline sets it for RL stages whose length is given in FLOPs
  flops_budget: float | None = None
  micro_batches: int = 1  # gradient accumulation: the global batch is split into this many micro-batches
  seed: int = 0
  init_from: str | None = None  # a stage's checkpoint folder, a params folder, or "hf:FOLDER"
  tokenizer: str | None = None  # a saved tokenizer folder; default: next to init_from, or trained on the task
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  eval_every: int = 0  # held-out loss every N steps (0: only at the end)
  eval_batches: int = 4
  # steps in a row whose update was skipped for a NaN / Inf loss or gradient before the run stops (1: stop at the
  # first); checked every `log_every` steps and before each checkpoint
  max_nonfinite: int = 10
  peak_flops_per_device: float | None = None  # for MFU; default from the device kind when known

  def __post_init__(self):
    check_bounds(self, "stage config", steps=">=1", flops_budget=">0", micro_batches=">=1", log_every=">=1",
                 checkpoint_every=">=1", keep_checkpoints=">=1", eval_every=">=0", eval_batches=">=0",
                 max_nonfinite=">=1", peak_flops_per_device=">0")

  @classmethod
  def from_config(cls, config) -> "StageConfig":
    return from_config(cls, config, where="stage config")


# Peak dense bf16 FLOP/s per chip, for MFU when the config gives none.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


class Preempted(Exception):
  """SIGTERM / SIGINT reached the loop: it saved a checkpoint at the step boundary and stopped (re-run to resume).
  The command line exits with `PREEMPTED_EXIT_CODE`."""

  def __init__(self, stage: str, signum: int | None, step: int):
    received = signal.Signals(signum).name if signum else "a preemption notice (SIGTERM to one of the processes)"
    super().__init__(f"stage {stage!r}: {received} received; checkpoint saved at step {step}; run the same "
                     "command again to resume")
    self.step = step


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again


@contextlib.contextmanager
def preemption_signals():
  """While inside, SIGTERM and SIGINT only set the returned flag (`flag["signal"]`), for the loop to act on at the
  next step boundary (`preempt_requested`). Outside the main thread (where handlers cannot be set) the flag never
  fires.

  On several processes with JAX's preemption service (`jax.distributed` starts it), SIGTERM is left to the
  service's own handler, which tells every process; SIGINT is passed on to it as a SIGTERM to this process."""
  flag = {"signal": None, "step": 0}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  service = preemption_service()

  def handler(signum, frame):
    flag["signal"] = signum
    if service:
      os.kill(os.getpid(), signal.SIGTERM)

  signals = (signal.SIGINT,) if service else (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, handler) for s in signals}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def preemption_service() -> bool:
  """Whether JAX's multi-host preemption sync service runs (several processes, `jax_enable_preemption_service`)."""
  return jax.process_count() > 1 and _jax_distributed.global_state.preemption_sync_manager is not None


def preempt_requested(flag: dict) -> bool:
  """Whether to stop for a preemption after step `flag["step"]` (every process at the same step: saving is a
  collective, and a signal can reach hosts at different steps).

  One process: whether it got SIGTERM / SIGINT. Several: JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`; a SIGTERM to any process makes every process stop at the same
  step soon after, with no collective per step). Without that service, the processes agree by an all-gather of
  their flags, only at steps where `flag["check"]` is set (the loop sets it at its log steps)."""
  if jax.process_count() == 1:
    return flag["signal"] is not None
  if preemption_service():
    return multihost_utils.reached_preemption_sync_point(flag["step"])
  return flag.get("check", True) and bool(
      np.asarray(multihost_utils.process_allgather(np.int32(flag["signal"] is not None))).any())


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a NaN / Inf loss or gradient (`StageConfig.max_nonfinite`)."""


def peak_flops_per_device(configured: float | None) -> float | None:
  if configured:
    return configured
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


CONFIG_BLOCKS = ("stage", "model", "data", "optim", "mesh")


def data_positions(data_cfg: DataConfig) -> dict[str, int]:
  """The longest sequence a pipeline feeds the model, by config key: packed rows and preference pairs are
  `seq_len` long, prompts `prompt_len` (an objective that samples adds its completions)."""
  if data_cfg.kind in PACKED_KINDS + ("preference",):
    return {"data.seq_len": data_cfg.seq_len}
  return {"data.prompt_len": data_cfg.prompt_len}


def next_batch_or_explain(it: Iterator[dict], data_cfg: DataConfig, where: str) -> dict:
  """`next(it)`, or a `ConfigError` saying which data ran out instead of a bare `StopIteration` (a pipeline that
  yields no batch at all, or fewer than the stage needs)."""
  try:
    return next(it)
  except StopIteration:
    sizes = {s.name: s.num_examples or "endless" for s in data_cfg.source_configs}
    raise ConfigError(f"{where}: the {data_cfg.kind} data pipeline ({data_cfg.split} split) has no more batches of "
                      f"{data_cfg.batch_size} rows; examples per source {sizes}, data.epochs={data_cfg.epochs}. Give "
                      "it more examples or epochs (data.epochs=None repeats a finite set forever), or fewer steps "
                      "or eval batches") from None


def _parse_blocks(config, devices):
  """(config dict, StageConfig, mesh, rules, DataConfig): what both running and planning a stage start from."""
  config = to_dict(config)
  check_keys(config, CONFIG_BLOCKS + OPTION_BLOCKS, "training config")
  stage = StageConfig.from_config(config.get("stage"))
  mesh_cfg = MeshConfig.from_config(config.get("mesh"))
  mesh, data_cfg = make_mesh(mesh_cfg, devices), data_config(config["data"])
  check_batch_divisible(data_cfg.batch_size, mesh, mesh_cfg.rules)  # now, not at the first batch after the build
  return config, stage, mesh, mesh_cfg.rules, data_cfg


def resolve_tokenizer(stage: StageConfig, data_cfg, workdir: Path, also: Sequence[str] = (), resume: bool = False):
  """The stage's tokenizer: the configured folder, else `init_from`'s, else that of the frozen models in `also`
  (a distillation teacher), else, resuming, this workdir's (the one its checkpoints were trained with), else one
  trained on the task world. A workdir's tokenizer without checkpoints is a failed start's and is never used;
  `build_stage` saves the tokenizer in the workdir once the stage is built (`write_run_files`)."""
  candidates = [stage.tokenizer]
  for source in ([stage.init_from] if stage.init_from and not stage.init_from.startswith("hf:") else []) + list(also):
    candidates += [Path(source) / "tokenizer", Path(source).parent / "tokenizer"]
  if resume:
    candidates.append(workdir / "tokenizer")
  found = next((Path(f) for f in candidates if f and Path(f).exists()), None)
  if found is None and stage.tokenizer:
    raise FileNotFoundError(f"stage.tokenizer {stage.tokenizer} does not exist")
  return load_tokenizer(found) if found else task_tokenizer(data_cfg.task)  # deterministic on every process


def write_run_files(workdir: Path, config: Mapping[str, Any], tokenizer, resume: bool) -> None:
  """`config.json` and `tokenizer/` of a built stage (process 0), so resumes, evaluation and later stages find them:
  written only once the stage is built, so a config that does not fit changes nothing. A fresh start replaces a
  tokenizer left by a failed one."""
  if jax.process_index() == 0:
    if not resume or not (workdir / "tokenizer").exists():
      if (workdir / "tokenizer").exists():
        shutil.rmtree(workdir / "tokenizer")
      tokenizer.save(workdir / "tokenizer")  # every stage's folder is self-contained
    write_atomic(workdir / "config.json", json.dumps(config, indent=2, default=str))
  sync_processes("jaxstages: run files written")


def initial_model(stage: StageConfig, model_cfg, mesh: Mesh, rules: LogicalRules):
  """A fresh model, or the params of `init_from` (another stage's checkpoints, a params folder, or `hf:FOLDER`)."""
  if not stage.init_from:
    return create_model(model_cfg, stage.seed, mesh, rules)
  return load_model(stage.init_from, mesh, rules, None if stage.init_from.startswith("hf:") else model_cfg)


def initial_model_config(stage: StageConfig, model_cfg):
  """The shape of `initial_model`'s model: the stage's, or an `hf:` source's own."""
  return model_config_of(stage.init_from) if (stage.init_from or "").startswith("hf:") else model_cfg


def held_out_metrics(eval_fn, params, data_cfg, tokenizer, batches: int, mesh: Mesh, rules,
                     prepare: Callable[[Batch], Batch] | None = None) -> dict[str, float]:
  """`eval_loss` and `eval_<aux>` (the loss function's aux metrics, per counted unit) over the same `batches`
  eval-split batches every time. `eval_fn(params, batch) -> (sum, count, aux sums)`; `prepare` adds what the loss
  needs from frozen models (reference log-probs)."""
  it = make_pipeline(data_cfg, tokenizer)
  total, count, aux = 0.0, 0.0, {}
  for _ in range(batches):
    batch = global_batch_from_process_local(next_batch_or_explain(it, data_cfg, "held-out metrics"), mesh, rules)
    if prepare is not None:
      batch = prepare(batch)
    s, c, a = jax.device_get(eval_fn(params, batch))
    total, count = total + float(s), count + float(c)
    for k, v in a.items():
      aux[k] = aux.get(k, 0.0) + float(v)
  denominator = max(count, 1.0)
  return {"eval_loss": total / denominator, **{f"eval_{k}": v / denominator for k, v in aux.items()}}


EVAL_KINDS = ("pretrain", "midtrain", "sft", "preference")  # data kinds whose eval split gives a held-out loss
ATTEMPTS = "attempts.json"  # in a stage's folder: one entry per run of the stage (wall_s, processes, devices, steps)


def read_attempts(workdir: str | Path) -> list[dict]:
  """The recorded attempts at a stage (`run_stage`): each one's wall seconds, processes, devices and steps run."""
  path = Path(workdir) / ATTEMPTS
  return json.loads(path.read_text()) if path.exists() else []


@dataclasses.dataclass
class Stage:
  """Everything a stage's loop runs on, before any resume: `build_stage`'s result (also for tests and benchmarks
  that drive an objective's steps by hand)."""

  stage: StageConfig
  config: dict
  mesh: Mesh
  rules: LogicalRules
  data: Any  # DataConfig
  tokenizer: Any
  model_cfg: Any
  graphdef: nnx.GraphDef
  state: TrainState
  shardings: TrainState
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  objective: Any  # jaxstages.stages.Objective

  def train_step(self):
    """The stage's jitted `step(state, batch) -> (state, metrics)`."""
    return make_train_step(self.graphdef, self.optimizer, self.objective.loss, self.mesh, self.shardings,
                           self.schedule, self.stage.micro_batches, self.rules, self.objective.minibatches,
                           self.objective.epochs)


def schedule_steps(stage: StageConfig, block: Mapping[str, Any], model_cfg, data_cfg: DataConfig) -> int:
  """The steps the learning-rate schedule spans: `stage.steps`, or, for a stage that ends on its FLOP budget, the
  steps the budget buys at the planned FLOPs per step (`stages.planned_step`). An RL stage's FLOPs per step are
  known only once it has sampled, so a pipeline caps its `steps` at the most the budget could buy (every sample
  stopping at once) while it runs about as many steps as the plan's upper bound per step (every sample to the
  token limit) buys: warm-up and decay sized by the cap would stretch over steps that never run. Sized by the plan,
  they end no later than the run; a run that takes more steps finishes at the schedule's last learning rate."""
  if not stage.flops_budget:
    return stage.steps
  per_step = planned_step(stage.kind, block, model_cfg, data_cfg)["flops_per_step"]
  return min(stage.steps, max(1, round(stage.flops_budget / per_step)))


def build_stage(config: Mapping[str, Any] | ml_collections.ConfigDict, workdir: str | Path,
                devices: Sequence[jax.Device] | None = None, resume: bool = False) -> Stage:
  """Parses a stage's config and builds its mesh, tokenizer (saved in `workdir`), model, optimizer, train state and
  objective (`jaxstages.stages.OBJECTIVES[stage.kind]`, configured by its own block, e.g. `grpo`).

  `resume`: the state is about to be restored from a checkpoint, so `Stage.state` is only its abstract target
  (shapes, dtypes and shardings, nothing allocated): the fresh state is never made, and the starting params are
  loaded only if the objective reads them (`StageContext.initial_params`)."""
  config, stage, mesh, rules, data_cfg = _parse_blocks(config, devices)
  block = objective_block(stage.kind, config)
  workdir = Path(workdir)
  frozen = [block[k] for k in ("teacher", "reference") if block.get(k) and not str(block[k]).startswith("hf:")]
  tokenizer = resolve_tokenizer(stage, data_cfg, workdir, also=frozen, resume=resume)
  model_cfg = stage_model_config(config["model"], tokenizer.vocab_size)
  check_positions(model_cfg, data_positions(data_cfg))
  optim_cfg = OptimConfig.from_config(config.get("optim"))
  optimizer, schedule = make_optimizer(optim_cfg, schedule_steps(stage, block, model_cfg, data_cfg)
                                       * updates_per_step(stage.kind, block))

  def starting_model() -> nnx.Module:
    return stage_model(stage.kind, block, initial_model(stage, model_cfg, mesh, rules), mesh, rules)

  if resume:
    abstract_model = nnx.eval_shape(lambda: stage_model(stage.kind, block, create_model(
        initial_model_config(stage, model_cfg), stage.seed), None, rules))
    graphdef, abstract_params = nnx.split(abstract_model)
    check_fits(workdir / "checkpoints", abstract_params)  # another model shape: refused before anything is written
    state, shardings = abstract_train_state(abstract_params, optimizer, mesh, rules)
    loaded = {}

    def starting_params() -> nnx.State:
      if "params" not in loaded:
        loaded["params"] = nnx.state(starting_model())
      return loaded["params"]
  else:
    graphdef, state, shardings = init_train_state(starting_model(), optimizer, mesh, stage.seed, rules)
    starting_params = lambda: state.params
  objective = OBJECTIVES[stage.kind](StageContext(
      stage=stage, data=data_cfg, model_cfg=model_cfg, graphdef=graphdef, mesh=mesh, rules=rules,
      tokenizer=tokenizer, params_sharding=shardings.params, starting_params=starting_params), block)
  if resume:
    loaded.clear()  # an objective keeps what it needs of the starting params (its own copy)
  if data_cfg.kind not in objective.data_kinds:
    raise ConfigError(f"stage kind {stage.kind!r} trains on data kinds {list(objective.data_kinds)}, but the data "
                      f"block has kind {data_cfg.kind!r}")
  write_run_files(workdir, config, tokenizer, resume)
  return Stage(stage, config, mesh, rules, data_cfg, tokenizer, model_cfg, graphdef, state, shardings, optimizer,
               schedule, objective)


def run_stage(config: Mapping[str, Any] | ml_collections.ConfigDict, workdir: str | Path,
              devices: Sequence[jax.Device] | None = None, stop_after: int | None = None) -> dict:
  """Trains one stage to `stage.steps` or its `flops_budget` (resuming from `workdir/checkpoints` when there are
  any) and returns its summary (also written to `workdir/summary.json`). `stop_after` ends the loop early after that
  many steps of this call (tests); `devices` restricts the mesh (default: every device of every process).

  The stage's objective (`jaxstages.stages.OBJECTIVES[stage.kind]`, configured by its own config block, e.g. `dpo`)
  gives the loss, and optionally a `prepare` that adds frozen-model outputs or samples to each batch before the
  jitted step, and held-out metrics of its own.

  Every call is one attempt at the stage: its wall time, processes and devices are recorded in
  `workdir/attempts.json` as it goes (after the build, at every log, checkpoint and evaluation), so the time of an
  attempt that was killed is kept up to its last record, and the summary's `wall_s` is the sum over attempts."""
  attempt_start = time.perf_counter()
  initialize_distributed()
  workdir = local(workdir)
  with locked(workdir):  # one writer at a time
    return _run_stage(config, workdir, devices, stop_after, attempt_start)


def _run_stage(config, workdir: Path, devices, stop_after: int | None, attempt_start: float) -> dict:
  """`run_stage` holding the workdir's lock. A start that fails (up to the restored state) leaves the workdir as it
  was (`runfolder.start_or_restore`)."""
  with start_or_restore(workdir):
    stage = StageConfig.from_config(to_dict(config).get("stage"))
    checkpointer = Checkpointer(workdir / "checkpoints", stage.checkpoint_every, stage.keep_checkpoints,
                                stage.async_checkpoints)
    resume = checkpointer.latest_step() is not None
    # resuming, the state is built abstract and restored into: the fresh one is never made
    built = build_stage(config, workdir, devices, resume=resume)
    stage, mesh, rules, data_cfg, tokenizer, model_cfg = (built.stage, built.mesh, built.rules, built.data,
                                                          built.tokenizer, built.model_cfg)
    graphdef, state, shardings, objective = built.graphdef, built.state, built.shardings, built.objective
    data_iter = make_pipeline(data_cfg, tokenizer)
    resumed_from = None
    if resume:
      state, data_state = checkpointer.restore(state, shardings)  # the latest good step (broken ones set aside)
      resumed_from = int(state.step)
      objective_state = data_state.pop("objective", None)
      data_iter.set_state(data_state)
      if objective.set_state is not None and objective_state is not None:
        objective.set_state(objective_state)
  step_fn = built.train_step()
  eval_fn = make_apply(graphdef, objective.eval_loss or objective.loss, mesh, shardings.params, rules)
  eval_cfg = dataclasses.replace(data_cfg, split="eval") if data_cfg.kind in EVAL_KINDS else None

  def evaluate(params) -> dict[str, float]:
    out = {}
    if eval_cfg:
      out.update(held_out_metrics(eval_fn, params, eval_cfg, tokenizer, stage.eval_batches, mesh, rules,
                                  objective.eval_prepare))
    if objective.evaluate is not None:
      out.update(objective.evaluate(params))
    return out

  def loader_state() -> dict:
    """The data iterator's position, and the objective's own state when it has one (saved together)."""
    out = data_iter.get_state()
    return {**out, "objective": objective.get_state()} if objective.get_state is not None else out

  def next_batch() -> Batch:
    return global_batch_from_process_local(next_batch_or_explain(data_iter, data_cfg, f"stage {stage.name!r}"),
                                           mesh, rules)

  writer = MetricsWriter(workdir, resumed_from=resumed_from)
  tokens_per_step = objective.tokens_per_step or data_cfg.batch_size * data_cfg.seq_len
  flops_per_step = objective.flops_per_step or train_flops_per_token(model_cfg, data_cfg.seq_len) * tokens_per_step
  peak = peak_flops_per_device(stage.peak_flops_per_device)
  start = int(state.step)
  attempts = read_attempts(workdir)  # the earlier attempts at this stage (a killed one left its last record)
  attempt = {"wall_s": 0.0, "processes": jax.process_count(), "devices": mesh.size, "from_step": start,
             "to_step": start}

  def record_attempt(step: int) -> None:
    attempt.update(wall_s=time.perf_counter() - attempt_start, to_step=step)
    if jax.process_index() == 0:
      write_atomic(workdir / ATTEMPTS, json.dumps(attempts + [attempt], indent=2))

  def flops_spent(steps_taken: int) -> float:
    """The FLOPs of the first `steps_taken` steps: measured by the objective where its steps vary (RL: sampling as
    executed; a function of the checkpointed state), else the planned FLOPs per step times the steps."""
    measured = objective.get_state() if objective.get_state is not None else {}
    return float(measured.get("flops_spent", flops_per_step * steps_taken))

  def budget_spent(steps_taken: int) -> bool:
    """Whether `stage.flops_budget` is spent to within half a step (a function of the checkpointed state, so a
    resumed run stops where an uninterrupted one does)."""
    if not stage.flops_budget:
      return False
    spent = flops_spent(steps_taken)
    per_step = spent / steps_taken if steps_taken else flops_per_step
    return spent + per_step / 2 >= stage.flops_budget

  streak = {"steps": 0, "checked": 0}  # updates skipped in a row for non-finite numbers; entries of `pending` seen

  def check_finite() -> None:
    """Stops the run once `stage.max_nonfinite` steps in a row had their update skipped (NaN / Inf)."""
    flags = jax.device_get([m["nonfinite"] for m in pending[streak["checked"]:]])
    for i, flag in enumerate(flags, start=last_step + streak["checked"] + 1):
      streak["steps"] = streak["steps"] + 1 if float(flag) > 0 else 0
      if streak["steps"] >= stage.max_nonfinite:
        raise NonFiniteError(
            f"stage {stage.name!r} ({stage.kind}): the loss or a gradient was NaN/Inf at {streak['steps']} steps in "
            f"a row (steps {i - streak['steps'] + 1}-{i}); their updates were skipped, so the params and every "
            f"checkpoint are the last finite ones (latest: step {checkpointer.latest_step()}). Lower the learning "
            "rate, check the data of those steps, or raise stage.max_nonfinite")
    streak["checked"] = len(pending)

  record_attempt(start)
  bar = TrainProgress(stage.steps, f"{stage.name}", initial=start)
  pending, last_time, last_step, start_time = [], time.perf_counter(), start, time.perf_counter()
  last_flops = flops_spent(start)
  end = stage.steps if stop_after is None else min(stage.steps, start + stop_after)
  preempted = False
  with preemption_signals() as preemption:
    for step in range(start, end):
      if budget_spent(step):  # resumed after the budget was spent
        break
      batch = next_batch()
      if objective.prepare is not None:
        batch = objective.prepare(state, batch, step, next_batch)
      state, metrics = step_fn(state, batch)
      if objective.host_metrics is not None:
        metrics = {**metrics, **objective.host_metrics()}
      pending.append(metrics)
      done = step + 1
      preemption.update(step=done, check=done % stage.log_every == 0)
      preempted = preempt_requested(preemption)
      last = done == end or budget_spent(done) or preempted
      if done % stage.log_every == 0 or last:
        check_finite()
        fetched = jax.device_get(pending)  # one host sync every log_every steps (replicated metrics: no gather)
        now = time.perf_counter()
        seconds = (now - last_time) / (done - last_step)
        row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
        spent = flops_spent(done)  # measured where the objective measures (RL), not the plan's upper bound
        row.update(loss=float(fetched[-1]["loss"]), lr=float(fetched[-1].get("lr", 0.0)), step_time_s=seconds,
                   tokens_per_s=tokens_per_step / seconds, flops=spent)
        if peak:
          row["mfu"] = (spent - last_flops) / (now - last_time) / (peak * mesh.size)
        writer.write(done, row)
        bar.log(done, row)
        pending, last_time, last_step, last_flops = [], now, done, spent
        streak["checked"] = 0
        record_attempt(done)
      if done % stage.checkpoint_every == 0 or preempted:
        check_finite()
        checkpointer.save(state, loader_state(), step=done, force=done % stage.checkpoint_every != 0)
        record_attempt(done)
      if stage.eval_every and done % stage.eval_every == 0 and not last:
        writer.write(done, evaluate(state.params))
        record_attempt(done)
      if last:
        break
  bar.close()
  if preempted:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    record_attempt(done)
    raise Preempted(stage.name, preemption["signal"], done)
  final_step = int(state.step)
  finished = final_step == stage.steps or budget_spent(final_step)
  if checkpointer.latest_step() != final_step:
    checkpointer.save(state, loader_state(), force=True)
  checkpointer.wait()
  checkpointer.close()
  summary = {"stage": stage.name, "kind": stage.kind, "step": final_step, "steps": stage.steps, "finished": finished,
             "flops_budget": stage.flops_budget, "resumed_from": resumed_from, "params": param_count(model_cfg),
             "tokens": final_step * tokens_per_step, "flops": flops_per_step * final_step,
             "wall_s_this_run": time.perf_counter() - start_time}
  if objective.get_state is not None and "flops_spent" in objective.get_state():
    summary["flops_spent"] = objective.get_state()["flops_spent"]  # measured (RL: sampling as executed), not planned
  if finished:
    held_out = evaluate(state.params)
    summary.update(held_out)
    if held_out:
      writer.write(final_step, held_out)
  writer.close()
  record_attempt(final_step)
  every = attempts + [attempt]
  summary.update(attempts=len(every), wall_s=sum(a["wall_s"] for a in every),
                 device_s=sum(a["wall_s"] * a["devices"] for a in every),
                 processes=max(a["processes"] for a in every))
  if jax.process_index() == 0:
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
  sync_processes("jaxstages: stage summary written")  # a caller on any process may read it (the schedule)
  return summary


def _abstract_batch(data_cfg, tokenizer) -> dict:
  """Shapes of one global batch of a stage's pipeline (one process-local batch made, its rows times the processes)."""
  local = next_batch_or_explain(make_pipeline(data_cfg, tokenizer), data_cfg, "plan")
  return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype)
          for k, v in local.items()}


CPU_MEMORY_NOTE = ("compiled for CPU: XLA:CPU keeps temporaries an accelerator's compiler would fuse away, so these "
                   "figures overstate an accelerator's; run plan where the stage will run for its own")


def plan_stage(config: Mapping[str, Any] | ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None) -> dict:
  """Sizes a stage of any kind without training or loading anything: parameters, FLOPs per step, and the
  AOT-compiled update step's memory per device, on the batch shapes the stage's update trains on
  (`stages.update_step`: a pipeline batch, plus what its `prepare` adds, or RL's rollout rows).

  XLA counts a scanned body once, so its FLOPs come from the step compiled without micro-batches on one
  minibatch's rows, times the updates per step; the memory from the step as configured. `memory_note` says when
  the compile was for CPU (its temporaries are no guide to an accelerator's)."""
  config, stage, mesh, rules, data_cfg = _parse_blocks(config, devices)
  block = objective_block(stage.kind, config)
  # the configured tokenizer where it exists (a pipeline's run tokenizer is made when the run starts)
  tokenizer = (load_tokenizer(stage.tokenizer) if stage.tokenizer and Path(stage.tokenizer).exists() else
               task_tokenizer(data_cfg.task, n_samples=200))
  model_cfg = stage_model_config(config["model"], tokenizer.vocab_size)
  check_positions(model_cfg, data_positions(data_cfg))
  loss, batch, minibatches, epochs = update_step(stage.kind, block, model_cfg, data_cfg,
                                                 _abstract_batch(data_cfg, tokenizer))
  teacher = block.get("teacher")
  teacher_cfg = model_config_of(teacher) if teacher and (teacher.startswith("hf:") or Path(teacher).exists()) else None
  planned = planned_step(stage.kind, block, model_cfg, data_cfg, teacher_cfg or model_cfg)
  optimizer, schedule = make_optimizer(OptimConfig.from_config(config.get("optim")),
                                       stage.steps * minibatches * epochs)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: stage_model(stage.kind, block, create_model(
      initial_model_config(stage, model_cfg), stage.seed), None, rules)))
  abstract = TrainState(params, jax.eval_shape(optimizer.init, params), jax.ShapeDtypeStruct((), jnp.int32),
                        jax.eval_shape(lambda: jax.random.key(0)))
  shardings = state_shardings(abstract, optimizer, mesh, rules)

  def compiled_step(micro_batches: int, minibatches: int, epochs: int, rows_batch: dict):
    step = make_train_step(graphdef, optimizer, loss, mesh, shardings, schedule, micro_batches, rules, minibatches,
                           epochs)
    return step.lower(abstract, rows_batch).compile()

  start = time.perf_counter()
  compiled = compiled_step(stage.micro_batches, minibatches, epochs, batch)
  compile_s = time.perf_counter() - start
  updates = minibatches * epochs
  if stage.micro_batches > 1 or updates > 1:  # one unscanned update on one minibatch's rows, counted `updates` times
    rows = next(iter(batch.values())).shape[0] // minibatches
    one = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()}
    flop_cost = compiled_step(1, 1, 1, one).cost_analysis()
  else:
    flop_cost = compiled.cost_analysis()
  flop_cost = flop_cost[0] if isinstance(flop_cost, list) else flop_cost
  extra = {}
  if stage.kind == "grpo":  # the rollout's log-prob pass (its post-processing) apart, and where logits live
    logprobs = rl_plan_programs(block, stage.kind, data_cfg, graphdef, params, mesh, rules, stage.micro_batches)[2]
    logprobs = logprobs().compile()
    extra = {"logprobs_memory_per_device_bytes": _memory(logprobs),
             "logprobs_vocab_buffers": _vocab_buffers(logprobs, model_cfg.vocab_size),
             "update_vocab_buffers": _vocab_buffers(compiled, model_cfg.vocab_size)}
  mem = _memory(compiled)
  platform = mesh.devices.flat[0].platform
  return {"stage": stage.name, "kind": stage.kind, "mesh": dict(mesh.shape), "params": param_count(model_cfg),
          "tokens_per_step": planned["tokens_per_step"], "steps": stage.steps,
          "flops_per_step": planned["flops_per_step"],
          "xla_flops_per_step_per_device": float(flop_cost.get("flops", 0.0)) * updates,
          "memory_per_device_bytes": mem, "platform": platform,
          "memory_note": CPU_MEMORY_NOTE if platform == "cpu" else None,
          "flops_note": None if teacher_cfg or not teacher else (
              f"teacher {teacher} not found: its forwards counted at the student's shape"),
          "compile_s": compile_s, **extra}


def _vocab_buffers(compiled, vocab: int) -> list[str]:
  """The shapes of the float32 `[..., vocab]` buffers of a compiled program (per device), e.g. `f32[1,256,151936]`:
  where the logits live and how many positions at a time."""
  found = set(re.findall(rf"f32\[[\d,]*,{vocab}\]", compiled.as_text()))
  return sorted(found, key=lambda s: [int(x) for x in s[4:-1].split(",")])


def _memory(compiled) -> dict:
  """A compiled program's memory per device; donated state aliases its output, so arguments + outputs - aliased +
  temporaries is what is live at the peak."""
  memory = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  mem = {f.removesuffix("_size_in_bytes"): int(getattr(memory, f, 0) or 0) for f in fields}
  mem["peak_estimate"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  return mem
