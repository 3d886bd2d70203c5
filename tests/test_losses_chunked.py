"""Chunked (blockwise) log-probs from hidden states equal the full-logits ones in value and gradient, for the LM, SFT,
DPO and distillation losses, and really keep the full logits out of memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.losses import (chunked_logits_map, forward_kl, hidden_token_log_probs, logits_of, next_token_loss,
                              token_log_probs)
from jaxstages.model import create_model


def _hidden(b=2, t=10, e=16, v=40, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, e)), 0.3 * jax.random.normal(keys[1], (e, v)),
          jax.random.randint(keys[2], (b, t), 0, v))


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 64])
def test_chunked_token_log_probs_equal_full_in_value_and_gradient(chunk):
  hidden, head, targets = _hidden()
  weights = jax.random.normal(jax.random.key(7), targets.shape)

  def full(hidden, head):
    return jnp.sum(token_log_probs(logits_of(hidden, head), targets) * weights)

  def chunked(hidden, head):
    return jnp.sum(hidden_token_log_probs(hidden, head, targets, chunk=chunk) * weights)

  np.testing.assert_allclose(hidden_token_log_probs(hidden, head, targets, chunk=chunk),
                             token_log_probs(logits_of(hidden, head), targets), atol=1e-5)
  for g, r in zip(jax.grad(chunked, argnums=(0, 1))(hidden, head), jax.grad(full, argnums=(0, 1))(hidden, head)):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_chunked_map_of_a_divergence_with_per_token_inputs():
  """Several outputs and a `[batch, seq, vocab]` per-token input (a teacher's logits) sliced chunk by chunk."""
  hidden, head, targets = _hidden(t=9)
  teacher = jax.random.normal(jax.random.key(3), (2, 9, 40))
  fn = lambda logits, y, t: (token_log_probs(logits, y), forward_kl(logits, t))
  want = fn(logits_of(hidden, head), targets, teacher)
  got = chunked_logits_map(fn, hidden, head, targets, teacher, chunk=4)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  grad = lambda chunk: jax.grad(lambda h: sum(jnp.sum(x) for x in chunked_logits_map(
      fn, h, head, targets, teacher, chunk=chunk)))(hidden)
  np.testing.assert_allclose(grad(4), grad(0), atol=1e-5)


def test_chunked_gradient_never_holds_the_full_logits():
  """The compiled gradient's temporaries shrink by far more than half when 1,024 positions x 8,192 vocab (32 MiB of
  float32 logits per row) go in chunks of 64."""
  hidden, head, targets = _hidden(b=1, t=1024, e=32, v=8192)

  def temp_bytes(chunk):
    f = jax.jit(jax.grad(lambda h, w: jnp.sum(hidden_token_log_probs(h, w, targets, chunk=chunk)), argnums=(0, 1)))
    return f.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(0), temp_bytes(64)
  assert full >= 1024 * 8192 * 4  # the full logits are there ...
  assert chunked < full / 4, (chunked, full)  # ... and gone


def _model_loss_and_grads(cfg, loss_fn, batch, seed=5):
  graphdef, state = nnx.split(create_model(cfg, seed=seed))

  def mean(state):
    out = loss_fn(nnx.merge(graphdef, state), batch)
    return out[0] / out[1]

  return jax.jit(jax.value_and_grad(mean))(state)


def _check_same(cfg, loss_fn, batch):
  loss, grads = _model_loss_and_grads(cfg.replace(logits_chunk=3), loss_fn, batch)
  ref_loss, ref_grads = _model_loss_and_grads(cfg, loss_fn, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-6)


def _lm_batch(cfg, b=2, t=11, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.array([[1] * 4 + [2] * (t - 4), [1] * (t - 3) + [0] * 3], np.int32)
  pos = np.array([list(range(4)) + list(range(t - 4)), list(range(t - 3)) + [0] * 3], np.int32)
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=(seg != 0).astype(np.float32), positions=pos,
              segment_ids=seg)


def test_lm_and_sft_losses_chunked_equal_full(tiny_cfg):
  from jaxstages.stages.sft import sft_per_sequence_loss

  batch = _lm_batch(tiny_cfg)
  _check_same(tiny_cfg, next_token_loss, batch)
  _check_same(tiny_cfg, sft_per_sequence_loss, batch)


def test_dpo_loss_chunked_equals_full(tiny_cfg):
  from jaxstages.stages.dpo import DPOConfig, dpo_loss_fn

  rng = np.random.default_rng(1)
  b, t = 2, 12
  batch = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in dict(
      tokens=rng.integers(0, tiny_cfg.vocab_size, (b, t)).astype(np.int32),
      mask=np.concatenate([np.zeros((b, 5)), np.ones((b, t - 5))], 1).astype(np.float32),
      segment_ids=np.ones((b, t), np.int32)).items()}
  batch.update(ref_chosen=np.array([-20.0, -25.0], np.float32), ref_rejected=np.array([-22.0, -21.0], np.float32),
               valid=np.ones((b,), np.float32))
  _check_same(tiny_cfg, dpo_loss_fn(DPOConfig(loss="sigmoid", beta=0.1)), batch)


@pytest.mark.parametrize("divergence,top_k", [("forward_kl", 0), ("jsd", 0), ("forward_kl", 5)])
def test_distill_loss_chunked_equals_full(tiny_cfg, divergence, top_k):
  from jaxstages.stages.distill import DistillConfig, distill_loss_fn, teacher_outputs

  cfg = DistillConfig(teacher="unused", divergence=divergence, top_k=top_k)
  batch = _lm_batch(tiny_cfg, seed=3)
  teacher = create_model(tiny_cfg, seed=11)
  outputs = teacher_outputs(cfg)(teacher, batch)
  chunked_outputs = teacher_outputs(cfg)(create_model(tiny_cfg.replace(logits_chunk=4), seed=11), batch)
  for k in outputs:
    np.testing.assert_allclose(chunked_outputs[k], outputs[k], atol=1e-5)
  _check_same(tiny_cfg, functools.partial(distill_loss_fn(cfg)), {**batch, **outputs})
