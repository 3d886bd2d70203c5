"""Loss building blocks shared by every stage.

Losses return a `(sum, count)` pair rather than a mean: the caller divides by the *global* count of the whole batch,
so a batch gives the same loss and gradient however it is split into micro-batches or sharded over devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, param_shardings, use_mesh

Batch = Mapping[str, jax.Array]


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, float32. logits `[batch, seq, vocab]`, targets `[batch, seq]` -> `[batch, seq]`."""
  chex.assert_equal_shape_prefix([logits, targets], 2)
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over positions where `loss_mask` is 1, and their count.

  batch: `tokens`, `targets`, `loss_mask` `[batch, seq]`; optional `positions`, `segment_ids` `[batch, seq]`.
  """
  logits, _ = model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = -token_log_probs(logits, batch["targets"])
  return jnp.sum(nll * mask), jnp.sum(mask)


LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]


def make_loss_and_grad(model: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                       loss_fn: LossFn = next_token_loss):
  """A jitted `(params, batch) -> (loss, grads, grad_norm)` with explicit shardings: params and grads laid out by the
  rules, the batch sharded over the data axes, the loss the global-count-normalised mean."""
  graphdef, params = nnx.split(model)
  p_shard = param_shardings(params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def loss_and_grad(params: nnx.State, batch: Batch):
    def mean_loss(params):
      total, count = loss_fn(nnx.merge(graphdef, params), batch)
      return total / jnp.maximum(count, 1.0)

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return loss, grads, optax.global_norm(grads)

  def batch_shardings(batch):
    return {k: batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}

  compiled = {}

  def call(params: nnx.State, batch: Batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in compiled:
      compiled[key] = jax.jit(loss_and_grad, in_shardings=(p_shard, batch_shardings(batch)),
                              out_shardings=(replicated, p_shard, replicated))
    with use_mesh(mesh, rules):
      return compiled[key](params, batch)

  return call
