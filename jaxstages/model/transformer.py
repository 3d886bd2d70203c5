"""The decoder: one `flax.nnx` model for the Qwen2/Qwen2.5 and Llama families.

RMSNorm -> grouped-query attention with RoPE (optional QKV bias) -> RMSNorm -> SwiGLU MLP, pre-norm residual blocks,
tied or untied embeddings. Every parameter carries `logical_axes` metadata that `jaxstages.sharding` maps to the mesh.

Inputs are `tokens [batch, seq]`, `positions [batch, seq]` (RoPE positions) and `segment_ids [batch, seq]`:
tokens attend only to earlier tokens of the *same* segment, so packed documents never see each other, and segment 0
marks padding (it attends to nothing and nothing attends to it).

KV cache layout (`KVCache`), batch-first everywhere so that one `jax.tree.map` can slice, repeat or shard it:
  k, v        per layer, `[batch, num_kv_heads, cache_len, head_dim]` (head-major: decoding reads each head's keys as
              one contiguous block, ~3x faster on a CPU than a slot-major cache that must be transposed every step)
  segment_ids `[batch, cache_len]`, 0 for empty slots
  index       `[batch]`, the next slot each row writes to
A forward with a cache writes its `seq` new keys/values at `index` (per row), then attends over the whole cache:
slot `j` is visible to the query in slot `i` when `j <= i` and their segment ids are equal and non-zero. Slot order is
time order for every row, so left- and right-padded batches, ragged prompts and one-token decoding all use the same
rule; positions are only used for RoPE. The attention itself is one of the kernels of `jaxstages.model.attention`
(`cfg.attention`), all with this rule.

With `cfg.scan_layers` the layers' parameters are stacked (`[num_layers, ...]`, logical axis `layers`) and a forward
without a cache runs them with `jax.lax.scan` (one traced layer: compile time flat in depth); a forward with a cache
(decoding) runs them as a loop over slices of the stack. `convert_layers` turns one layout into the other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxstages.model.attention import attend
from jaxstages.model.config import ModelConfig
from jaxstages.sharding import DEFAULT_RULES, constrain, param_shardings

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: tuple[Array, ...]
  v: tuple[Array, ...]
  segment_ids: Array
  index: Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, cache_len: int, dtype: Any = None) -> "KVCache":
    """An empty cache; `dtype` defaults to the model's compute dtype (bf16 halves decode memory traffic)."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(k=layers(), v=layers(), segment_ids=jnp.zeros((batch, cache_len), jnp.int32),
               index=jnp.zeros((batch,), jnp.int32))

  @staticmethod
  def logical_axes(cfg: ModelConfig) -> "KVCache":
    """Logical axis names of each field (a tree like the cache), for `jaxstages.sharding.logical_shardings`."""
    kv = (("batch", "act_kv_heads", "cache_seq", "head_dim"),) * cfg.num_layers
    return KVCache(k=kv, v=kv, segment_ids=("batch", "cache_seq"), index=("batch",))


def dense(x: Array, w: Array, contract: int = 1, preferred_element_type=None) -> Array:
  """Contracts the last `contract` dims of `x [..., *in]` with the first ones of `w [*in, *out]` -> `[..., *out]`.

  Done as one 2-D matmul over flattened tokens: the weight gradient then contracts over a single (batch * seq) axis,
  which XLA:CPU runs ~1.8x faster than the same dot over separate batch and seq axes; on accelerators the reshape is
  free.
  """
  lead, inner, outer = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
  y = jnp.dot(x.reshape(math.prod(lead), math.prod(inner)), w.reshape(math.prod(inner), math.prod(outer)),
              preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *outer)


def _param(rngs: nnx.Rngs, init, shape, cfg: ModelConfig, logical_axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, cfg.weight_dtype), logical_axes=logical_axes)


