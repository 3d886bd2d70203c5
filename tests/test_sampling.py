"""The sampler against references computed another way: uncached argmax decoding, teacher-forced log-probs, the
model's softmax (chi-square), and itself on another mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstages.model import create_model
from jaxstages.sampling import (SamplingConfig, _generate, categorical, greedy_uncached, sample,
                                 sequence_log_probs, without_fsdp)
from jaxstages.sharding import MeshConfig, make_mesh

PROMPTS = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 8, 100, 2, 64]]


@pytest.fixture(scope="module")
def model(tiny_cfg):
  return create_model(tiny_cfg, seed=3)


@pytest.fixture(scope="module")
def peaked_model(tiny_cfg):
  """Logits scaled x6 through the final norm: a peaked next-token distribution, so a wrong sampler shows."""
  m = create_model(tiny_cfg, seed=4)
  m.final_norm.scale[...] = m.final_norm.scale[...] * 6.0
  return m


def uncached_greedy(model, prompt, steps):
  """The reference: a full forward over the whole sequence at every step, no cache (one compile per prompt length)."""
  return np.asarray(greedy_uncached(model, np.asarray([prompt]), steps))[0].tolist()


def test_categorical_is_jax_random_categorical_token_for_token():
  """The sampler's categorical (a max and a first index in place of argmax) against JAX's own, on flat, peaked and
  truncated rows (-inf entries, as top-k / top-p / banned tokens leave them)."""
  logits = jax.random.normal(jax.random.key(1), (3000, 97)) * jnp.array([[0.1], [1.0], [8.0]]).repeat(1000, 0)
  logits = logits.at[::2, :40].set(-jnp.inf).at[1::7, 50:].set(-jnp.inf)
  keys = jax.random.split(jax.random.key(0), logits.shape[0])
  ours = jax.jit(jax.vmap(categorical))(keys, logits)
  np.testing.assert_array_equal(ours, jax.vmap(jax.random.categorical)(keys, logits))
  assert not np.isin(np.asarray(ours)[::2], np.arange(40)).any()


def test_greedy_cached_decoding_equals_uncached_argmax(model):
  out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0))
  for prompt, row in zip(PROMPTS, np.asarray(out.tokens).tolist()):
    assert row == uncached_greedy(model, prompt, 10)
  assert np.all(np.asarray(out.mask) == 1) and np.all(np.asarray(out.logprobs) == 0)


def test_groups_share_one_prefill_and_greedy_rows_agree(model):
  out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0, n=3))
  tokens = np.asarray(out.tokens).reshape(len(PROMPTS), 3, 6)
  assert (tokens == tokens[:, :1]).all()
  assert tokens[1, 0].tolist() == uncached_greedy(model, PROMPTS[1], 6)


def test_log_probs_at_temperature_one_equal_teacher_forcing(model):
  out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=12, n=2), seed=1)
  ref = np.asarray(sequence_log_probs(model, PROMPTS, out, n=2))
  np.testing.assert_allclose(np.asarray(out.model_logprobs), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5)


def _truncated(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Top-k, then top-p truncation of one row of logits, in NumPy: the reference for the sampler's own."""
  if top_k:
    x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
  if top_p < 1.0:
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < top_p
    x = np.where(x >= x[order][keep].min(), x, -np.inf)
  return x


def test_sampled_from_log_probs_are_the_tempered_truncated_distribution(model):
  cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=40, top_p=0.8, n=2)
  out = sample(model, PROMPTS, cfg, seed=2)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  # teacher-forced logits of each row, then the truncation rule written in NumPy
  for r in range(tokens.shape[0]):
    p = PROMPTS[r // 2]
    logits, _ = model(jnp.asarray([p + tokens[r].tolist()]))
    logits = np.asarray(logits[0, len(p) - 1:-1], np.float64)
    for t in range(tokens.shape[1]):
      if not mask[r, t]:
        continue
      x = _truncated(logits[t] / 0.7, 40, 0.8)
      lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
      assert np.isfinite(lp[tokens[r, t]]), "sampled a token outside the truncated support"
      assert abs(lp[tokens[r, t]] - out.logprobs[r, t]) < 1e-5
      full = logits[t] - logits[t].max() - np.log(np.exp(logits[t] - logits[t].max()).sum())
      assert abs(full[tokens[r, t]] - out.model_logprobs[r, t]) < 1e-5


def _chi_square(counts, probs):
  """Pearson chi-square over categories with expected count >= 5 (the rest pooled) and its degrees of freedom."""
  n = counts.sum()
  expected = probs * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.0, 0, 0.9)])
