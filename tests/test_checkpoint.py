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


def _biggest_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _saved_steps(tmp_path, tiny_cfg, steps=(1, 2, 3)):
  mesh = make_mesh(MeshConfig(8, 1, 1))
  _, state, shardings = init_train_state(create_model(tiny_cfg, seed=1, mesh=mesh), optax.adamw(1e-3), mesh, seed=3)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  saved = {}
  for step in steps:
    state = type(state)(jax.tree.map(lambda p: p + 1.0, state.params), state.opt_state, state.step * 0 + step,
                        state.rng)
    ckpt.save(state, {"position": step})
    saved[step] = _leaves(state.params)
  ckpt.wait()
  ckpt.close()
  return state, shardings, saved


def test_broken_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, tiny_cfg, devices):
  import pytest

  from jaxstages.checkpoint import MANIFEST, BrokenCheckpointError

  target, shardings, saved = _saved_steps(tmp_path, tiny_cfg)
  root = tmp_path / "ckpt"
  assert all((root / str(s) / MANIFEST).exists() for s in (1, 2, 3))
  # no pickles anywhere: tensorstore chunks and JSON only (a pickle starts with PROTO 0x80 and a protocol number)
  for path in root.rglob("*"):
    if path.is_file():
      head = path.read_bytes()[:2]
      assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), path

  # step 3 truncated (a partly written file), step 2 with a file missing: the run falls back to step 1
  big = _biggest_file(root / "3")
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  (_biggest_file(root / "2")).unlink()
  ckpt = Checkpointer(root, save_every=1, keep=3)
  with pytest.warns(UserWarning) as caught:
    restored, data = ckpt.restore(target, shardings)
  messages = [str(w.message) for w in caught]
  assert any("step 3" in m and "bytes" in m and "resumes from step 1" in m for m in messages), messages
  assert any("step 2" in m and "missing" in m and "resumes from step 1" in m for m in messages), messages
  assert int(restored.step) == 1 and data == {"position": 1}
  for a, b in zip(_leaves(restored.params), saved[1]):
    np.testing.assert_array_equal(a, b)
  # the broken steps are kept aside for inspection, and their step numbers can be saved again
  assert sorted(p.name for p in (tmp_path / "broken_checkpoints").iterdir()) == ["2", "3"]
  assert ckpt.all_steps() == [1]
  assert ckpt.save(restored, {"position": 2}, force=True, step=2)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()

  # without a manifest (killed between commit and manifest) a damaged step is caught by its failed restore
  (root / "2" / MANIFEST).unlink()
  big = _biggest_file(root / "2")
  big.write_bytes(b"\0" * big.stat().st_size)
  with pytest.warns(UserWarning, match="step 2 .*restoring it failed.*resumes from step 1"):
    restored, _ = Checkpointer(root, save_every=1, keep=3).restore(target, shardings)
  assert int(restored.step) == 1

  # nothing good left: an error naming every step and what is wrong with it, never garbage
  big = _biggest_file(root / "1")
  big.write_bytes(big.read_bytes()[:-1])
  with pytest.raises(BrokenCheckpointError, match="step 1: .*bytes"):
    Checkpointer(root, save_every=1, keep=3).restore(target, shardings)


def test_params_of_another_shape_name_the_tensor_and_both_shapes(tmp_path, tiny_cfg, devices):
  """The stage hand-off from a checkpoint folder checks shapes before reading: a narrower model is refused with
  the tensor's name and both shapes (a params folder does the same: tests/test_bad_input.py)."""
  import dataclasses

  import pytest
  from flax import nnx

  from jaxstages.checkpoint import CheckpointMismatchError
  from jaxstages.sharding import param_shardings

  _saved_steps(tmp_path, tiny_cfg, steps=(1,))
  mesh = make_mesh(MeshConfig(8, 1, 1))
  narrow = dataclasses.replace(tiny_cfg, hidden_size=32)
  _, target = nnx.split(nnx.eval_shape(lambda: create_model(narrow, 0)))
  expected = (r"ckpt \(step 1\): tensor '[\w.]+' has shape \((\d+, )*64(, \d+)*\) in the checkpoint but the model "
              r"expects \((\d+, )*32(, \d+)*\)")
  with pytest.raises(CheckpointMismatchError, match=expected):
    restore_params(tmp_path / "ckpt", target, param_shardings(target, mesh))


def test_a_policy_checkpointed_with_its_critic_loads_as_a_plain_model(tmp_path, tiny_cfg, devices):
  """PPO's checkpoints hold the policy and a separate critic; the policy is its own subtree (`policy`), so
  `load_model` reads it as a plain model (onto another mesh) from the checkpoint alone: no stage config, no critic
  built or read."""
  from types import SimpleNamespace

  from flax import nnx

  from jaxstages.model.io import load_model
  from jaxstages.sharding import DEFAULT_RULES
  from jaxstages.stages.ppo import actor_critic

  mesh = make_mesh(MeshConfig(8, 1, 1))
  model = actor_critic(create_model(tiny_cfg, seed=1, mesh=mesh), SimpleNamespace(critic="separate"), mesh,
                       DEFAULT_RULES)
  _, state, _ = init_train_state(model, optax.sgd(1.0), mesh)
  params = jax.tree.map(lambda p: p + 1.0, state.params)  # the trunk copies differ from a fresh model and each other
  params["critic_trunk"] = jax.tree.map(lambda p: p * 3.0, params["critic_trunk"])
  ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1)
  ckpt.save(type(state)(params, state.opt_state, state.step + 1, state.rng))
  ckpt.wait()
  ckpt.close()
  policy = load_model(tmp_path, make_mesh(MeshConfig(2, 2, 2)), model_cfg=tiny_cfg)
  want = [np.asarray(x) for x in jax.tree.leaves(params["policy"])]
  got = [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, nnx.Param))]
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
