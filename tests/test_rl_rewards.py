"""RL reward shaping against its formulas: every `completion_reward` option on hand-computed cases (DAPO's soft
overlong penalty at its buffer's edges, the format bonus, process and mixed rewards at α = 0 and 1), the adaptive KL
controller against hand-computed updates, and, through the stage's rollout, KL in the reward and `mask_truncated`
against values recomputed here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.rewards import Verdict
from jaxstages.stages import rl
from jaxstages.stages.rl import AdaptiveKL, RewardConfig, completion_reward

# a verdict of each kind: right and every step right; right answer through a wrong step (process 0.5); wrong answer
# with most steps right (process 0.75); nothing right
RIGHT = Verdict(7, True, 0, 0, 0, 0, 1.0, True)
HACKED = Verdict(7, True, 1, 1, 0, 0, 0.5, False)
WRONG = Verdict(8, False, 0, 0, 0, 0, 0.75, False)
NONE = Verdict(None, False, 0, 0, 3, 0, 0.0, False)
GOOD_FORMAT = "x = 1 + 2 = 1 + 2 = 3\nanswer: 3"  # one answer line, at the end
BAD_FORMAT = "answer: 3\nmore text"


def _reward(verdict, text=GOOD_FORMAT, length=10, truncated=False, reward="outcome", **cfg):
  return completion_reward(verdict, text, length, truncated, RewardConfig(score=reward, **cfg), 40)


@pytest.mark.parametrize("reward,expected", [
    ("outcome", (1.0, 1.0, 0.0, 0.0)),
    ("strict", (1.0, 0.0, 0.0, 0.0)),
    ("process", (1.0, 0.5, 0.75, 0.0)),  # the step score alone, a wrong answer included
])
def test_base_rewards(reward, expected):
  assert tuple(_reward(v, reward=reward) for v in (RIGHT, HACKED, WRONG, NONE)) == expected


@pytest.mark.parametrize("alpha,expected", [
    (0.0, (1.0, 0.5, 0.0, 0.0)),  # α = 0: the process score, gated by the outcome
    (1.0, (1.0, 1.0, 0.0, 0.0)),  # α = 1: the outcome alone
    (0.2, (1.0, 0.2 + 0.8 * 0.5, 0.0, 0.0)),  # the interplay study's α = 0.2: 0.2 · 1 + 0.8 · process
])
def test_mixed_reward_is_gated_by_the_outcome(alpha, expected):
  """`[α·outcome + (1−α)·process]·1[outcome correct]` (the interplay study): a wrong answer gets 0 whatever its
  process score (WRONG has 0.75)."""
  got = tuple(_reward(v, reward="mixed", process_alpha=alpha) for v in (RIGHT, HACKED, WRONG, NONE))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_format_weight_adds_to_the_base_reward():
  assert _reward(RIGHT, GOOD_FORMAT, format_weight=0.25) == 1.25
  assert _reward(RIGHT, BAD_FORMAT, format_weight=0.25) == 1.0
  assert _reward(NONE, GOOD_FORMAT, format_weight=0.25) == 0.25  # the bonus is paid for a wrong answer too
  assert _reward(NONE, "answer: 3\nanswer: 3", format_weight=0.25) == 0.0  # two answer lines
  assert _reward(RIGHT, BAD_FORMAT) == _reward(RIGHT, GOOD_FORMAT) == 1.0  # weight 0: the format does not count


def _dapo_length_penalty(length: int, l_max: int, l_cache: int) -> float:
  """DAPO (Yu et al. 2025, eq. 13) as printed: 0 up to L_max − L_cache tokens, ((L_max − L_cache) − |y|) / L_cache
  within the buffer, −1 beyond L_max."""
  if length <= l_max - l_cache:
    return 0.0
  if length <= l_max:
    return ((l_max - l_cache) - length) / l_cache
  return -1.0


@pytest.mark.parametrize("length", [1, 31, 32, 33, 36, 39, 40])
def test_overlong_penalty_follows_dapo(length):
  """max_new_tokens 40, buffer 8: no penalty up to and at the buffer's start (32 tokens), −1/8 per token after,
  −1 exactly at the buffer's end (40 tokens, stopped there), scaled by `overlong_penalty`."""
  for penalty in (1.0, 0.5):
    want = 1.0 + penalty * _dapo_length_penalty(length, 40, 8)
    got = _reward(RIGHT, length=length, overlong_buffer=8, overlong_penalty=penalty)
    assert got == pytest.approx(want, abs=1e-12)
  assert _reward(RIGHT, length=32, overlong_buffer=8) == 1.0
  assert _reward(RIGHT, length=33, overlong_buffer=8) == pytest.approx(1 - 1 / 8)
  assert _reward(RIGHT, length=40, overlong_buffer=8) == 0.0