def test_sampling_reproduces_the_models_distribution(peaked_model, temperature, top_k, top_p):
  """4,000 one-token samples against the model's softmax, tempered and truncated in NumPy (`_truncated`)."""
  prompt = [11, 12, 13]
  n = 4000
  cfg = SamplingConfig(max_new_tokens=1, n=n, temperature=temperature, top_k=top_k, top_p=top_p)
  out = sample(peaked_model, [prompt], cfg, seed=5)
  counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=peaked_model.cfg.vocab_size)
  logits, _ = peaked_model(jnp.asarray([prompt]))
  x = _truncated(np.asarray(logits[0, -1], np.float64) / temperature, top_k, top_p)
  if top_k or top_p < 1:
    assert np.isinf(x).sum() > 0 and counts[np.isinf(x)].sum() == 0, "sampled outside the truncated support"
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  assert (probs > 0.01).sum() >= 4, "the test distribution should have several likely tokens"
  stat, dof = _chi_square(counts, probs)
  assert stat < dof + 5 * np.sqrt(2 * dof), (stat, dof)  # ~5 sigma; fails for a wrong temperature (checked below)
  wrong = np.exp((x - x.max()) * 1.3)
  wrong /= wrong.sum()
  wrong_stat, wrong_dof = _chi_square(counts, wrong)
  assert wrong_stat > wrong_dof + 5 * np.sqrt(2 * wrong_dof), "the test cannot tell temperature x1.3 apart"


def test_same_seed_same_samples_on_one_or_eight_devices(model, devices):
  prompts = PROMPTS * 2
  cfg = SamplingConfig(max_new_tokens=8, n=2, temperature=1.0, top_p=0.9)
  one = sample(model, prompts, cfg, seed=7)
  mesh = make_mesh(MeshConfig(data=8), devices)
  sharded_model = create_model(model.cfg, seed=3, mesh=mesh)
  eight = sample(sharded_model, prompts, cfg, seed=7, mesh=mesh)
  assert eight.tokens.sharding.spec[0] is not None, "rows should be sharded over the data axis"
  np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
  np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(eight.logprobs), atol=1e-5)
  again = sample(model, prompts, cfg, seed=7)
  np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(again.tokens))
  other = sample(model, prompts, cfg, seed=8)
  assert not np.array_equal(np.asarray(one.tokens), np.asarray(other.tokens))


def test_tensor_parallel_sampling_matches(model, devices):
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
  sharded_model = create_model(model.cfg, seed=3, mesh=mesh)
  out = sample(sharded_model, PROMPTS, cfg, mesh=mesh)
  ref = sample(model, PROMPTS, cfg)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(ref.model_logprobs), atol=1e-5)


def test_rows_stop_at_stop_tokens_and_nothing_after_is_unmasked(model):
  stops = tuple(range(0, 128, 3))  # a third of the vocabulary: every row stops early
  out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=20, n=4, stop_tokens=stops, pad_id=0), seed=3)
  tokens, mask, lengths = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
  assert (lengths < 20).any()
  for row, m, n in zip(tokens, mask, lengths):
    assert m[:n].all() and not m[n:].any()
    stop_at = [i for i, t in enumerate(row[:n]) if t in stops]
    if n < 20:
      assert stop_at == [n - 1], "a row must end exactly at its first stop token"
    else:
      assert stop_at in ([], [19])
    assert (row[n:] == 0).all()
  assert (np.asarray(out.logprobs)[mask == 0] == 0).all()


def test_compiled_once_per_prompt_bucket(model):
  cfg = SamplingConfig(max_new_tokens=4, temperature=0.9, prompt_buckets=(16, 32))
  sample(model, [[1, 2, 3], [4, 5]], cfg)
  before = _generate._cache_size()
  sample(model, [[9, 9, 9, 9, 9], [1]], cfg, seed=4)  # same bucket (16), other prompts and seed
  assert _generate._cache_size() == before
  sample(model, [list(range(1, 20)), [1]], cfg)  # bucket 32
  assert _generate._cache_size() == before + 1


