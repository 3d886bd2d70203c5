"""The decoder itself: packing isolation, KV-cache exactness, remat, mixed precision, parameter counts, metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.losses import next_token_loss
from jaxstages.model import KVCache, Transformer, create_model, model_config, param_count
from jaxstages.sharding import DEFAULT_RULES


@pytest.fixture(scope="module")
def model(tiny_cfg):
  return create_model(tiny_cfg, seed=3)


def _forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda tokens, positions, segment_ids: nnx.merge(graphdef, state)(tokens, positions, segment_ids)[0])


def test_packed_documents_do_not_attend_to_each_other(model, tiny_cfg):
  rng = np.random.default_rng(0)
  a = rng.integers(0, tiny_cfg.vocab_size, 7)
  b = rng.integers(0, tiny_cfg.vocab_size, 9)
  forward = _forward(model)
  packed = forward(np.concatenate([a, b])[None], np.concatenate([np.arange(7), np.arange(9)])[None],
                   np.array([[1] * 7 + [2] * 9]))
  alone_a = forward(a[None], np.arange(7)[None], np.ones((1, 7), np.int32))
  alone_b = forward(b[None], np.arange(9)[None], np.ones((1, 9), np.int32))
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 7:], alone_b[0], atol=1e-5)
  # and packing really changes something when segments are merged (the test can fail)
  merged = forward(np.concatenate([a, b])[None], np.arange(16)[None], np.ones((1, 16), np.int32))
  assert np.abs(np.asarray(merged[0, 7:] - alone_b[0])).max() > 1e-3


def _decode(model, tokens, cache, chunks):
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, tok, cache, pos, seg: nnx.merge(graphdef, state)(tok, pos, seg, cache))
  outs, start = [], 0
  for size in chunks:
    t = tokens[:, start:start + size]
    pos = jnp.broadcast_to(jnp.arange(start, start + size), t.shape)
    logits, cache = step(state, t, cache, pos, jnp.ones(t.shape, jnp.int32))
    outs.append(logits)
    start += size
  return jnp.concatenate(outs, axis=1), cache


def test_kv_cache_prefill_then_one_token_decoding_equals_full_forward(model, tiny_cfg):
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, tiny_cfg.vocab_size)
  full = _forward(model)(tokens, jnp.broadcast_to(jnp.arange(12), (3, 12)), jnp.ones((3, 12), jnp.int32))
  cache = KVCache.init(tiny_cfg, 3, 16)
  cached, cache = _decode(model, tokens, cache, [5] + [1] * 7)
  np.testing.assert_allclose(cached, full, atol=1e-5)
  np.testing.assert_array_equal(cache.index, [12, 12, 12])
  np.testing.assert_array_equal(cache.segment_ids[:, :12], 1)
  np.testing.assert_array_equal(cache.segment_ids[:, 12:], 0)


def test_kv_cache_in_bfloat16_stays_close(model, tiny_cfg):
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, tiny_cfg.vocab_size)
  full = _forward(model)(tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32))
  cached, _ = _decode(model, tokens, KVCache.init(tiny_cfg, 2, 10, dtype=jnp.bfloat16), [4] + [1] * 6)
  # measured: 8.6e-4 at most (logits up to 1.4 in magnitude); the bound leaves ~6x
  assert np.abs(np.asarray(cached - full)).max() < 5e-3


def test_kv_cache_with_left_and_right_padding(model, tiny_cfg):
  """Ragged prompts in one batch: left-padded (padding slots have segment 0) or right-padded (index rewound to the
  prompt length so decoding overwrites the padding) both give each row's logits exactly as if it were alone."""
  rng = np.random.default_rng(4)
  lengths = [3, 6]
  rows = [rng.integers(0, tiny_cfg.vocab_size, n + 2) for n in lengths]  # prompt + 2 decoded tokens
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, tok, pos, seg, cache: nnx.merge(graphdef, state)(tok, pos, seg, cache))
  forward = _forward(model)
  alone = [forward(r[None], np.arange(len(r))[None], np.ones((1, len(r)), np.int32))[0] for r in rows]

  def decode_and_check(cache):
    """Two one-token steps at each row's own position; each row's logits as if it were alone."""
    for t in range(2):
      nxt = np.array([[rows[i][n + t]] for i, n in enumerate(lengths)], np.int32)
      npos = np.array([[n + t] for n in lengths], np.int32)
      logits, cache = step(state, nxt, npos, np.ones((2, 1), np.int32), cache)
      for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i, 0], alone[i][n + t], atol=1e-5)

  # left padding
  width = max(lengths)
  tok = np.zeros((2, width), np.int32)
  seg = np.zeros((2, width), np.int32)
  pos = np.zeros((2, width), np.int32)
  for i, n in enumerate(lengths):
    tok[i, width - n:] = rows[i][:n]
    seg[i, width - n:] = 1
    pos[i, width - n:] = np.arange(n)
  cache = KVCache.init(tiny_cfg, 2, width + 2)
  logits, cache = step(state, tok, pos, seg, cache)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, width - n:], alone[i][:n], atol=1e-5)
  decode_and_check(cache)

  # right padding
  tok = np.zeros((2, width), np.int32)
  seg = np.zeros((2, width), np.int32)
  for i, n in enumerate(lengths):
    tok[i, :n] = rows[i][:n]
    seg[i, :n] = 1
  cache = KVCache.init(tiny_cfg, 2, width + 2)
  logits, cache = step(state, tok, np.broadcast_to(np.arange(width), (2, width)), seg, cache)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, :n], alone[i][:n], atol=1e-5)
  cache.index = jnp.asarray(lengths, jnp.int32)
  decode_and_check(cache)


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state):
    def loss(state):
      total, count = next_token_loss(nnx.merge(graphdef, state), batch)
      return total / count
    return jax.value_and_grad(loss)(state)

  return f(state)