def test_truncated_completions_get_the_full_penalty_and_the_terms_add_up():
  """A completion cut at the limit gets −overlong_penalty (DAPO's |y| > L_max); format, base and penalty add up;
  without a buffer there is no length term at all."""
  assert _reward(RIGHT, length=40, truncated=True, overlong_buffer=8, overlong_penalty=0.5) == 0.5
  assert _reward(WRONG, BAD_FORMAT, length=40, truncated=True, overlong_buffer=8, reward="process") == -0.25
  assert _reward(RIGHT, length=36, truncated=True, overlong_buffer=8) == 0.0  # cut: the full penalty, not the ramp's
  assert _reward(RIGHT, length=40, truncated=True) == 1.0
  assert _reward(HACKED, GOOD_FORMAT, length=36, reward="mixed", process_alpha=0.2, format_weight=0.1,
                 overlong_buffer=8, overlong_penalty=0.4) == pytest.approx(0.6 + 0.1 - 0.4 * 0.5)


def test_adaptive_kl_coefficient_follows_ziegler_et_al():
  """`β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)` (Ziegler et al. 2019's proportional
  controller, K_β = n / horizon), against values computed by hand."""
  kl = AdaptiveKL(0.1, 0.01, 100)
  kl.update(0.02, 10)  # error +1, clipped to +0.2: x(1 + 0.2 * 0.1)
  assert kl.coef == pytest.approx(0.102, rel=1e-12)
  kl.update(0.011, 10)  # error +0.1: x1.01
  assert kl.coef == pytest.approx(0.10302, rel=1e-12)
  kl.update(0.005, 20)  # error -0.5, clipped to -0.2: x(1 - 0.2 * 0.2)
  assert kl.coef == pytest.approx(0.10302 * 0.96, rel=1e-12)
  kl.update(0.01, 1000)  # on target: unchanged
  assert kl.coef == pytest.approx(0.10302 * 0.96, rel=1e-12)
  fixed = AdaptiveKL(0.1, 0.0, 100)  # no target: a fixed β
  fixed.update(5.0, 100)
  assert fixed.coef == 0.1


# -- through the stage's rollout ---------------------------------------------------------------------------------


REFERENCE = "experiments/artifacts/toy-base"  # the committed base the SFT model was trained from: a real KL


@pytest.fixture()
def recorded(monkeypatch):
  """Every `completion_reward` call of the rollout: (args, returned reward), in row order."""
  calls = []

  def record(verdict, text, length, truncated, cfg, max_new_tokens):
    value = completion_reward(verdict, text, length, truncated, cfg, max_new_tokens)
    calls.append(dict(verdict=verdict, text=text, length=length, truncated=truncated, reward=value))
    return value

  monkeypatch.setattr(rl, "completion_reward", record)
  return calls


