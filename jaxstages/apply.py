"""Jitted forwards over a batch: `(params, batch) -> fn(model, batch)` with the batch sharded over the data axes.

What a stage computes with a model outside its train step: held-out losses, and a frozen or current model's outputs
that it adds to its batches before the step (reference or teacher log-probs, old log-probs, a critic's values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, use_mesh

Batch = Mapping[str, jax.Array]


def make_apply(graphdef: nnx.GraphDef, fn: Callable[[nnx.Module, Batch], Any], mesh: Mesh, params_sharding,
               rules: LogicalRules = DEFAULT_RULES, out_batch_sharded: bool = False):
  """Jitted `(params, batch) -> fn(model, batch)` with the batch sharded over the data axes: held-out losses, and a
  frozen model's outputs (reference or teacher log-probs) that a stage adds to its batches. `out_batch_sharded`: the
  outputs are `[batch, ...]` arrays, laid out like the batch (so they feed the train step without a copy); else they
  are replicated (small results, e.g. a loss sum, that every process reads)."""

  def apply(params, batch):
    return fn(nnx.merge(graphdef, params), batch)

  compiled = {}

  def call(params, batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in compiled:
      in_batch = {k: batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
      # outputs: laid out like the batch, or replicated (scalars: a held-out loss sum), so every process can read
      # them without a gather
      out = NamedSharding(mesh, PartitionSpec())
      if out_batch_sharded:
        shapes = jax.eval_shape(apply, params, batch)
        out = jax.tree.map(lambda x: batch_sharding(mesh, rules, x.ndim), shapes)
      compiled[key] = jax.jit(apply, in_shardings=(params_sharding, in_batch), out_shardings=out)
    with use_mesh(mesh, rules):
      return compiled[key](params, batch)

  return call


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
  """`[batch, ...]` -> `[micro_batches, batch / micro_batches, ...]`, micro-batch `j` taking rows `j, j+m, j+2m, ...`
  (so a batch sharded over its rows stays sharded over every device within each micro-batch)."""

  def split(x):
    rows = x.shape[0]
    if rows % micro_batches:
      raise ValueError(f"batch of {rows} rows does not split into {micro_batches} micro-batches")
    return x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def map_micro_batches(fn: Callable[[Batch], Any], batch: Batch, micro_batches: int = 1):
  """`fn(batch)` (a tree of `[rows, ...]` arrays) computed `micro_batches` slices of the rows at a time (`lax.map`:
  one slice's activations live at a time), its outputs put back in row order. For the forward passes a stage runs
  outside its train step (old / reference log-probs, a critic's values), micro-batched like the update."""
  if micro_batches == 1:
    return fn(batch)
  out = jax.lax.map(fn, split_micro_batches(batch, micro_batches))
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(-1, *y.shape[2:]), out)
