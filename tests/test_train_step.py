"""The shared train step: the same global batch gives the same loss and gradient for any micro-batch split and mesh."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstages.config import ConfigError
from jaxstages.losses import next_token_loss
from jaxstages.model import create_model
from jaxstages.sharding import MeshConfig, make_mesh, shard_batch
from jaxstages.state import init_train_state
from jaxstages.train import make_train_step


def lm_loss(model, batch):
  total, count = next_token_loss(model, batch)
  return total, count, {}


def uneven_batch(cfg, rows=8, seq=32):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
  mask = np.zeros((rows, seq), np.float32)
  for r, n in enumerate([32, 1, 20, 3, 32, 7, 2, 30]):  # very different counted tokens per row
    mask[r, :n] = 1
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=mask)


@pytest.fixture(scope="module")
def runs(tiny_cfg, devices):
  """(mesh, micro_batches) -> (loss, grad_norm, -gradient as the SGD(1.0) update of every parameter)."""
  # a wide init spreads per-token losses, so a wrong normalisation shows clearly
  cfg = tiny_cfg.replace(num_heads=8, num_kv_heads=4, head_dim=8, init_std=0.3)
  batch = uneven_batch(cfg)
  out = {}
  for shape, micro in [((1, 1, 1), 1), ((1, 1, 1), 4), ((8, 1, 1), 1), ((2, 2, 2), 2)]:
    mesh = make_mesh(MeshConfig(*shape), devices[:int(np.prod(shape))])
    model = create_model(cfg, seed=0, mesh=mesh)
    before = jax.tree.map(np.asarray, nnx.state(model))
    optimizer = optax.sgd(1.0)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, lm_loss, mesh, shardings, micro_batches=micro)
    state, metrics = step(state, shard_batch(batch, mesh))
    update = jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before)
    out[(shape, micro)] = (float(metrics["loss"]), float(metrics["grad_norm"]), update, float(metrics["count"]))
  return out


def test_loss_and_gradients_do_not_depend_on_micro_batches_or_mesh(runs):
  ref_loss, ref_norm, ref_update, ref_count = runs[((1, 1, 1), 1)]
  assert ref_count == 127
  for key, (loss, norm, update, count) in runs.items():
    assert count == ref_count
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss, key
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, key
    for u, r in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
      np.testing.assert_allclose(u, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


def test_per_micro_batch_means_would_differ(runs, tiny_cfg):
  """The check above can fail: averaging per-micro-batch means gives a different loss for this batch."""
  # a wide init spreads per-token losses, so a wrong normalisation shows clearly
  cfg = tiny_cfg.replace(num_heads=8, num_kv_heads=4, head_dim=8, init_std=0.3)
  batch = uneven_batch(cfg)
  model = create_model(cfg, seed=0)
  halves = []
  for rows in (slice(0, 8, 2), slice(1, 8, 2)):
    total, count = next_token_loss(model, {k: v[rows] for k, v in batch.items()})
    halves.append(float(total / count))
  assert abs(np.mean(halves) - runs[((1, 1, 1), 1)][0]) > 1e-2


def test_batch_that_does_not_split_is_refused(tiny_cfg, devices):
  mesh = make_mesh(MeshConfig(4, 1, 1), devices[:4])
  model = create_model(tiny_cfg, seed=0, mesh=mesh)
  optimizer = optax.sgd(0.1)
  graphdef, state, shardings = init_train_state(model, optimizer, mesh)
  step = make_train_step(graphdef, optimizer, lm_loss, mesh, shardings, micro_batches=4)
  with pytest.raises(ConfigError, match="multiple of micro_batches \\(4\\) x data-parallel shards \\(4\\)"):
    step(state, shard_batch(uneven_batch(tiny_cfg), mesh))
