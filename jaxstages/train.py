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

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.config import ConfigError
from jaxstages.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, data_parallel_size, use_mesh
from jaxstages.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
  """`[batch, ...]` -> `[micro_batches, batch / micro_batches, ...]`, micro-batch `j` taking rows `j, j+m, j+2m, ...`
  so that every micro-batch is spread over all data-parallel devices rather than living on a few of them."""
  def split(x):
    rows = x.shape[0]
    if rows % micro_batches:
      raise ValueError(f"batch of {rows} rows does not split into {micro_batches} micro-batches")
    return x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    mesh: Mesh, shardings: TrainState, schedule: optax.Schedule | None = None,
                    micro_batches: int = 1, rules: LogicalRules = DEFAULT_RULES):
  """The jitted, sharded `step(state, batch) -> (state, metrics)`; `state` is donated.

  metrics: `loss` (global token mean), `count` (tokens counted), `grad_norm`, `lr`, and the loss function's aux
  metrics summed over micro-batches (a stage returns sums and divides by `count` itself where it wants means).
  """

  def loss_sum(params, micro_batch):
    total, count, aux = loss_fn(nnx.merge(graphdef, params), micro_batch)
    return total, (count, aux)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state: TrainState, batch: Batch):
    if micro_batches == 1:
      (total, (count, aux)), grads = grad_fn(state.params, batch)
    else:
      micro = split_micro_batches(batch, micro_batches)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def accumulate(carry, micro_batch):
        grads_acc, total_acc, count_acc, aux_acc = carry
        (total, (count, aux)), grads = grad_fn(state.params, micro_batch)
        return (jax.tree.map(jnp.add, grads_acc, grads), total_acc + total, count_acc + count,
                jax.tree.map(jnp.add, aux_acc, aux)), None

      first = jax.tree.map(lambda x: x[0], micro)
      aux_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_fn(nnx.merge(graphdef, state.params),
                                                                              first)[2]))
      (grads, total, count, aux), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, aux_zeros), micro)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total / denominator, "count": count, "grad_norm": optax.global_norm(grads), **aux}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  compiled = {}

  def call(state: TrainState, batch: Batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in compiled:
      rows, shards = next(iter(batch.values())).shape[0], data_parallel_size(mesh, rules)
      if rows % (micro_batches * shards):
        raise ConfigError(f"global batch of {rows} rows must be a multiple of micro_batches ({micro_batches}) x "
                          f"data-parallel shards ({shards}) of mesh {dict(mesh.shape)}")
      in_batch = {k: batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
      compiled[key] = jax.jit(step, in_shardings=(shardings, in_batch), out_shardings=(shardings, replicated),
                              donate_argnums=0)
    with use_mesh(mesh, rules):
      return compiled[key](state, batch)

  return call
