"""Preference losses against independent NumPy (float64) transcriptions of their published formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstages.stages.dpo import KINDS, preference_loss, sequence_log_probs

TOL = dict(rtol=1e-5, atol=1e-5)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _pairs(seed=0, batch=16):
  """Summed log-probs as float32 (what the model would give) and their exact float64 values for the reference."""
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = (-rng.uniform(2.0, 40.0, batch).astype(np.float32) for _ in range(4))
  lc, lr = rng.integers(1, 30, batch), rng.integers(1, 30, batch)
  return (pc, pr, rc, rr, lc, lr), tuple(np.asarray(a, np.float64) for a in (pc, pr, rc, rr, lc, lr))


def _reference(kind, beta, pc, pr, rc, rr, lc, lr, eps=0.0, gamma=0.5, use_len=True):
  """(loss, chosen reward, rejected reward) transcribed from each paper / TRL, in float64."""
  if kind == "simpo":
    rw_c, rw_r = beta * pc / lc, beta * pr / lr
    z = rw_c - rw_r - gamma
    return -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z), rw_c, rw_r
  if kind == "ipo" and use_len:
    ratio_c, ratio_r = (pc - rc) / lc, (pr - rr) / lr
  else:
    ratio_c, ratio_r = pc - rc, pr - rr
  h = ratio_c - ratio_r
  if kind == "sigmoid":
    loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
  elif kind == "robust":
    loss = (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
  elif kind == "ipo":
    loss = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    loss = np.maximum(0.0, 1.0 - beta * h)
  return loss, beta * ratio_c, beta * ratio_r


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_kinds_match_numpy(kind, beta):
  (pc, pr, rc, rr, lc, lr), ref = _pairs(seed=len(kind))
  fn = jax.jit(functools.partial(preference_loss, kind=kind, beta=beta, simpo_gamma=0.3))
  loss, m = fn(pc, pr, rc, rr, chosen_len=lc, rejected_len=lr)
  want, rw_c, rw_r = _reference(kind, beta, *ref, gamma=0.3)
  assert loss.shape == (16,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(m["rewards_chosen"], rw_c, **TOL)
  np.testing.assert_allclose(m["rewards_rejected"], rw_r, **TOL)
  np.testing.assert_allclose(m["margin"], rw_c - rw_r, **TOL)
  np.testing.assert_array_equal(m["accuracy"], (rw_c - rw_r > 0).astype(np.float32))
  assert 0 < float(m["accuracy"].mean()) < 1  # the random pairs exercise both outcomes


def test_ipo_without_lengths_uses_summed_log_probs():
  (pc, pr, rc, rr, _, _), ref = _pairs(seed=3)
  loss, _ = preference_loss(pc, pr, rc, rr, "ipo", beta=0.2)
  np.testing.assert_allclose(loss, _reference("ipo", 0.2, *ref, use_len=False)[0], **TOL)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "simpo"])
def test_label_smoothing(kind):
  (pc, pr, rc, rr, lc, lr), ref = _pairs(seed=4)
  smoothed, _ = preference_loss(pc, pr, rc, rr, kind, beta=0.3, label_smoothing=0.1, chosen_len=lc, rejected_len=lr)
  np.testing.assert_allclose(smoothed, _reference(kind, 0.3, *ref, eps=0.1)[0], **TOL)
  zero, _ = preference_loss(pc, pr, rc, rr, kind, beta=0.3, label_smoothing=0.0, chosen_len=lc, rejected_len=lr)
  plain, _ = preference_loss(pc, pr, rc, rr, kind, beta=0.3, chosen_len=lc, rejected_len=lr)
  np.testing.assert_array_equal(zero, plain)


def test_robust_dpo_is_unbiased_under_label_flips_and_differs_from_conservative_dpo():
  """rDPO (TRL's `robust`) with flip rate ε: averaged over a flip of the pair (h -> −h with probability ε) it is the
  clean DPO loss −log σ(βh), exactly; cDPO (`sigmoid` with label smoothing) is not."""
  (pc, pr, rc, rr, _, _), ref = _pairs(seed=7)
  eps, beta = 0.2, 0.3
  clean = -_log_sigmoid(beta * ((ref[0] - ref[2]) - (ref[1] - ref[3])))
  averaged = {}
  for kind in ("robust", "sigmoid"):
    kept, _ = preference_loss(pc, pr, rc, rr, kind, beta=beta, label_smoothing=eps)
    flipped, _ = preference_loss(pr, pc, rr, rc, kind, beta=beta, label_smoothing=eps)
    averaged[kind] = (1 - eps) * np.asarray(kept, np.float64) + eps * np.asarray(flipped, np.float64)
  np.testing.assert_allclose(averaged["robust"], clean, **TOL)
  assert np.abs(averaged["sigmoid"] - clean).max() > 0.1


def test_dpo_at_reference_is_log2_with_zero_rewards():
  (pc, pr, _, _, _, _), _ = _pairs(seed=5)
  loss, m = preference_loss(pc, pr, pc, pr, "sigmoid", beta=0.1)
  np.testing.assert_allclose(loss, np.full(16, np.log(2.0)), rtol=1e-6)
  for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
    np.testing.assert_array_equal(m[key], 0.0)


def test_zero_length_padding_pair_stays_finite():
  pc = jnp.array([-3.0, 0.0])
  lengths = jnp.array([4, 0])
  for kind in ("ipo", "simpo"):
    loss, _ = preference_loss(pc, pc - 1, pc, pc, kind, beta=0.1, chosen_len=lengths, rejected_len=lengths)
    assert np.all(np.isfinite(loss))


def test_unknown_kind_names_nearest_and_valid_kinds():
  pc = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"'sigmod'.*did you mean 'sigmoid'.*Valid kinds: sigmoid, robust, ipo, hinge, "
                                      r"simpo"):
    preference_loss(pc, pc, pc, pc, "sigmod", beta=0.1)
  with pytest.raises(ValueError, match="did you mean 'simpo'"):
    preference_loss(pc, pc, pc, pc, "simpo_loss", beta=0.1)


def test_invalid_arguments_are_rejected():
  pc = jnp.zeros(2)
  with pytest.raises(ValueError, match="simpo.*chosen_len"):
    preference_loss(pc, pc, None, None, "simpo", beta=0.1)
  with pytest.raises(ValueError, match="label_smoothing applies only"):
    preference_loss(pc, pc, pc, pc, "ipo", beta=0.1, label_smoothing=0.1)
  with pytest.raises(ValueError, match="beta must be > 0"):
    preference_loss(pc, pc, pc, pc, "sigmoid", beta=0.0)


def test_sequence_log_probs_matches_numpy_log_softmax():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 3, (3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 5))
  mask = (rng.random((3, 5)) < 0.7).astype(np.int32)
  mask[0] = 0  # a row with nothing to score sums to 0
  x = logits.astype(np.float64)
  log_softmax = x - x.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  want = (np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0] * mask).sum(-1)
  got = jax.jit(sequence_log_probs)(logits, targets, mask)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, **TOL)
  assert float(got[0]) == 0.0
