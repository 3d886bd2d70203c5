"""RL losses of `stages.grpo` and `stages.ppo` against independent NumPy (float64) / plain-loop implementations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstages.stages import ppo
from jaxstages.stages.grpo import (ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, Clip, PolicyLossConfig,
                                   policy_terms, truncated_is_weights)

TOL = dict(rtol=1e-5, atol=1e-5)
EPS = 1e-6


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _ragged_mask(width: int, lengths: list[int]) -> np.ndarray:
  """A `[len(lengths), width]` 0/1 float32 mask that is 1 on the first `lengths[i]` positions of row i."""
  return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# -- advantages ------------------------------------------------------------------------------------------------------


def _rewards(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rewards `[5, 4]` (group 2 all equal) and a valid vector with group 3 invalid."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(0.0, 1.0, (5, 4)).astype(np.float32)
  rewards[2] = 0.7
  valid = np.array([1, 1, 1, 0, 1], np.float32)
  return rewards, valid


def _ref_advantages(name: str, rewards: np.ndarray, valid: np.ndarray, scale_std: bool) -> np.ndarray:
  """Per-group (grpo, rloo) or whole-batch (reinforce++) baselines, written as loops over groups and samples."""
  r = _f64(rewards)
  prompts, g = r.shape
  out = np.zeros_like(r)
  if name == "reinforce++":
    vals = np.concatenate([r[i] for i in range(prompts) if valid[i]])
    mean, std = vals.mean(), vals.std(ddof=0)
    for i in range(prompts):
      if valid[i]:
        out[i] = (r[i] - mean) / (std + EPS) if scale_std else r[i] - mean
    return out
  for i in range(prompts):
    if not valid[i]:
      continue
    std = np.std(r[i], ddof=1)
    for j in range(g):
      if name == "grpo":
        a = r[i, j] - r[i].mean()
      else:
        others = [r[i, k] for k in range(g) if k != j]
        a = r[i, j] - sum(others) / len(others)
      out[i, j] = a / (std + EPS) if scale_std else a
  return out


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce++"])
@pytest.mark.parametrize("scale_std", [True, False])
def test_advantages_match_numpy(name: str, scale_std: bool):
  """Each advantage estimator equals its NumPy definition; invalid groups get 0."""
  rewards, valid = _rewards()
  adv = ADVANTAGES[name](jnp.asarray(rewards), jnp.asarray(valid), scale_std=scale_std)
  assert adv.shape == rewards.shape and adv.dtype == jnp.float32
  np.testing.assert_allclose(adv, _ref_advantages(name, rewards, valid, scale_std), **TOL)
  np.testing.assert_array_equal(np.asarray(adv)[3], 0.0)
  if name != "reinforce++":
    np.testing.assert_allclose(np.asarray(adv)[2], 0.0, atol=1e-6)  # an all-equal group teaches nothing


def test_advantages_registry_names():
  """The registry holds exactly the three documented estimators."""
  assert set(ADVANTAGES) == {"grpo", "rloo", "reinforce++"}


@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_std", [True, False])
def test_binary_rewards_all_equal_group_is_exactly_zero(name: str, scale_std: bool):
  """With 0/1 rewards, an all-right or all-wrong group has advantage exactly 0 (no eps leakage)."""
  rng = np.random.default_rng(1)
  rewards = rng.integers(0, 2, (5, 4)).astype(np.float32)
  rewards[0], rewards[1] = 1.0, 0.0
  rewards[2] = [1.0, 0.0, 0.0, 1.0]
  adv = np.asarray(ADVANTAGES[name](jnp.asarray(rewards), jnp.ones(5, jnp.float32), scale_std=scale_std))
  np.testing.assert_array_equal(adv[:2], 0.0)
  np.testing.assert_allclose(adv, _ref_advantages(name, rewards, np.ones(5), scale_std), **TOL)
  assert np.all(adv[2] != 0.0)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce++"])
@pytest.mark.parametrize("scale_std", [True, False])
def test_any_all_equal_rewards_give_exactly_zero_advantage(name: str, scale_std: bool):
  """Rewards that are all equal but not exactly summable in float32 (eight 0.7s, sixteen 1.1s: a process or
  format reward) give advantage exactly 0: the group mean is off by an ulp, which divided by std + eps = eps made
  +0.056 / +0.106 for every sample. Next to them, a group with a spread still gets its NumPy advantages."""
  for g, value in ((8, 0.7), (16, 1.1)):
    rewards = np.full((3, g), value, np.float32)
    adv = np.asarray(ADVANTAGES[name](jnp.asarray(rewards), jnp.ones(3, jnp.float32), scale_std=scale_std))
    np.testing.assert_array_equal(adv, 0.0)
  if name != "reinforce++":  # its baseline is the batch's: one informative group makes every group informative
    rewards = np.stack([np.full(8, 0.7, np.float32), np.linspace(0.0, 1.0, 8, dtype=np.float32)])
    adv = np.asarray(ADVANTAGES[name](jnp.asarray(rewards), jnp.ones(2, jnp.float32), scale_std=scale_std))
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_allclose(adv[1], _ref_advantages(name, rewards, np.ones(2), scale_std)[1], **TOL)


# -- KL estimators ---------------------------------------------------------------------------------------------------


def _logps(seed: int, shape=(4, 6)) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 4.0, shape).astype(np.float32)
  ref = (logp + rng.uniform(-2.0, 2.0, shape)).astype(np.float32)
  return logp, ref


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k3+"])
def test_kl_estimator_values(name: str):
  """k1 = −Δ, k2 = Δ²/2, k3 = e^Δ − Δ − 1 (Δ = ref − logp); k3+ has k3's value."""
  logp, ref = _logps(2)
  d = _f64(ref) - _f64(logp)
  want = {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.exp(d) - d - 1.0, "k3+": np.exp(d) - d - 1.0}[name]
  got = KL_ESTIMATORS[name](jnp.asarray(logp), jnp.asarray(ref))
  np.testing.assert_allclose(got, want, **TOL)
  if name in ("k2", "k3", "k3+"):
    assert np.all(np.asarray(got) >= 0.0)