def _normal(cfg: ModelConfig):
  return jax.nn.initializers.normal(cfg.init_std)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 and cast back (as HF does, so bf16 runs match)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = cfg.rms_norm_eps
    self.scale = _param(rngs, jax.nn.initializers.ones, (cfg.hidden_size,), cfg, ("norm",))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Array:
  """Inverse frequencies `[head_dim // 2]`, with Llama-3 or linear scaling when configured."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling is None:
    return inv_freq
  s = dict(cfg.rope_scaling)
  kind = s.get("rope_type", s.get("type"))
  if kind == "linear":
    return inv_freq / s["factor"]
  # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotary embedding, rotate-half convention (HF Qwen2/Llama). x `[batch, seq, heads, head_dim]`, positions
  `[batch, seq]`."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = _normal(cfg)
    self.q = _param(rngs, init, (e, h, d), cfg, ("embed", "heads", "head_dim"))
    self.k = _param(rngs, init, (e, kv, d), cfg, ("embed", "kv_heads", "head_dim"))
    self.v = _param(rngs, init, (e, kv, d), cfg, ("embed", "kv_heads", "head_dim"))
    self.o = _param(rngs, init, (h, d, e), cfg, ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.q_bias = _param(rngs, zeros, (h, d), cfg, ("heads", "head_dim"))
      self.k_bias = _param(rngs, zeros, (kv, d), cfg, ("kv_heads", "head_dim"))
      self.v_bias = _param(rngs, zeros, (kv, d), cfg, ("kv_heads", "head_dim"))

  def _project(self, x: Array, name: str) -> Array:
    dtype = self.cfg.compute_dtype
    y = dense(x, getattr(self, name)[...].astype(dtype))
    if self.cfg.qkv_bias:
      y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
    return y

  def __call__(self, x: Array, positions: Array, segment_ids: Array, inv_freq: Array,
               cache: tuple[Array, Array, Array, Array] | None = None):
    """x `[batch, seq, embed]`; cache `(k, v, segment_ids, index)` of this layer or None. Returns (y, new k, new v)."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = apply_rope(self._project(x, "q"), positions, inv_freq)
    k = apply_rope(self._project(x, "k"), positions, inv_freq)
    v = self._project(x, "v")
    q = constrain(q, ("batch", "seq", "act_heads", None))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d], the cache's layout
    q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      kv_slots, kv_segments, new_k, new_v = q_slots, segment_ids, None, None
    else:
      cache_k, cache_v, kv_segments, index = cache
      write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))
      new_k = write(cache_k, k.astype(cache_k.dtype), index)
      new_v = write(cache_v, v.astype(cache_v.dtype), index)
      k, v = new_k.astype(x.dtype), new_v.astype(x.dtype)
      q_slots = q_slots + index[:, None]
      kv_slots = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), (b, k.shape[2]))
    out = attend(q, k, v, q_slots, segment_ids, kv_slots, kv_segments, implementation=cfg.attention,
                 self_attention=cache is None, block=cfg.attention_block)
    out = constrain(out, ("batch", "seq", "act_heads", None))
    y = dense(out, self.o[...].astype(x.dtype), contract=2)
    return y, new_k, new_v


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    init = _normal(cfg)
    self.gate = _param(rngs, init, (e, m), cfg, ("embed", "mlp"))
    self.up = _param(rngs, init, (e, m), cfg, ("embed", "mlp"))
    self.down = _param(rngs, init, (m, e), cfg, ("mlp", "embed"))

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    h = jax.nn.silu(dense(x, self.gate[...].astype(dtype))) * dense(x, self.up[...].astype(dtype))
    h = constrain(h, ("batch", "seq", "act_mlp"))
    return dense(h, self.down[...].astype(dtype))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, cache=None):
    y, new_k, new_v = self.attn(self.attn_norm(x), positions, segment_ids, inv_freq, cache)
    x = x + y
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "seq", "act_embed")), new_k, new_v


def _block_forward(block: Block, x, positions, segment_ids, inv_freq):
  return block(x, positions, segment_ids, inv_freq)[0]


REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One `Block` whose every parameter is the `num_layers` layers' stacked along a new leading axis (logical axis
  `layers`), initialised exactly as the unstacked `Block`s (same rng stream), so the two layouts are one model."""
  blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
  graphdef = nnx.graphdef(blocks[0])
  is_var = lambda x: isinstance(x, nnx.Variable)

  def stack(*vs):
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]),
                         logical_axes=("layers",) + tuple(vs[0].get_metadata()["logical_axes"]))

  return nnx.merge(graphdef, jax.tree.map(stack, *[nnx.state(b) for b in blocks], is_leaf=is_var))


class Transformer(nnx.Module):
  """Decoder-only LM. `model(tokens, positions, segment_ids, cache) -> (logits [batch, seq, vocab] f32, cache)`.

  `layers` is an `nnx.List` of `Block`s, or with `cfg.scan_layers` one `Block` of stacked parameters
  (`stacked_blocks`) that the forward runs with `jax.lax.scan`; `convert_layers` turns one layout into the other.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, _normal(cfg), (cfg.vocab_size, cfg.hidden_size), cfg, ("vocab", "embed"))
    if cfg.scan_layers:
      self.layers = stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, _normal(cfg), (cfg.hidden_size, cfg.vocab_size), cfg, ("embed", "vocab"))

  def _blocks(self):
    """Each layer as a `Block` (with scanned layers: a view of its slice of the stacked parameters)."""
    if not self.cfg.scan_layers:
      return list(self.layers)
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(self.cfg.num_layers)]

  def _trunk(self, x, positions, segment_ids, inv_freq):
    """Every layer without a cache: a Python loop, or one `lax.scan` step per layer with `scan_layers`."""
    cfg = self.cfg
    policy = REMAT_POLICIES[cfg.remat_policy]
    if not cfg.scan_layers:
      forward = nnx.remat(_block_forward, policy=policy) if cfg.remat else _block_forward
      for block in self.layers:
        x = forward(block, x, positions, segment_ids, inv_freq)
      return x
    graphdef, state = nnx.split(self.layers)

    def layer(x, layer_state):
      return _block_forward(nnx.merge(graphdef, layer_state), x, positions, segment_ids, inv_freq), None

    if cfg.remat:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)  # inside scan CSE cannot hoist the recompute
    return jax.lax.scan(layer, x, state)[0]

  def hidden_states(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                    cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Final-norm hidden states `[batch, seq, embed]` (compute dtype) and the updated cache."""
    cfg = self.cfg
    chex.assert_rank(tokens, 2)
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      start = jnp.zeros((b,), jnp.int32) if cache is None else cache.index
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    chex.assert_shape([positions, segment_ids], (b, t))
    inv_freq = rope_frequencies(cfg)
    # Gather from a table whose rows are whole on every device: XLA cannot gather from a vocab/embed-sharded table
    # into a batch-sharded result without a full rematerialisation (FSDP all-gathers the weights anyway).
    table = constrain(self.embed[...].astype(cfg.compute_dtype), (None, None))
    x = table[tokens]
    x = constrain(x, ("batch", "seq", "act_embed"))
    if cache is None:
      return self.final_norm(self._trunk(x, positions, segment_ids, inv_freq)), None
    chex.assert_shape(cache.index, (b,))
    new_segments = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))(
        cache.segment_ids, segment_ids, cache.index)
    ks, vs = [], []
    # decoding keeps the per-layer cache tuple (batch-first arrays the sampler slices and repeats) and so runs the
    # layers as a loop, also with scan_layers
    for i, block in enumerate(self._blocks()):
      layer_cache = (cache.k[i], cache.v[i], new_segments, cache.index)
      x, k, v = block(x, positions, segment_ids, inv_freq, layer_cache)
      ks.append(k)
      vs.append(v)
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), segment_ids=new_segments, index=cache.index + t)
    return self.final_norm(x), new_cache

  def head(self) -> Array:
    """The output projection `[embed, vocab]` in the compute dtype (the embedding table's transpose when tied)."""
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return head.astype(self.cfg.compute_dtype)

  def logits(self, hidden: Array) -> Array:
    """`[batch, seq, embed]` hidden states -> `[batch, seq, vocab]` float32 logits."""
    # float32 out even from bf16 inputs: log-probs (RL ratios, KL) need more than bf16's 8 bits of mantissa
    logits = dense(hidden, self.head().astype(hidden.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache)
    return self.logits(hidden), cache


def create_model(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 rules=None) -> Transformer:
  """A freshly initialised model; on a mesh, each parameter is created directly in its sharding (never gathered
  whole on one device), identically on every process and for every mesh shape."""
  if mesh is None:
    return Transformer(cfg, nnx.Rngs(seed))
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules or DEFAULT_RULES)
  state = jax.jit(lambda: nnx.state(Transformer(cfg, nnx.Rngs(seed))), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def convert_layers(model: Transformer, scan_layers: bool, mesh: jax.sharding.Mesh | None = None,
                   rules=None) -> Transformer:
  """The same model with its layers stacked for `lax.scan` (`scan_layers=True`) or as a list of `Block`s; a model
  already in that layout is returned as is. On a mesh the result is laid out by the rules (the stacked `layers` axis
  unsharded)."""
  cfg = model.cfg
  if cfg.scan_layers == scan_layers:
    return model
  new_cfg = cfg.replace(scan_layers=scan_layers)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(new_cfg, nnx.Rngs(0))))
  pure = nnx.state(model).to_pure_dict()

  def convert(pure):
    pure = dict(pure)
    if scan_layers:
      pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(cfg.num_layers)])
    else:
      pure["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], pure["layers"]) for i in range(cfg.num_layers)}
    return pure

  out_shardings = None
  if mesh is not None:
    out_shardings = param_shardings(abstract, mesh, rules or DEFAULT_RULES).to_pure_dict()
  abstract.replace_by_pure_dict(jax.jit(convert, out_shardings=out_shardings)(pure))
  return nnx.merge(graphdef, abstract)