def _reference_logprobs(batch, width):
  """log π_ref of the completion tokens from a plain full forward of the reference model (a log-softmax and a
  gather, written here)."""
  from jaxstages.sharding import make_mesh
  from jaxstages.train import load_model
  model = load_model(REFERENCE, make_mesh())
  logits = nnx.jit(lambda m, t, p, s: m(t, p, s)[0])(model, batch["tokens"], batch["positions"],
                                                      batch["segment_ids"])
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, -width:], -1))
  targets = np.asarray(batch["targets"])[:, -width:]
  return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_kl_in_the_reward_and_the_adaptive_coefficient_through_a_rollout(tmp_path, recorded):
  """KL in the reward (k1, β 0.05, reference `toy-base`): each row's reward is its verifier reward minus β·Σ_t
  (log π_old − log π_ref) over its trained tokens, and the advantages are GRPO's of those rewards (NumPy, ddof 1);
  β then moves by the controller's rule on the batch's mean sequence KL. With `mask_truncated` every completion cut
  at the limit (no stop token, max_new_tokens tokens) has no trained token, and every other keeps all of its own
(one that stops with its 17th token, the limit, included)."""
  from tests.test_rl_stage import _build, _prepared
  built = _build(tmp_path, "grpo", "grpo.rollout.max_new_tokens=17", "grpo.kl.coef=0.05", "grpo.kl.placement='reward'",
                 "grpo.kl.estimator='k1'", "grpo.kl.target=0.01", "grpo.kl.horizon=100",
                 f"grpo.kl.reference='{REFERENCE}'", "grpo.reward.mask_truncated=True")
  batch, metrics = _prepared(built)
  b, g, width = 8, 4, 17
  mask, old = np.asarray(batch["mask"]), np.asarray(batch["old_logprobs"], np.float64)
  assert len(recorded) == b * g

  # truncation, read from the completion tokens themselves: length == limit and no stop token at its end
  stops = {built.tokenizer.eos_id, built.tokenizer.im_end_id}
  targets = np.asarray(batch["targets"])[:, -width:]
  lengths = np.asarray([c["length"] for c in recorded])
  cut = np.asarray([n == width and int(targets[r, n - 1]) not in stops for r, n in enumerate(lengths)])
  assert 0 < cut.sum() < len(cut), "the test needs both truncated and finished completions"
  assert ((lengths == width) & ~cut).any(), "the test needs a completion whose stop token is its limit-th token"
  assert [c["truncated"] for c in recorded] == cut.tolist()
  np.testing.assert_array_equal(mask.sum(-1), np.where(cut, 0, lengths))
  assert metrics["truncated_fraction"] == pytest.approx(cut.mean())

  ref = _reference_logprobs(batch, width)
  kl_seq = ((old - ref) * mask).sum(-1)
  assert np.abs(kl_seq).max() > 0.5  # the reference really differs from the policy
  rewards = np.asarray([c["reward"] for c in recorded]) - 0.05 * kl_seq
  groups = rewards.reshape(b, g)
  adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(batch["advantages"]), adv.reshape(-1, 1) * mask, rtol=1e-4, atol=1e-4)
  assert metrics["kl_coef"] == 0.05 and metrics["kl_ref_sequence"] == pytest.approx(kl_seq.mean(), rel=1e-4)
  error = np.clip(kl_seq.mean() / 0.01 - 1, -0.2, 0.2)
  assert built.objective.get_state()["kl_coef"] == pytest.approx(0.05 * (1 + error * b * g / 100), rel=1e-5)


def test_kl_in_the_reward_per_token_for_ppo(tmp_path, recorded):
  """PPO with KL in the reward (k1, β 0.05, fixed): each trained token's reward is −β (log π_old − log π_ref) and the
  last one also gets the verifier's reward; with γ = λ = 1 and the zero-initialised value head the returns are the
  sums of the rewards from each token on (computed here)."""
  from tests.test_rl_stage import _build, _prepared
  built = _build(tmp_path, "ppo", "ppo.ppo.critic='shared'", "ppo.ppo.lam=1.0", "ppo.ppo.gamma=1.0", "ppo.kl.coef=0.05",
                 "ppo.kl.placement='reward'", "ppo.kl.estimator='k1'", f"ppo.kl.reference='{REFERENCE}'",
                 "ppo.rollout.max_new_tokens=17")
  batch, metrics = _prepared(built)
  width = 17
  mask, old = np.asarray(batch["mask"]), np.asarray(batch["old_logprobs"], np.float64)
  ref = _reference_logprobs(batch, width)
  token_rewards = -0.05 * (old - ref) * mask
  lengths = mask.sum(-1).astype(int)
  for r, c in enumerate(recorded):
    if lengths[r]:
      token_rewards[r, lengths[r] - 1] += c["reward"]
  returns = np.cumsum(token_rewards[:, ::-1], axis=1)[:, ::-1] * mask
  assert np.abs(token_rewards).max() > 0.01 and metrics["kl_coef"] == 0.05
  np.testing.assert_allclose(np.asarray(batch["returns"]) * mask, returns, rtol=1e-4, atol=1e-4)