def test_bf16_cache_log_probs_stay_close_to_float32_teacher_forcing(model):
  out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=6, n=2, cache_dtype="bfloat16"), seed=9)
  ref = np.asarray(sequence_log_probs(model, PROMPTS, out, n=2))
  np.testing.assert_allclose(np.asarray(out.model_logprobs), ref, atol=3e-2)


def test_prompt_longer_than_every_bucket_is_refused(model):
  with pytest.raises(Exception, match="largest prompt bucket"):
    sample(model, [list(range(40))], SamplingConfig(max_new_tokens=2, prompt_buckets=(16, 32)))
  with pytest.raises(Exception, match="multiple of 8"):
    sample(model, PROMPTS[:3], SamplingConfig(max_new_tokens=2), mesh=make_mesh(MeshConfig(data=8)))


def test_sampler_under_its_own_sharding_reshards_params_inside_jit(model, devices):
  """Training layout FSDP x tensor; the sampler re-lays the weights tensor-only (no per-step all-gathers)."""
  cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
  sharded_model = create_model(model.cfg, seed=3, mesh=mesh)
  assert "fsdp" in str(sharded_model.layers[0].mlp.gate[...].sharding.spec)
  out = sample(sharded_model, PROMPTS, cfg, mesh=mesh, sampler_rules=without_fsdp())
  ref = sample(model, PROMPTS, cfg)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert "fsdp" in str(sharded_model.layers[0].mlp.gate[...].sharding.spec), "the training params are untouched"
  rules = dict(without_fsdp())
  assert rules["embed"] is None and rules["mlp"] == "tensor" and rules["batch"] == ("data", "fsdp")


@pytest.mark.parametrize("suffix", [(), (13, 14)])
def test_thinking_budget_forces_the_close_token(peaked_model, suffix):
  """A prompt ending in <think> starts inside the block: after `budget` tokens the close token is forced (unless
  the model closed it itself), then the suffix, all marked `forced`; the model then continues, never closing a block
  again."""
  think_open, think_close, budget = 7, 9, 3
  prompts = [[11, 12, think_open], [5, think_open], [20, 21, 22]]  # the third never opens a block
  cfg = SamplingConfig(max_new_tokens=10, n=4, temperature=1.0, think_budget=budget, think_open_id=think_open,
                       think_close_id=think_close, think_budget_suffix=suffix)
  out = sample(peaked_model, prompts, cfg, seed=1)
  tokens, forced, mask = np.asarray(out.tokens), np.asarray(out.forced), np.asarray(out.mask)
  for r, row in enumerate(tokens):  # the budget rule, replayed in Python
    thinking, thought, pending = prompts[r // 4][-1] == think_open, 0, []
    for t, tok in enumerate(row):
      if not mask[r, t]:
        assert not forced[r, t]
        continue
      if thinking and thought >= budget:
        pending = [think_close, *suffix]
      assert forced[r, t] == bool(pending), (r, t, row)
      if pending:
        assert tok == pending.pop(0)
      assert tok != think_close or thinking, "outside a think block the close token is never sampled"
      if tok == think_open:
        thinking, thought = True, 0
      elif tok == think_close:
        thinking = False
      elif thinking:
        thought += 1
  assert forced[:8].sum() > 0, "the budget should have been hit at least once"
  assert (np.asarray(out.logprobs)[forced == 1] == 0).all()
  ref = np.asarray(sequence_log_probs(peaked_model, prompts, out, n=4))
  np.testing.assert_allclose(np.asarray(out.model_logprobs), ref, atol=1e-5)


def test_reference_uncached_decoder_equals_the_python_loop(model):
  """The jitted reference decoder against the plainest loop: append the argmax of a full forward, step by step."""
  prompts = np.asarray([PROMPTS[0], [1, 2, 3], [60, 61, 62]], np.int32)
  out = np.asarray(greedy_uncached(model, prompts, 4))
  for prompt, row in zip(prompts.tolist(), out.tolist()):
    seq = list(prompt)
    for _ in range(4):
      seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0][0, -1])))
    assert row == seq[len(prompt):]