def test_kl_k3_plus_has_k2_gradient():
  """∇_logp Σ k3+ equals ∇_logp Σ k2 = logp − ref, not k3's gradient 1 − e^Δ."""
  logp, ref = _logps(3)
  grad = lambda name: jax.grad(lambda lp: jnp.sum(KL_ESTIMATORS[name](lp, jnp.asarray(ref))))(jnp.asarray(logp))
  np.testing.assert_allclose(grad("k3+"), _f64(logp) - _f64(ref), **TOL)
  np.testing.assert_allclose(grad("k3+"), grad("k2"), **TOL)
  np.testing.assert_allclose(grad("k3"), 1.0 - np.exp(_f64(ref) - _f64(logp)), **TOL)
  assert not np.allclose(grad("k3"), grad("k3+"), atol=1e-3)


# -- policy losses ---------------------------------------------------------------------------------------------------


def _ref_surrogate(ratio: np.ndarray, adv: np.ndarray, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
  """Per-token (loss, clipped) of PPO's clipped surrogate with optional dual clip, element by element."""
  loss, clipped = np.zeros_like(ratio), np.zeros_like(ratio)
  for idx in np.ndindex(ratio.shape):
    r, a = ratio[idx], adv[idx]
    plain, clamped = -a * r, -a * min(max(r, 1.0 - clip.low), 1.0 + clip.high)
    value, was = max(plain, clamped), clamped > plain
    if clip.dual and a < 0 and value > -a * clip.dual:
      value, was = -a * clip.dual, True
    loss[idx], clipped[idx] = value, float(was)
  return loss, clipped


def _policy_inputs(seed: int, shape=(4, 8), spread: float = 1.5):
  """logp, old_logp, advantages, ragged mask (one empty row) as float32."""
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 4.0, shape).astype(np.float32)
  logp = (old + rng.uniform(-spread, spread, shape)).astype(np.float32)
  adv = rng.normal(0.0, 1.0, shape).astype(np.float32)
  mask = _ragged_mask(shape[1], [8, 5, 0, 3])
  return logp, old, adv, mask


CLIPS = [Clip(0.2, 0.2, 0.0), Clip(0.2, 0.28, 0.0), Clip(0.2, 0.28, 3.0)]


