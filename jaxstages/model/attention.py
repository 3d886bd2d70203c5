"""Attention kernels behind one function, `attend`, chosen by `ModelConfig.attention`.

All take queries `[batch, seq, heads, head_dim]`, keys and values in the KV cache's head-major layout
`[batch, kv_heads, kv_len, head_dim]` (grouped-query attention: `heads` is a multiple of `kv_heads`), and the slot and
segment ids of both sides, and return `[batch, seq, heads, head_dim]`. Key slot `j` is visible to query slot `i` when
`j <= i` and their segment ids are equal and non-zero (`attention_mask`): packed documents, left / right padding and
KV-cache decoding are all that one rule. Softmax is always computed in float32. Outputs at query positions that see no
key at all (padding, segment 0) are finite but unspecified; nothing downstream reads them.

- `einsum`: the reference. Two einsums that materialise the `[batch, heads, seq, kv_len]` float32 scores.
- `xla`: `jax.nn.dot_product_attention(implementation="xla")` with the boolean mask; the same math as `einsum`
  (XLA's own composition), kept to compare against and as what `cudnn` falls back to.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention (NVIDIA GPUs,
  bf16/fp16). The segment mask goes in as an additive bias (`[batch, 1, seq, kv_len]`, compute dtype) and, without a
  cache, `is_causal` lets cuDNN skip the blocks above the diagonal.
- `splash`: Pallas splash attention (TPU; `interpret` mode elsewhere, for tests), block-sparse causal mask plus
  segment ids, one MQA kernel per KV head (the heads of a group share its keys). Self-attention without a cache only:
  with a cache `attend` uses `blocked` instead.
- `blocked`: a flash-style attention in plain JAX with its own backward pass: queries in blocks (`query_block`: an
  eighth of the sequence, at most `attention_block`), each block's softmax over the keys it can see (without a cache,
  only the causal prefix, so the work above the diagonal is skipped), and the backward recomputing each block's
  probabilities from the saved log-sum-exp instead of storing them. Memory is `O(block x kv_len)` per head instead of
  `O(seq x kv_len)`; runs everywhere; the fastest kernel on XLA:CPU, and what the CPU plans of accelerator presets
  measure in place of the fused kernels.
- `decode`: the einsum's math as broadcast multiplies and sums over `head_dim` and the keys instead of batched
  matmuls. For one query per row (KV-cache decoding) XLA:CPU runs the einsum as one tiny matmul per row and head;
  this is ~4x faster there (4,096 rows x 160 keys: 0.045 s against 0.18 s a layer). Memory grows as
  `seq x kv_len x head_dim`, so it is for decoding only.
- `auto`: for self-attention (no cache) splash on TPU, cuDNN on GPU (bf16/fp16), else `blocked` from 128 positions
  (`einsum` below); with a cache, one query per row (decoding) on the CPU `decode`, else `einsum` where the scores
  are small (one `attention_block`² per head or less), else `blocked` (a long prefill).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from jaxstages.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxstages.sharding import active_spec

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)  # a masked score: exp(_NEG - max) underflows to exactly 0


def attention_mask(q_slots: Array, q_segments: Array, kv_slots: Array, kv_segments: Array) -> Array:
  """`[batch, q, kv]` bool: causal in slot order, within one non-padding segment."""
  causal = kv_slots[:, None, :] <= q_slots[:, :, None]
  same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
  return causal & same


def resolve(implementation: str, *, self_attention: bool, q_len: int, kv_len: int, dtype, block: int,
            platform: str | None = None) -> str:
  """The kernel `auto` stands for on `platform` (default: JAX's default backend) for one call's shapes; any other
  name is returned as given, except `splash` with a cache, which becomes `blocked` (splash is self-attention only)."""
  platform = platform or jax.default_backend()
  if implementation == "splash" and not self_attention:
    return "blocked"
  if implementation != "auto":
    return implementation
  if self_attention and platform == "tpu" and q_len % 128 == 0:
    return "splash"
  if self_attention and platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if self_attention:  # causal block skipping: ~2x the einsum's speed on XLA:CPU already at 256 positions
    return "blocked" if q_len >= 128 else "einsum"
  if q_len == 1 and platform == "cpu":
    return "decode"
  return "einsum" if q_len * kv_len <= block * block else "blocked"


def attend(q: Array, k: Array, v: Array, q_slots: Array, q_segments: Array, kv_slots: Array, kv_segments: Array, *,
           implementation: str = "auto", self_attention: bool = False, block: int = 512) -> Array:
  """Grouped-query attention. q `[b, t, h, d]`; k, v `[b, kv, s, d]`; slots and segments `[b, t]` / `[b, s]`.

  `self_attention`: the call has no cache, so `q_slots == kv_slots == arange(t)` in every row (the fused kernels'
  plain causal mask applies, and `blocked` skips the keys after each query block). Returns `[b, t, h, d]`.
  """
  b, t, h, d = q.shape
  impl = resolve(implementation, self_attention=self_attention, q_len=t, kv_len=k.shape[2], dtype=q.dtype,
                 block=block)
  if impl == "einsum":
    return _einsum(q, k, v, attention_mask(q_slots, q_segments, kv_slots, kv_segments))
  if impl == "decode":
    return _decode(q, k, v, attention_mask(q_slots, q_segments, kv_slots, kv_segments))
  if impl in ("xla", "cudnn"):
    mask = attention_mask(q_slots, q_segments, kv_slots, kv_segments)[:, None]  # [b, 1, t, s]: every head
    return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask,
                                        is_causal=self_attention and impl == "cudnn", implementation=impl)
  if impl == "splash":
    return _splash(q, k, v, q_segments, kv_segments, block)
  if impl == "blocked":
    kv, g = k.shape[1], h // k.shape[1]
    block = query_block(t, block)
    q5 = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    out = _blocked(q5, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")


# -- einsum: the reference ----------------------------------------------------------------------------------------


def _einsum(q: Array, k: Array, v: Array, mask: Array) -> Array:
  b, t, h, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  g = h // kv
  # The `groups` query heads sharing a KV head are folded into the query axis, so each KV head is one plain batched
  # matmul `[b, kv] x (groups*t, d) @ (d, s)` (the fastest layout on XLA:CPU too).
  q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = scores.reshape(b, kv, g, t, s)
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, g * t, s)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, d)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _decode(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The einsum's math with the contractions written as multiply-and-sum (float32), for a few queries per row:
  q `[b, t, h, d]`, k and v `[b, kv, s, d]`, mask `[b, t, s]`; returns `[b, t, h, d]` in v's dtype."""
  b, t, h, d = q.shape
  kv = k.shape[1]
  g = h // kv
  f32 = jnp.float32
  q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).astype(f32)  # [b, kv, g, t, d]
  scores = jnp.sum(q[:, :, :, :, None, :] * k[:, :, None, None].astype(f32), axis=-1) / math.sqrt(d)  # [b, kv, g, t, s]
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(f32)  # rounded to the compute dtype, as the einsum's
  out = jnp.sum(probs[..., None] * v[:, :, None, None].astype(f32), axis=-2)  # [b, kv, g, t, d]
  return out.astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# -- blocked: flash-style attention with its own backward ---------------------------------------------------------