def _lm_batch(cfg, batch=2, seq=16, seed=0):
  tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=np.ones((batch, seq), np.float32))


def test_remat_gives_identical_loss_and_gradients(tiny_cfg):
  batch = _lm_batch(tiny_cfg)
  loss, grads = _loss_and_grads(create_model(tiny_cfg, seed=5), batch)
  loss_r, grads_r = _loss_and_grads(create_model(tiny_cfg.replace(remat=True), seed=5), batch)
  np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
  for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g, gr, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_with_float32_params(tiny_cfg):
  batch = _lm_batch(tiny_cfg)
  model32 = create_model(tiny_cfg, seed=6)
  model16 = create_model(tiny_cfg.replace(dtype="bfloat16"), seed=6)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16)))
  logits16, _ = model16(batch["tokens"])
  logits32, _ = model32(batch["tokens"])
  assert logits16.dtype == jnp.float32  # logits are always returned in float32
  assert np.isfinite(np.asarray(logits16)).all()
  # measured: logits within 3.3e-3 (magnitude up to 1.3), losses within 4.6e-5 (loss 4.9); the bounds leave 4.5-10x
  np.testing.assert_allclose(logits16, logits32, rtol=0, atol=0.015)
  loss16, grads16 = _loss_and_grads(model16, batch)
  loss32, _ = _loss_and_grads(model32, batch)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  assert abs(float(loss16) - float(loss32)) < 5e-4


def test_param_count_formula_matches_the_model():
  for name in ["tiny", "toy", "small", "interplay-100m", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"]:
    cfg = model_config(name)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == param_count(cfg), name
  # the published totals of the Qwen2.5 models
  assert param_count(model_config("qwen2.5-0.5b")) == 494_032_768
  assert param_count(model_config("qwen2.5-1.5b")) == 1_543_714_304
  assert param_count(model_config("qwen2.5-7b")) == 7_615_616_512
  assert 0.8e6 < param_count(model_config("toy")) < 1.2e6
  assert 90e6 < param_count(model_config("interplay-100m")) < 110e6


def test_every_parameter_carries_logical_axes(tiny_cfg):
  rules = dict(DEFAULT_RULES)
  for cfg in [tiny_cfg, tiny_cfg.replace(tie_embeddings=False, qkv_bias=False)]:
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables
    for v in variables:
      axes = v.get_metadata()["logical_axes"]
      assert len(axes) == len(v.shape)
      assert all(a in rules for a in axes)


def test_a_rope_scaled_model_saved_as_params_loads_and_samples(tmp_path, tiny_cfg):
  """`rope_scaling` is written to `model_config.json` as pairs and comes back from JSON as lists of lists: the
  loaded config is the saved one again (hashable, a static jit argument), so the model samples, as it did before
  saving."""
  from jaxstages.model.io import load_params, save_params
  from jaxstages.sampling import SamplingConfig, sample

  cfg = tiny_cfg.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  model = create_model(cfg, seed=1)
  save_params(model, tmp_path / "scaled")
  loaded = load_params(tmp_path / "scaled")
  assert loaded.cfg == cfg and hash(loaded.cfg) == hash(cfg)
  greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
  np.testing.assert_array_equal(sample(loaded, [[1, 2, 3]], greedy).tokens, sample(model, [[1, 2, 3]], greedy).tokens)