@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_ppo_clip_matches_numpy(clip: Clip):
  """Per-token loss, clipped indicator and ratio of `ppo_clip` equal the NumPy surrogate."""
  logp, old, adv, mask = _policy_inputs(4)
  loss, clipped, ratio = POLICY_LOSSES["ppo_clip"](*(jnp.asarray(x) for x in (logp, old, adv, mask)), clip)
  want_ratio = np.exp(_f64(logp) - _f64(old))
  want_loss, want_clipped = _ref_surrogate(want_ratio, _f64(adv), clip)
  np.testing.assert_allclose(ratio, want_ratio, **TOL)
  np.testing.assert_allclose(loss, want_loss, **TOL)
  np.testing.assert_array_equal(clipped, want_clipped)
  assert 0.0 < want_clipped.mean() < 1.0
  if clip.dual:  # the dual clip binds on some tokens
    assert np.any((adv < 0) & (want_ratio > clip.dual))


@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_ppo_clip_gradient(clip: Clip):
  """∇_logp Σ loss is −A·r on unclipped tokens and 0 on clipped (or dual-clipped) ones."""
  logp, old, adv, mask = _policy_inputs(5)

  def total(lp):
    loss, _, _ = POLICY_LOSSES["ppo_clip"](lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip)
    return jnp.sum(loss)

  ratio = np.exp(_f64(logp) - _f64(old))
  _, clipped = _ref_surrogate(ratio, _f64(adv), clip)
  if clip.dual:
    assert np.any((adv < 0) & (ratio > clip.dual))
  want = -_f64(adv) * ratio * (1.0 - clipped)
  np.testing.assert_allclose(jax.grad(total)(jnp.asarray(logp)), want, **TOL)


