"""Learning-rate schedules and weight-decay groups against their formulas."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstages.config import ConfigError
from jaxstages.model import create_model
from jaxstages.optim import OptimConfig, decay_mask, learning_rate_schedule, make_optimizer


def test_cosine_with_warmup_and_rewarmup():
  cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, init_lr=2e-4, end_lr_ratio=0.1)
  lr = learning_rate_schedule(cfg, 110)
  assert float(lr(0)) == pytest.approx(2e-4)  # re-warmup starts from the previous stage's final lr
  assert float(lr(5)) == pytest.approx(2e-4 + 0.5 * (1e-3 - 2e-4))
  assert float(lr(10)) == pytest.approx(1e-3)
  t = (60 - 10) / 100
  assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * t)), rel=1e-5)
  assert float(lr(110)) == pytest.approx(1e-4, rel=1e-5)


def test_wsd_and_constant():
  lr = learning_rate_schedule(OptimConfig(lr=1e-3, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                                          end_lr_ratio=0.0), 100)
  assert [float(lr(s)) for s in (0, 10, 50, 80)] == pytest.approx([0.0, 1e-3, 1e-3, 1e-3])
  assert float(lr(90)) == pytest.approx(5e-4) and float(lr(100)) == pytest.approx(0.0, abs=1e-12)
  const = learning_rate_schedule(OptimConfig(lr=2e-3, schedule="constant", warmup_steps=4), 100)
  assert [float(const(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 1e-3, 2e-3, 2e-3])


def test_weight_decay_skips_norms_biases_and_embeddings(tiny_cfg):
  params = nnx.state(create_model(tiny_cfg))
  mask = decay_mask(params, ("norm", "bias", "embed"))
  assert not mask["embed"].get_value() and not mask["final_norm"]["scale"].get_value()
  layer = mask["layers"][0]
  assert not layer["attn"]["q_bias"].get_value() and not layer["mlp_norm"]["scale"].get_value()
  assert layer["attn"]["q"].get_value() and layer["mlp"]["down"].get_value()
  # one AdamW step with zero gradients: only decayed parameters move
  optimizer, _ = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=None), 10)
  updates, _ = optimizer.update(jax.tree.map(np.zeros_like, params), optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.array_equal(new["embed"].get_value(), params["embed"].get_value())
  assert not np.array_equal(new["layers"][0]["attn"]["q"].get_value(), params["layers"][0]["attn"]["q"].get_value())


def test_bad_optimizer_config():
  with pytest.raises(ConfigError, match="schedule 'cosin'"):
    OptimConfig(schedule="cosin")
  with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*\(no close match|did you mean"):
    OptimConfig.from_config({"learning_rate": 1e-3})


def test_adam_first_moment_in_bfloat16(tiny_cfg):
  import jax.numpy as jnp

  params = nnx.state(create_model(tiny_cfg, seed=0))
  optimizer, _ = make_optimizer(OptimConfig(mu_dtype="bfloat16"), 10)
  state = optimizer.init(params)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
  with pytest.raises(ConfigError, match="mu_dtype"):
    OptimConfig(mu_dtype="fp8")