def query_block(t: int, block: int) -> int:
  """The blocked kernel's query block for `t` queries: `t / 8` (rounded up, at least 16), at most `block`. Eight
  blocks skip 7/16 of the causal work; smaller blocks skip little more and cost a loop step each (measured on
  XLA:CPU at 256 positions: 32-64 fastest, 2x the einsum's forward and backward); `block` bounds the
  `[batch, heads, block, kv_len]` float32 scores one step holds."""
  return min(block, max(16, -(-t // 8)))



def _query_blocks(t: int, s: int, block: int, self_attention: bool) -> list[tuple[int, int, int]]:
  """(query start, query end, visible key end) per query block: without a cache a query block sees only the keys up
  to its last query (slots are positions), with one every key (the mask does the rest)."""
  return [(i, min(i + block, t), min(i + block, s) if self_attention else s) for i in range(0, t, block)]


def _block_scores(q, k, q_slots, q_segments, kv_slots, kv_segments):
  """Masked float32 scores `[b, kv, g, bq, sk]` of one query block against a key prefix, and the mask."""
  b, kv, g, bq, d = q.shape
  s = k.shape[2]
  scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kv, g * bq, d), k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, bq, s) / math.sqrt(d)
  mask = attention_mask(q_slots, q_segments, kv_slots, kv_segments)[:, None, None]
  return jnp.where(mask, scores, _NEG), mask


def _pv(p, v):
  """`[b, kv, g, bq, sk] @ [b, kv, sk, d] -> [b, kv, g, bq, d]`, groups folded into the query axis."""
  b, kv, g, bq, s = p.shape
  return jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kv, g * bq, s), v).reshape(b, kv, g, bq, v.shape[-1])


def _blocked_forward(q, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention):
  outs, lses = [], []
  for qs, qe, ke in _query_blocks(q.shape[3], k.shape[2], block, self_attention):
    scores, _ = _block_scores(q[:, :, :, qs:qe], k[:, :, :ke], q_slots[:, qs:qe], q_segments[:, qs:qe],
                              kv_slots[:, :ke], kv_segments[:, :ke])
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    outs.append(_pv((p / l).astype(v.dtype), v[:, :, :ke]))
    lses.append((m + jnp.log(l))[..., 0])
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blocked(q, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention):
  """q `[b, kv, g, t, d]`, k, v `[b, kv, s, d]` -> `[b, kv, g, t, d]`."""
  return _blocked_forward(q, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention)[0]


