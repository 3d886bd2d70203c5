"""The train state pytree: params, optimizer state, step and rng, and where each lives on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.sharding import DEFAULT_RULES, LogicalRules, optimizer_shardings, param_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: nnx.State
  opt_state: Any
  step: jax.Array  # int32 scalar: updates applied so far
  rng: jax.Array  # a key for stages that need randomness inside the step


def state_shardings(state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> TrainState:
  """Where every leaf of the train state lives: params and optimizer slots by the logical rules, the rest replicated."""
  p = param_shardings(state.params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(params=p, opt_state=optimizer_shardings(optimizer, state.params, p, mesh), step=replicated,
                    rng=replicated)


def abstract_train_state(params: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: LogicalRules = DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """`(abstract state, shardings)`: the train state's shapes and dtypes for `params` (arrays or abstract
  `nnx.eval_shape` variables), with every leaf's sharding, allocating nothing: the target a checkpoint is restored
  into, and what `init_train_state` creates."""
  abstract_params = jax.eval_shape(lambda p: p, params)
  abstract = TrainState(abstract_params, jax.eval_shape(optimizer.init, abstract_params),
                        jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
  shardings = state_shardings(abstract, optimizer, mesh, rules)
  with_shardings = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return with_shardings, shardings


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int = 0,
                     rules: LogicalRules = DEFAULT_RULES) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Splits `model` (already on `mesh`, e.g. from `create_model(cfg, seed, mesh)`) into its graph definition and a
  sharded train state. Returns `(graphdef, state, shardings)`. Every new array is created by a jitted function
  straight into its sharding (never `device_put` onto a global sharding, which fails on several processes)."""
  graphdef, params = nnx.split(model)
  _, shardings = abstract_train_state(params, optimizer, mesh, rules)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.key(seed)),
                      out_shardings=(shardings.step, shardings.rng))()
  return graphdef, TrainState(params, opt_state, step, rng), shardings
