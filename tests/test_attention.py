"""Every attention kernel that runs on this machine equals the einsum reference (float32, <= 1e-5): packed documents,
left padding, KV-cache prefill and one-token decoding, values and gradients. Splash runs in Pallas interpret mode
off TPU; cuDNN needs an NVIDIA GPU and is skipped elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.model import KVCache, create_model
from jaxstages.model.attention import attend, resolve

ON_GPU = jax.default_backend() == "gpu"
# (implementation, attention_block): small blocks, so the blocked kernel really runs several query blocks
KERNELS = [("xla", 512), ("blocked", 4), ("blocked", 5)] + ([("cudnn", 512)] if ON_GPU else [])


def _inputs(b=2, t=12, h=4, kv=2, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, kv, t, d))
  v = jax.random.normal(keys[2], (b, kv, t, d))
  return q, k, v


def _segments(t):
  """Row 0: two packed documents then padding; row 1: left padding then one document."""
  a, b = t // 3, t // 2
  row0 = [1] * a + [2] * (t - a - 2) + [0, 0]
  row1 = [0] * b + [1] * (t - b)
  return jnp.asarray([row0, row1], jnp.int32)


def _valid(seg):
  return np.asarray(seg)[:, :, None, None] != 0


@pytest.mark.parametrize("impl,block", KERNELS + [("decode", 512)])
def test_kernel_equals_einsum_with_packing_and_padding_values_and_gradients(impl, block):
  q, k, v = _inputs()
  t = q.shape[1]
  seg = _segments(t)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
  valid = _valid(seg)

  def run(name, q, k, v, blk=512):
    return attend(q, k, v, slots, seg, slots, seg, implementation=name, self_attention=True, block=blk)

  ref, out = run("einsum", q, k, v), run(impl, q, k, v, block)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5)
  # gradients of a loss on the valid positions (padding outputs are unspecified and never read)
  w = jax.random.normal(jax.random.key(9), q.shape)
  loss = lambda name, blk: lambda q, k, v: jnp.sum(jnp.where(valid, run(name, q, k, v, blk) * w, 0.0))
  got = jax.grad(loss(impl, block), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("einsum", 512), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_splash_in_interpret_mode_equals_einsum():
  """Pallas splash attention (interpret mode off TPU: slow, so one 128-block shape)."""
  q, k, v = _inputs(t=256, d=16)
  seg = _segments(256)
  slots = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), seg.shape)
  valid = _valid(seg)
  run = lambda name: lambda q, k, v: attend(q, k, v, slots, seg, slots, seg, implementation=name,
                                            self_attention=True, block=128)
  np.testing.assert_allclose(np.where(valid, run("splash")(q, k, v), 0), np.where(valid, run("einsum")(q, k, v), 0),
                             atol=1e-5)
  loss = lambda name: lambda q, k, v: jnp.sum(jnp.where(valid, run(name)(q, k, v), 0.0) ** 2)
  for g, r in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-4 * float(np.abs(r).max()))


def _forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda tok, pos, seg, cache: nnx.merge(graphdef, state)(tok, pos, seg, cache))


@pytest.mark.parametrize("impl,block", KERNELS + [("splash", 512), ("decode", 512)])
def test_model_with_kernel_equals_einsum_for_left_padded_prefill_and_cached_decoding(tiny_cfg, impl, block):
  """Ragged prompts left-padded into one batch, prefilled into a cache and decoded one token at a time: every
  kernel's logits equal the einsum model's at every valid position (splash, self-attention only, hands cached
  calls to the blocked kernel)."""
  rng = np.random.default_rng(1)
  lengths, width, new = [5, 9], 9, 3
  rows = [rng.integers(0, tiny_cfg.vocab_size, n + new) for n in lengths]
  tok, seg, pos = (np.zeros((2, width), np.int32) for _ in range(3))
  for i, n in enumerate(lengths):
    tok[i, width - n:], seg[i, width - n:], pos[i, width - n:] = rows[i][:n], 1, np.arange(n)

  def run(cfg):
    step = _forward(create_model(cfg, seed=4))
    logits, cache = step(tok, pos, seg, KVCache.init(cfg, 2, width + new))
    outs = [np.where(seg[:, :, None] != 0, logits, 0)]
    for s in range(new):
      nxt = np.array([[r[n + s]] for r, n in zip(rows, lengths)], np.int32)
      logits, cache = step(nxt, np.array([[n + s] for n in lengths], np.int32), np.ones((2, 1), np.int32), cache)
      outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)

  ref = run(tiny_cfg.replace(attention="einsum"))
  np.testing.assert_allclose(run(tiny_cfg.replace(attention=impl, attention_block=block)), ref, atol=1e-5)


@pytest.mark.parametrize("impl,block", KERNELS)
def test_model_with_kernel_equals_einsum_on_packed_rows_loss_and_gradients(tiny_cfg, impl, block):
  from jaxstages.losses import next_token_loss

  rng = np.random.default_rng(2)
  t = 16
  tok = rng.integers(0, tiny_cfg.vocab_size, (2, t + 1)).astype(np.int32)
  seg = np.array([[1] * 6 + [2] * 10, [1] * 11 + [0] * 5], np.int32)
  pos = np.array([list(range(6)) + list(range(10)), list(range(11)) + [0] * 5], np.int32)
  batch = dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=(seg != 0).astype(np.float32), positions=pos,
               segment_ids=seg)

  def loss_and_grads(cfg):
    graphdef, state = nnx.split(create_model(cfg, seed=5))
    mean = lambda state: (lambda s, c: s / c)(*next_token_loss(nnx.merge(graphdef, state), batch))
    return jax.jit(jax.value_and_grad(mean))(state)

  loss, grads = loss_and_grads(tiny_cfg.replace(attention=impl, attention_block=block))
  ref_loss, ref_grads = loss_and_grads(tiny_cfg.replace(attention="einsum"))
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_auto_picks_the_fused_kernel_of_each_platform():
  kw = dict(self_attention=True, q_len=4096, kv_len=4096, block=512)
  assert resolve("auto", platform="tpu", dtype=jnp.bfloat16, **kw) == "splash"
  assert resolve("auto", platform="gpu", dtype=jnp.bfloat16, **kw) == "cudnn"
  assert resolve("auto", platform="gpu", dtype=jnp.float32, **kw) == "blocked"  # cuDNN flash is bf16/fp16 only
  assert resolve("auto", platform="cpu", dtype=jnp.float32, **kw) == "blocked"
  assert resolve("auto", platform="cpu", dtype=jnp.float32, **dict(kw, q_len=64, kv_len=64)) == "einsum"
  # a cached prefill: blocked once the scores outgrow one block^2
  assert resolve("auto", platform="gpu", dtype=jnp.bfloat16, **dict(kw, self_attention=False)) == "blocked"
  assert resolve("auto", platform="gpu", dtype=jnp.bfloat16, **dict(kw, self_attention=False, q_len=64)) == "einsum"
  # decoding (a cache): one query against the cache is small; splash is self-attention only
  assert resolve("auto", platform="tpu", dtype=jnp.bfloat16, **dict(kw, self_attention=False, q_len=1)) == "einsum"
  assert resolve("auto", platform="cpu", dtype=jnp.float32, **dict(kw, self_attention=False, q_len=1)) == "decode"
  assert resolve("splash", platform="tpu", dtype=jnp.bfloat16, **dict(kw, self_attention=False)) == "blocked"


def test_bfloat16_compute_with_each_kernel_stays_close_to_float32(tiny_cfg):
  """bf16 activations, float32 softmax and logits: every kernel's bf16 model is within bf16 rounding of the float32
  einsum model, and its logits come back in float32."""
  tokens = np.random.default_rng(3).integers(0, tiny_cfg.vocab_size, (2, 160)).astype(np.int32)
  ref = np.asarray(create_model(tiny_cfg.replace(attention="einsum"), seed=2)(tokens)[0])
  for impl, block in [("einsum", 512), ("xla", 512), ("blocked", 512)]:
    logits, _ = create_model(tiny_cfg.replace(dtype="bfloat16", attention=impl, attention_block=block), seed=2)(tokens)
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - ref).max() < 0.05, impl


def test_splash_runs_per_shard_on_a_mesh(devices):
  """On a mesh the Pallas kernel runs under `shard_map` (XLA does not partition it): rows over fsdp, KV heads over
  tensor; values and gradients equal the einsum's."""
  from jaxstages.sharding import DEFAULT_RULES, MeshConfig, make_mesh, use_mesh

  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
  q, k, v = _inputs(b=4, t=128, d=16)
  seg = jnp.ones((4, 128), jnp.int32).at[:, :50].set(2)
  slots = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), seg.shape)
  run = lambda name: lambda q, k, v: attend(q, k, v, slots, seg, slots, seg, implementation=name,
                                            self_attention=True, block=128)
  loss = lambda name: lambda q, k, v: jnp.sum(run(name)(q, k, v) ** 2)
  with use_mesh(mesh, DEFAULT_RULES):
    out = jax.jit(run("splash"))(q, k, v)
    grads = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(out, run("einsum")(q, k, v), atol=1e-5)
  for g, r in zip(grads, jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-4)
