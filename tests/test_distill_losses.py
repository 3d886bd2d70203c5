"""Distillation divergences (`jaxstages.losses`) against independent NumPy (float64) computations on probabilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstages.losses import (check_same_vocab, forward_kl, generalized_jsd, reverse_kl,
                              sampled_token_reverse_kl_advantage, topk_tail_log_probs, truncated_forward_kl)

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 11


def _logits(seed):
  """Student and teacher logits `[2, 3, VOCAB]` as float32, peaked enough for the divergences to be O(1)."""
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(0, 2.5, (2, 3, VOCAB)).astype(np.float32) for _ in range(2))


def _probs(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return np.sum(p * np.log(p / q), axis=-1)


def _jsd(p_t, p_s, beta):
  m = beta * p_t + (1 - beta) * p_s
  return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def _bucketed_kl(student, teacher, k, temperature=1.0):
  """Teacher top-k + tail vs the student summed over the same k + 1 buckets, all in probability space."""
  p_t, p_s = _probs(teacher, temperature), _probs(student, temperature)
  idx = np.argsort(-p_t, axis=-1, kind="stable")[..., :k]
  t_top, s_top = np.take_along_axis(p_t, idx, -1), np.take_along_axis(p_s, idx, -1)
  t = np.concatenate([t_top, 1 - t_top.sum(-1, keepdims=True)], -1)
  s = np.concatenate([s_top, 1 - s_top.sum(-1, keepdims=True)], -1)
  terms = np.where(t > 0, t * np.log(np.where(t > 0, t, 1) / s), 0.0)
  return terms.sum(-1), idx


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_numpy(temperature):
  s, t = _logits(0)
  p_s, p_t = _probs(s, temperature), _probs(t, temperature)
  fwd = jax.jit(forward_kl, static_argnums=2)(s, t, temperature)
  rev = jax.jit(reverse_kl, static_argnums=2)(s, t, temperature)
  assert fwd.shape == (2, 3) and fwd.dtype == jnp.float32
  np.testing.assert_allclose(fwd, _kl(p_t, p_s), **TOL)
  np.testing.assert_allclose(rev, _kl(p_s, p_t), **TOL)
  assert not np.allclose(fwd, rev)  # the two directions really differ


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_numpy(beta, temperature):
  s, t = _logits(1)
  got = jax.jit(functools.partial(generalized_jsd, beta=beta, temperature=temperature))(s, t)
  np.testing.assert_allclose(got, _jsd(_probs(t, temperature), _probs(s, temperature), beta), **TOL)


def test_generalized_jsd_end_points_are_forward_and_reverse_kl():
  s, t = _logits(2)
  np.testing.assert_allclose(generalized_jsd(s, t, beta=0.0), forward_kl(s, t), rtol=1e-6)
  np.testing.assert_allclose(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t), rtol=1e-6)
  # The end points' direction is the formula's first-order behaviour: JSD_β / β -> KL(t‖s) as β -> 0 and
  # JSD_β / (1 − β) -> KL(s‖t) as β -> 1 (checked in float64, then loosely on the float32 implementation).
  p_s, p_t = _probs(s), _probs(t)
  np.testing.assert_allclose(_jsd(p_t, p_s, 1e-9) / 1e-9, _kl(p_t, p_s), rtol=1e-5)
  np.testing.assert_allclose(_jsd(p_t, p_s, 1 - 1e-9) / 1e-9, _kl(p_s, p_t), rtol=1e-5)
  np.testing.assert_allclose(generalized_jsd(s, t, beta=1e-5) / 1e-5, forward_kl(s, t), rtol=5e-3)
  np.testing.assert_allclose(generalized_jsd(s, t, beta=1 - 1e-5) / 1e-5, reverse_kl(s, t), rtol=5e-3)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_truncated_kl_matches_numpy_buckets(k, temperature):
  s, t = _logits(3)
  idx, logp = jax.jit(topk_tail_log_probs, static_argnums=(1, 2))(t, k, temperature)
  assert idx.shape == (2, 3, k) and logp.shape == (2, 3, k + 1) and logp.dtype == jnp.float32
  want, want_idx = _bucketed_kl(s, t, k, temperature)
  np.testing.assert_array_equal(idx, want_idx)
  p_t = _probs(t, temperature)
  top = np.take_along_axis(p_t, want_idx, -1)
  np.testing.assert_allclose(np.exp(logp), np.concatenate([top, 1 - top.sum(-1, keepdims=True)], -1), **TOL)
  got = jax.jit(truncated_forward_kl, static_argnums=3)(s, idx, logp, temperature)
  np.testing.assert_allclose(got, want, **TOL)
  assert np.all(got >= 0)
  # Aggregating outcomes can only lose information (data-processing inequality).
  assert np.all(np.asarray(got) <= np.asarray(forward_kl(s, t, temperature)) + 1e-6)


@pytest.mark.parametrize("k", [VOCAB - 1, VOCAB])
def test_truncated_kl_with_all_tokens_is_full_forward_kl(k):
  s, t = _logits(4)
  idx, logp = topk_tail_log_probs(t, k)
  got = truncated_forward_kl(s, idx, logp)
  np.testing.assert_allclose(got, forward_kl(s, t), **TOL)
  np.testing.assert_allclose(got, _kl(_probs(t), _probs(s)), **TOL)
  grad = jax.grad(lambda x: truncated_forward_kl(x, idx, logp).sum())(jnp.asarray(s))
  assert np.all(np.isfinite(grad))  # an empty tail bucket must not leak NaN gradients


def test_tiny_tail_keeps_its_mass():
  # One dominant token leaves a tail of ~e^-30 that log(1 − Σ top-k) would round to log 0 in float32.
  t = np.zeros((1, 1, VOCAB), np.float32)
  t[..., 0] = 30.0
  _, logp = topk_tail_log_probs(t, 1)
  np.testing.assert_allclose(logp[..., 1], np.log(VOCAB - 1) - 30.0, rtol=1e-5)


def test_divergences_nonnegative_and_zero_at_equality():
  s, t = _logits(5)
  idx, logp = topk_tail_log_probs(t, 3)
  idx_s, logp_s = topk_tail_log_probs(s, 3)
  fns = {
      "forward": lambda a, b: forward_kl(a, b),
      "reverse": lambda a, b: reverse_kl(a, b),
      "jsd": lambda a, b: generalized_jsd(a, b, beta=0.3),
  }
  for name, fn in fns.items():
    assert np.all(np.asarray(fn(s, t)) > 0), name
    np.testing.assert_allclose(fn(s, s), 0.0, atol=1e-6, err_msg=name)
  assert np.all(np.asarray(truncated_forward_kl(s, idx, logp)) > 0)
  np.testing.assert_allclose(truncated_forward_kl(s, idx_s, logp_s), 0.0, atol=1e-6)


def test_sampled_token_advantage_is_teacher_minus_student_without_gradient():
  rng = np.random.default_rng(6)
  student, teacher = (-rng.uniform(0, 5, (2, 4)).astype(np.float32) for _ in range(2))
  adv = sampled_token_reverse_kl_advantage(student, teacher)
  np.testing.assert_allclose(adv, teacher.astype(np.float64) - student, **TOL)
  grad = jax.grad(lambda x: sampled_token_reverse_kl_advantage(x, teacher).sum())(jnp.asarray(student))
  np.testing.assert_array_equal(grad, 0.0)


def test_vocab_mismatch_names_both_sizes():
  with pytest.raises(ValueError, match="student vocab size 10 != teacher vocab size 12"):
    check_same_vocab(10, 12)
  check_same_vocab(12, 12)
  s = jnp.zeros((1, 2, 10))
  t = jnp.zeros((1, 2, 12))
  for fn in (forward_kl, reverse_kl, generalized_jsd):
    with pytest.raises(ValueError, match="10 != teacher vocab size 12"):
      fn(s, t)
  with pytest.raises(ValueError, match="beta must be in"):
    generalized_jsd(s, s, beta=1.5)
  with pytest.raises(ValueError, match="k must be in"):
    topk_tail_log_probs(t, 13)