def _ref_seq_ratio(logp: np.ndarray, old: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """exp(mean over the masked tokens of logp − old) per row (1 for an empty row), broadcast to `[rows, T]`."""
  out = np.ones(logp.shape)
  for i in range(logp.shape[0]):
    d = [float(logp[i, t]) - float(old[i, t]) for t in range(logp.shape[1]) if mask[i, t]]
    if d:
      out[i] = np.exp(sum(d) / len(d))
  return out


def _gspo_inputs(seed: int, per_token_adv: bool):
  """(logp, old, adv, mask) with advantages per token or one per sequence, and GSPO's clip."""
  logp, old, adv, mask = _policy_inputs(seed, spread=0.3)
  if not per_token_adv:
    adv = np.broadcast_to(adv[:, :1], adv.shape).copy()
  return logp, old, adv, mask, Clip(0.05, 0.05)


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gspo_matches_numpy(per_token_adv: bool):
  """GSPO's ratio is the per-sequence geometric mean ratio at every token; loss and clipped vs NumPy."""
  logp, old, adv, mask, clip = _gspo_inputs(6, per_token_adv)
  loss, clipped, ratio = POLICY_LOSSES["gspo"](*(jnp.asarray(x) for x in (logp, old, adv, mask)), clip)
  s = _ref_seq_ratio(logp, old, mask)
  want_loss, want_clipped = _ref_surrogate(s, _f64(adv), clip)
  np.testing.assert_allclose(ratio, s, **TOL)
  np.testing.assert_allclose(loss, want_loss, **TOL)
  np.testing.assert_array_equal(clipped, want_clipped)
  assert 0.0 < want_clipped[mask > 0].mean() < 1.0


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gspo_gradient(per_token_adv: bool):
  """∇_logp Σ loss·mask = −A·s·mask on tokens whose sequence ratio is not clipped, 0 on clipped ones."""
  logp, old, adv, mask, clip = _gspo_inputs(7, per_token_adv)

  def total(lp):
    loss, _, _ = POLICY_LOSSES["gspo"](lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip)
    return jnp.sum(loss * mask)

  s = _ref_seq_ratio(logp, old, mask)
  _, clipped = _ref_surrogate(s, _f64(adv), clip)
  assert 0.0 < clipped[mask > 0].mean() < 1.0
  want = -_f64(adv) * s * (1.0 - clipped) * mask
  np.testing.assert_allclose(jax.grad(total)(jnp.asarray(logp)), want, **TOL)


# -- aggregation -----------------------------------------------------------------------------------------------------

AGG_NAMES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NORM_LENGTH = 10.0


def _agg_inputs(seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """A `[6, 7]` per-token array and a random 0/1 mask whose row 3 is empty and every other row non-empty."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0.0, 1.0, (6, 7)).astype(np.float32)
  mask = (rng.uniform(size=(6, 7)) < 0.6).astype(np.float32)
  mask[:, 0] = 1.0
  mask[3] = 0.0
  return x, mask


def _ref_aggregate(name: str, x: np.ndarray, mask: np.ndarray, norm_length: float) -> tuple[float, float]:
  """(sum, count) by loops over rows: tokens for token-mean, non-empty sequences for the seq-mean modes."""
  total, tokens, seqs = 0.0, 0.0, 0.0
  for i in range(x.shape[0]):
    vals = [float(x[i, t]) for t in range(x.shape[1]) if mask[i, t]]
    if not vals:
      continue
    seqs += 1
    tokens += len(vals)
    if name == "seq-mean-token-mean":
      total += sum(vals) / len(vals)
    elif name == "seq-mean-token-sum-norm":
      total += sum(vals) / norm_length
    else:
      total += sum(vals)
  return total, tokens if name == "token-mean" else seqs


@pytest.mark.parametrize("name", AGG_NAMES)
def test_aggregation_matches_numpy(name: str):
  """(sum, count) of each aggregation equal the loop reference; the empty row is not a sequence."""
  x, mask = _agg_inputs()
  total, count = AGGREGATIONS[name](jnp.asarray(x), jnp.asarray(mask), NORM_LENGTH)
  want_total, want_count = _ref_aggregate(name, x, mask, NORM_LENGTH)
  np.testing.assert_allclose(total, want_total, **TOL)
  assert float(count) == want_count
  if name != "token-mean":
    assert want_count == 5


@pytest.mark.parametrize("name", AGG_NAMES)
@pytest.mark.parametrize("bounds", [(0, 3, 6), (0, 2, 4, 6), (0, 1, 4, 6)], ids=str)
def test_aggregation_is_split_invariant(name: str, bounds: tuple[int, ...]):
  """Adding the (sum, count) of row blocks gives the whole batch's sum, count and loss."""
  x, mask = _agg_inputs()
  total, count = AGGREGATIONS[name](jnp.asarray(x), jnp.asarray(mask), NORM_LENGTH)
  parts = [AGGREGATIONS[name](jnp.asarray(x[a:b]), jnp.asarray(mask[a:b]), NORM_LENGTH)
           for a, b in zip(bounds[:-1], bounds[1:])]
  part_total, part_count = sum(float(s) for s, _ in parts), sum(float(c) for _, c in parts)
  np.testing.assert_allclose(part_total, float(total), **TOL)
  assert part_count == float(count)
  np.testing.assert_allclose(part_total / part_count, float(total) / float(count), **TOL)


# -- truncated importance sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["none", "token", "sequence"])
def test_truncated_is_weights(level: str):
  """min(π_old/π_sampler, cap) per token or per sequence (product over masked tokens), ones for "none"; no grad."""
  rng = np.random.default_rng(9)
  old = -rng.uniform(0.1, 3.0, (4, 6)).astype(np.float32)
  sampler = (old + rng.uniform(-1.0, 1.0, (4, 6))).astype(np.float32)
  sampler[0] = old[0] - 0.5  # a sequence (and its tokens) far enough off to hit the cap
  mask = _ragged_mask(6, [6, 2, 0, 4])
  cap = 1.5
  got = truncated_is_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), level, cap)
  if level == "none":
    want = np.ones(old.shape)
  elif level == "token":
    want = np.where(mask > 0, np.minimum(np.exp(_f64(old) - _f64(sampler)), cap), 1.0)
  else:
    want = np.ones(old.shape)
    for i in range(old.shape[0]):
      log_w = sum(float(old[i, t]) - float(sampler[i, t]) for t in range(old.shape[1]) if mask[i, t])
      want[i] = min(np.exp(log_w), cap)
  np.testing.assert_allclose(got, want, **TOL)
  if level != "none":
    assert np.any(want == cap) and np.any(want < cap)
    grad = jax.grad(lambda o: jnp.sum(truncated_is_weights(o, jnp.asarray(sampler), jnp.asarray(mask), level, cap)))
    np.testing.assert_array_equal(grad(jnp.asarray(old)), 0.0)


