"""Checkpoints: full state and data-iterator state round trip, keep-last-K, restore onto another mesh, params-only."""

import jax
import numpy as np
import optax

from jaxstages.checkpoint import Checkpointer, restore_params
from jaxstages.model import create_model
from jaxstages.sharding import MeshConfig, make_mesh
from jaxstages.state import init_train_state


def _leaves(tree):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]


def test_save_restore_on_another_mesh_and_params_only(tmp_path, tiny_cfg, devices):
  optimizer = optax.adamw(1e-3)
  mesh_a = make_mesh(MeshConfig(8, 1, 1))
  _, state, _ = init_train_state(create_model(tiny_cfg, seed=1, mesh=mesh_a), optimizer, mesh_a, seed=3)
  # make the optimizer state non-trivial
  grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p), state.params)
  _, opt_state = optimizer.update(grads, state.opt_state, state.params)
  state = type(state)(state.params, opt_state, state.step + 7, state.rng)

  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  for step in (5, 6, 7):
    ckpt.save(type(state)(state.params, state.opt_state, state.step * 0 + step, state.rng), {"position": step})
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]

  mesh_b = make_mesh(MeshConfig(2, 2, 2))
  _, target, shardings = init_train_state(create_model(tiny_cfg, seed=2, mesh=mesh_b), optimizer, mesh_b, seed=9)
  restored, data = ckpt.restore(target, shardings)
  ckpt.close()
  assert data == {"position": 7} and int(restored.step) == 7
  for a, b in zip(_leaves(restored), _leaves(state)):  # params, both Adam moments, count, step and rng
    np.testing.assert_array_equal(a, b)
  q = restored.params["layers"][0]["attn"]["q"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)  # resharded onto mesh_b

  params = restore_params(tmp_path / "ckpt", target.params, shardings.params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
