"""Meshes of every shape give the same loss and gradient; parameters are laid out as the rules say."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxstages.config import ConfigError
from jaxstages.losses import make_loss_and_grad
from jaxstages.model import create_model
from jaxstages.sharding import MeshConfig, logical_to_spec, make_mesh, shard_batch

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 1)]


def lm_batch(cfg, batch=8, seq=24, seed=0):
  tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  mask = np.ones((batch, seq), np.float32)
  mask[::3, :5] = 0  # rows with different counts: the mean must be over the global count, not per shard
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=mask)


@pytest.fixture(scope="module")
def results(tiny_cfg, devices):
  """mesh shape -> (loss, grad norm, params, grads, mesh)."""
  cfg = tiny_cfg.replace(num_heads=8, num_kv_heads=4, head_dim=8)  # head counts the tensor axis can split
  batch = lm_batch(cfg)
  out = {}
  for shape in MESHES:
    mesh = make_mesh(MeshConfig(*shape), devices[:int(np.prod(shape))])
    model = create_model(cfg, seed=0, mesh=mesh)
    params = nnx.state(model)
    loss, grads, grad_norm = make_loss_and_grad(model, mesh)(params, shard_batch(batch, mesh))
    out[shape] = (float(loss), float(grad_norm), params, grads, mesh)
  return out


def test_same_loss_and_gradient_norm_on_every_mesh(results):
  loss0, norm0, _, grads0, _ = results[(1, 1, 1)]
  for shape, (loss, norm, _, grads, _) in results.items():
    assert abs(loss - loss0) <= 1e-5 * abs(loss0), shape
    assert abs(norm - norm0) <= 1e-5 * abs(norm0), shape
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-6)


def test_loss_is_the_global_token_mean(results, tiny_cfg):
  """Against a plain NumPy cross-entropy over the whole batch's unmasked tokens."""
  loss, _, params, _, _ = results[(2, 2, 2)]
  cfg = tiny_cfg.replace(num_heads=8, num_kv_heads=4, head_dim=8)
  batch = lm_batch(cfg)
  model = create_model(cfg, seed=0)
  logits = np.asarray(model(batch["tokens"])[0], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  assert abs(loss - expected) < 1e-5 * expected


def test_parameters_are_sharded_as_the_rules_say(results):
  _, _, params, grads, _ = results[(2, 2, 2)]
  expected = {
      ("embed",): P("tensor", "fsdp"),
      ("layers", 0, "attn", "q"): P("fsdp", "tensor", None),
      ("layers", 0, "attn", "k"): P("fsdp", "tensor", None),
      ("layers", 0, "attn", "o"): P("tensor", None, "fsdp"),
      ("layers", 0, "attn", "q_bias"): P("tensor", None),
      ("layers", 1, "mlp", "gate"): P("fsdp", "tensor"),
      ("layers", 1, "mlp", "down"): P("tensor", "fsdp"),
      ("final_norm", "scale"): P(None),
  }
  for path, spec in expected.items():
    for tree in (params, grads):
      node = tree
      for part in path:
        node = node[part]
      array = node.get_value()
      assert array.sharding.spec == spec, (path, array.sharding.spec)
      # each device really holds only its slice
      shard_shape = array.addressable_shards[0].data.shape
      assert shard_shape == array.sharding.shard_shape(array.shape)
  q = params["layers"][0]["attn"]["q"].get_value()
  assert q.addressable_shards[0].data.shape == (32, 4, 8)  # embed 64 / fsdp 2, heads 8 / tensor 2
  _, _, params_fsdp, _, _ = results[(1, 8, 1)]
  assert params_fsdp["layers"][0]["mlp"]["up"].get_value().sharding.spec == P("fsdp", None)
  _, _, params_dp, _, _ = results[(8, 1, 1)]
  assert params_dp["layers"][0]["mlp"]["up"].get_value().sharding.spec == P(None, None)


def test_indivisible_dimensions_are_replicated_not_broken(devices):
  mesh = make_mesh(MeshConfig(1, 1, 8))
  assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(None, None, None)
  assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(None, "tensor", None)


def test_batch_that_does_not_divide_the_data_axes_is_refused(tiny_cfg, devices):
  mesh = make_mesh(MeshConfig(4, 2, 1))
  with pytest.raises(ConfigError, match="batch size 6 is not divisible by the 8 data-parallel shards"):
    shard_batch(lm_batch(tiny_cfg, batch=6), mesh)


def test_mesh_that_does_not_match_the_devices_is_refused(devices):
  with pytest.raises(ConfigError, match="needs 12 devices but 8 are available"):
    make_mesh(MeshConfig(2, 3, 2))
  with pytest.raises(ConfigError, match="not divisible by 3"):
    make_mesh(MeshConfig(-1, 3, 1))
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    make_mesh(MeshConfig(-1, -1, 1))
  with pytest.raises(ConfigError, match="'pipeline' is not a mesh axis"):
    MeshConfig(rules=(("embed", "pipeline"),))


def test_optimizer_state_is_sharded_like_the_parameters(results):
  import optax

  from jaxstages.sharding import optimizer_shardings, param_shardings

  _, _, params, _, mesh = results[(2, 2, 2)]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  shardings = optimizer_shardings(optimizer, params, param_shardings(params, mesh), mesh)
  state = jax.jit(optimizer.init, out_shardings=shardings)(params)
  adam = state[1][0]
  for moment in (adam.mu, adam.nu):
    assert moment["layers"][0]["attn"]["q"].get_value().sharding.spec == P("fsdp", "tensor", None)
    assert moment["embed"].get_value().sharding.spec == P("tensor", "fsdp")
  assert adam.count.sharding.spec == P()


def test_sharded_kv_cache_decodes_like_the_unsharded_one(tiny_cfg, devices):
  from jaxstages.model import KVCache
  from jaxstages.sharding import logical_shardings, use_mesh

  cfg = tiny_cfg.replace(num_heads=8, num_kv_heads=4, head_dim=8)
  mesh = make_mesh(MeshConfig(2, 1, 4))
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 9)).astype(np.int32)

  def decode(model, cache):
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, tok, cache: nnx.merge(graphdef, state)(tok, cache=cache))
    logits, cache = step(state, tokens[:, :6], cache)
    outs = [logits]
    for i in range(6, 9):
      logits, cache = step(state, tokens[:, i:i + 1], cache)
      outs.append(logits)
    return np.concatenate([np.asarray(o) for o in outs], axis=1), cache

  reference, _ = decode(create_model(cfg, seed=1), KVCache.init(cfg, 4, 12))
  shardings = logical_shardings(KVCache.logical_axes(cfg), jax.eval_shape(lambda: KVCache.init(cfg, 4, 12)), mesh)
  cache = jax.jit(lambda: KVCache.init(cfg, 4, 12), out_shardings=shardings)()
  expected = jax.sharding.NamedSharding(mesh, P("data", "tensor", None, None))
  assert cache.k[0].sharding.is_equivalent_to(expected, 4)
  with use_mesh(mesh):
    sharded, cache = decode(create_model(cfg, seed=1, mesh=mesh), cache)
  np.testing.assert_allclose(sharded, reference, atol=1e-5)
  assert cache.k[1].sharding.is_equivalent_to(expected, 4)