# -- policy_terms end to end -----------------------------------------------------------------------------------------

ROWS, SEQ, VOCAB, T = 4, 9, 11, 5


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _terms_inputs(temperature: float, seed: int = 10) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits `[4, 9, 11]` and a batch whose old/ref/sampler log-probs are near the tempered policy's own."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 2.0, (ROWS, SEQ, VOCAB)).astype(np.float32)
  targets = rng.integers(0, VOCAB, (ROWS, SEQ)).astype(np.int32)
  mask = _ragged_mask(T, [5, 2, 4, 0])
  logp = _token_logp(logits, targets, temperature)
  batch = dict(targets=targets, mask=mask,
               old_logprobs=(logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32),
               advantages=rng.normal(0.0, 1.0, (ROWS, T)).astype(np.float32),
               ref_logprobs=(logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32))
  batch["sampler_logprobs"] = (batch["old_logprobs"] + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32)
  return logits, batch


def _token_logp(logits: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
  """log softmax(logits/τ)[target] at the last T positions (the completion), float64."""
  lsm = _log_softmax(_f64(logits)[:, -T:] / temperature)
  tg = targets[:, -T:]
  return np.array([[lsm[i, t, tg[i, t]] for t in range(T)] for i in range(ROWS)])


def _ref_policy_terms(logits: np.ndarray, batch: dict[str, np.ndarray], cfg: PolicyLossConfig
                      ) -> tuple[float, float, dict[str, float]]:
  """The whole policy loss in float64: surrogate (× TIS weight) + β·KL − c·entropy, aggregated."""
  mask = _f64(batch["mask"])
  old, adv = _f64(batch["old_logprobs"]), _f64(batch["advantages"])
  logp = _token_logp(logits, batch["targets"], cfg.temperature)
  if cfg.policy_loss == "gspo":
    ratio = _ref_seq_ratio(logp, old, mask)
  else:
    ratio = np.exp(logp - old)
  per_token, clipped = _ref_surrogate(ratio, adv, cfg.clip)
  if cfg.tis == "token":
    per_token = per_token * np.minimum(np.exp((old - _f64(batch["sampler_logprobs"])) * mask), cfg.tis_cap)
  elif cfg.tis == "sequence":
    log_w = np.sum((old - _f64(batch["sampler_logprobs"])) * mask, axis=-1, keepdims=True)
    per_token = per_token * np.minimum(np.exp(log_w), cfg.tis_cap)
  if cfg.kl_coef:
    d = _f64(batch["ref_logprobs"]) - logp
    kl = {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.exp(d) - d - 1.0, "k3+": np.exp(d) - d - 1.0}[cfg.kl_estimator]
    per_token = per_token + cfg.kl_coef * kl
  lsm = _log_softmax(_f64(logits)[:, -T:] / cfg.temperature)
  ent = -np.sum(np.exp(lsm) * lsm, axis=-1)
  per_token = per_token - cfg.entropy_coef * ent
  total, count = _ref_aggregate(cfg.loss_agg, per_token, mask, cfg.norm_length)
  tokens = mask.sum()
  aux = {"entropy": (ent * mask).sum() / tokens, "clip_fraction": (clipped * mask).sum() / tokens,
         "ratio": (ratio * mask).sum() / tokens}
  return total, count, aux


TERMS_CONFIGS = [
    dict(),
    dict(loss_agg="seq-mean-token-sum-norm", norm_length=float(T)),
    dict(kl_coef=0.1, kl_estimator="k3"),
    dict(entropy_coef=0.01),
    dict(temperature=0.7),
    dict(loss_agg="seq-mean-token-sum-norm", norm_length=8.0, kl_coef=0.1, entropy_coef=0.01, temperature=0.7),
    dict(kl_coef=0.1, kl_estimator="k3+", entropy_coef=0.01, temperature=0.7, clip=Clip(0.2, 0.28, 1.3)),
    dict(loss_agg="seq-mean-token-mean", kl_coef=0.1, kl_estimator="k2", temperature=0.7),
    dict(policy_loss="gspo", clip=Clip(0.05, 0.05), loss_agg="seq-mean-token-mean", kl_coef=0.1),
    dict(tis="token", tis_cap=1.2, entropy_coef=0.01),
    dict(tis="sequence", tis_cap=1.2, loss_agg="seq-mean-token-sum", kl_coef=0.1, kl_estimator="k1"),
]


def _config_id(kwargs: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


@pytest.mark.parametrize("kwargs", TERMS_CONFIGS, ids=_config_id)
def test_policy_terms_matches_numpy(kwargs: dict):
  """`policy_terms`' (sum, count) and token-mean metrics equal a float64 NumPy computation from the same inputs."""
  cfg = PolicyLossConfig(**kwargs)
  logits, batch = _terms_inputs(cfg.temperature)
  total, count, aux = policy_terms(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()}, cfg)
  want_total, want_count, want_aux = _ref_policy_terms(logits, batch, cfg)
  np.testing.assert_allclose(total, want_total, **TOL)
  assert float(count) == want_count
  for key, value in want_aux.items():
    s, c = aux[key]
    np.testing.assert_allclose(float(s) / float(c), value, **TOL, err_msg=key)


def test_policy_terms_config_is_hashable():
  """The config is a frozen, hashable dataclass (it is a static argument of the jitted train step)."""
  cfg = PolicyLossConfig(clip=Clip(0.2, 0.28, 3.0), kl_coef=0.1)
  assert hash(cfg) == hash(dataclasses.replace(cfg))


# -- PPO: GAE, whitening, value loss ---------------------------------------------------------------------------------


def _ref_gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
             ) -> tuple[np.ndarray, np.ndarray]:
  """Plain loops over rows and reversed time that visit the valid positions only."""
  adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
  for i in range(rewards.shape[0]):
    next_value, next_adv = 0.0, 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[i, t]:
        continue
      delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
      adv[i, t] = delta + gamma * lam * next_adv
      ret[i, t] = adv[i, t] + float(values[i, t])
      next_value, next_adv = float(values[i, t]), adv[i, t]
  return adv, ret