def _blocked_fwd(q, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention):
  out, lse = _blocked_forward(q, k, v, q_slots, q_segments, kv_slots, kv_segments, block, self_attention)
  return out, (q, k, v, q_slots, q_segments, kv_slots, kv_segments, out, lse)


def _blocked_bwd(block, self_attention, residuals, d_out):
  q, k, v, q_slots, q_segments, kv_slots, kv_segments, out, lse = residuals
  b, kv, g, t, d = q.shape
  # D_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term, without the probabilities
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  blocks = _query_blocks(t, k.shape[2], block, self_attention)
  dqs, dk_parts, dv_parts = [], [], []
  for qs, qe, ke in blocks:
    qb, kb, vb, dob = q[:, :, :, qs:qe], k[:, :, :ke], v[:, :, :ke], d_out[:, :, :, qs:qe]
    bq = qe - qs
    scores, mask = _block_scores(qb, kb, q_slots[:, qs:qe], q_segments[:, qs:qe], kv_slots[:, :ke],
                                 kv_segments[:, :ke])
    p = jnp.exp(scores - lse[:, :, :, qs:qe, None])  # [b, kv, g, bq, sk] float32
    fold = lambda x: x.reshape(b, kv, g * bq, x.shape[-1])
    dv_parts.append(jnp.einsum("bkqs,bkqd->bksd", fold(p.astype(v.dtype)), fold(dob),
                               preferred_element_type=jnp.float32))
    dp = jnp.einsum("bkqd,bksd->bkqs", fold(dob), vb, preferred_element_type=jnp.float32).reshape(p.shape)
    # masked scores get no gradient (as `jnp.where` gives the reference), even in rows that see no key at all
    ds = jnp.where(mask, p * (dp - delta[:, :, :, qs:qe]), 0.0) / math.sqrt(d)
    ds = fold(ds.astype(q.dtype))
    dqs.append(jnp.einsum("bkqs,bksd->bkqd", ds, kb, preferred_element_type=jnp.float32).reshape(b, kv, g, bq, d))
    dk_parts.append(jnp.einsum("bkqs,bkqd->bksd", ds, fold(qb), preferred_element_type=jnp.float32))
  dk, dv = _sum_key_prefixes(dk_parts, blocks, k.shape), _sum_key_prefixes(dv_parts, blocks, v.shape)
  dq = jnp.concatenate(dqs, axis=3).astype(q.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


def _sum_key_prefixes(parts: list[Array], blocks: list[tuple[int, int, int]], shape) -> Array:
  """The keys' gradient `shape` (`[b, kv, s, d]`, float32) from each query block's over its visible prefix
  (`parts[i]`: `[b, kv, ke_i, d]`): each run of keys between two prefix ends is summed over the blocks that see it and
  the runs concatenated, so every key's gradient is written once (adding each block into a full-size buffer costs a
  copy of the buffer per block on XLA:CPU)."""
  ends = sorted({ke for _, _, ke in blocks})
  runs, start = [], 0
  for end in ends:
    seen = [part[:, :, start:end] for part, (_, _, ke) in zip(parts, blocks) if ke >= end]
    runs.append(functools.reduce(jnp.add, seen))
    start = end
  if start < shape[2]:  # keys no query block sees
    runs.append(jnp.zeros((*shape[:2], shape[2] - start, shape[3]), jnp.float32))
  return jnp.concatenate(runs, axis=2)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# -- splash (Pallas, TPU) -----------------------------------------------------------------------------------------


def _splash(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array, block: int) -> Array:
  b, t, h, d = q.shape
  kv = k.shape[1]
  g = h // kv
  blk = math.gcd(t, block)
  if blk % 128:
    raise ValueError(f"splash attention needs blocks of a multiple of 128 dividing both the sequence length ({t}) "
                     f"and attention_block ({block})")
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  kernel = sa.make_splash_mqa(sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(g)]), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu")
  q5 = (q * (1.0 / math.sqrt(d))).astype(q.dtype).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)

  def rows(q5, k, v, q_segments, kv_segments):
    one_head = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks))  # q [g, t, d], k [t, d]
    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
    return jax.vmap(per_head)(q5, k, v, q_segments, kv_segments)

  specs = [active_spec(axes, x.shape) for axes, x in
           ((("batch", "act_kv_heads", None, None, None), q5), (("batch", "act_kv_heads", None, None), k),
            (("batch", "act_kv_heads", None, None), v), (("batch", None), q_segments), (("batch", None), kv_segments))]
  if specs[0] is not None:  # on a mesh: a Pallas kernel is not partitioned by XLA; run it per shard
    rows = jax.shard_map(rows, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)
  out = rows(q5, k, v, q_segments, kv_segments)  # [b, kv, g, t, d]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