def _gae_inputs(seed: int = 11, interior_gap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ragged rows (one empty) with a terminal reward at each last valid token, small rewards elsewhere, and junk
  rewards and values at the masked positions (which must be ignored)."""
  rng = np.random.default_rng(seed)
  lengths = [8, 5, 1, 0, 3]
  mask = _ragged_mask(8, lengths)
  if interior_gap:
    mask[0, [2, 3, 6]] = 0.0
  rewards = rng.normal(0.0, 0.05, mask.shape)
  for i, n in enumerate(lengths):
    if n:
      rewards[i, n - 1] += rng.choice([0.0, 1.0]) + 0.5
  rewards = np.where(mask > 0, rewards, rng.normal(0.0, 5.0, mask.shape)).astype(np.float32)
  values = rng.normal(0.0, 1.0, mask.shape).astype(np.float32)
  return rewards, values, mask


GAMMA_LAMBDA = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)]


@pytest.mark.parametrize("gamma,lam", GAMMA_LAMBDA)
@pytest.mark.parametrize("interior_gap", [False, True])
def test_gae_matches_loop(gamma: float, lam: float, interior_gap: bool):
  """GAE advantages and returns equal the double loop; masked positions are skipped and hold 0."""
  rewards, values, mask = _gae_inputs(interior_gap=interior_gap)
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  want_adv, want_ret = _ref_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, **TOL)
  np.testing.assert_allclose(ret, want_ret, **TOL)
  np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)
  np.testing.assert_array_equal(np.asarray(ret)[mask == 0], 0.0)


def test_gae_special_cases():
  """λ = 1, γ = 1: A_t = Σ_{s≥t} r_s − V_t (Monte Carlo); λ = 0: A_t = δ_t (one-step TD)."""
  rewards, values, mask = _gae_inputs(seed=12)
  r, v = _f64(rewards) * mask, _f64(values)
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
  mc = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (mc - v) * mask, **TOL)
  np.testing.assert_allclose(ret, mc * mask, **TOL)
  adv, _ = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.9, 0.0)
  next_v = np.concatenate([v[:, 1:] * mask[:, 1:], np.zeros((v.shape[0], 1))], axis=1)
  np.testing.assert_allclose(adv, (r + 0.9 * next_v - v) * mask, **TOL)


def test_ppo_terminal_reward_lands_on_each_rows_last_trained_token():
  """The completion's reward goes on each row's last trained token, also when its mask has a gap (tokens forced by
  a thinking budget are not trained): `mask.sum() - 1` would put row 0's reward on a masked position, where GAE
  drops it. With γ = λ = 1, zero values and no whitening, every trained token's advantage and return is then the
  row's reward."""
  mask = np.array([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], np.float32)
  rewards = np.array([2.0, -1.0, 5.0], np.float32)
  np.testing.assert_array_equal(ppo.terminal_rewards(jnp.asarray(rewards), jnp.asarray(mask)),
                                [[0, 0, 0, 0, 0, 2, 0], [0, 0, -1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
  zeros = np.zeros_like(mask)
  adv, ret = ppo.ppo_postprocess(rewards, zeros, zeros, mask, gamma=1.0, lam=1.0, whiten_advantages=False)
  np.testing.assert_array_equal(adv, rewards[:, None] * mask)
  np.testing.assert_array_equal(ret, rewards[:, None] * mask)


def test_ppo_postprocess_is_gae_then_whitening_and_compiles_once():
  """The jitted post-processing equals GAE over the per-token plus terminal rewards, then whitening, and is traced
  once for a rollout shape however many steps call it (GAE outside jit was traced and compiled every step)."""
  rewards, values, mask = _gae_inputs(seed=15)
  terminal = np.asarray(ppo.terminal_rewards(jnp.asarray(rewards[:, 0]), jnp.asarray(mask)))
  want_adv, want_ret = _ref_gae(rewards + terminal, values, mask, 0.99, 0.95)
  vals = want_adv[mask > 0]
  want_adv = np.where(mask > 0, (want_adv - vals.mean()) / (vals.std() + 1e-8), 0.0)
  traces = []
  listener = lambda event, duration, **kw: traces.append(event) if event.endswith("jaxpr_trace_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for step in range(3):
      adv, ret = ppo.ppo_postprocess(rewards[:, 0] + step, rewards, values, mask, gamma=0.99, lam=0.95,
                                     whiten_advantages=True)
      if step == 0:
        np.testing.assert_allclose(adv, want_adv, **TOL)
        np.testing.assert_allclose(ret, want_ret, **TOL)
        traced = len(traces)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(traces) == traced  # steps 1 and 2 traced nothing


def test_whiten_matches_numpy():
  """Whitening uses the masked entries' mean and population std and zeroes the rest."""
  rng = np.random.default_rng(13)
  x = rng.normal(3.0, 2.0, (4, 6)).astype(np.float32)
  mask = _ragged_mask(6, [6, 3, 0, 5])
  got = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)))
  vals = _f64(x)[mask > 0]
  want = np.where(mask > 0, (_f64(x) - vals.mean()) / (vals.std() + 1e-8), 0.0)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(got[mask > 0].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(got[mask > 0].std(), 1.0, atol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_clipped_value_loss_matches_numpy(clip: float):
  """½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), or ½ (V − R)² with clip 0."""
  rng = np.random.default_rng(14)
  old = rng.normal(0.0, 1.0, (4, 6)).astype(np.float32)
  values = (old + rng.normal(0.0, 0.4, old.shape)).astype(np.float32)
  returns = rng.normal(0.0, 1.0, old.shape).astype(np.float32)
  got = ppo.clipped_value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), clip)
  want = np.zeros(old.shape)
  for idx in np.ndindex(old.shape):
    v, vo, r = float(values[idx]), float(old[idx]), float(returns[idx])
    plain = (v - r) ** 2
    if clip:
      vc = vo + min(max(v - vo, -clip), clip)
      plain = max(plain, (vc - r) ** 2)
    want[idx] = 0.5 * plain
  np.testing.assert_allclose(got, want, **TOL)
  if clip:
    assert np.any(want > 0.5 * (_f64(values) - _f64(returns)) ** 2 + 1e-6)  # the clip binds somewhere
