"""The one sampler: jitted prefill + decode through the model's KV cache.

RL rollouts, on-policy distillation and every evaluation run through `sample`. It takes the training model as it is
(the same `nnx` state, the same sharding: nothing is copied or converted) and returns, per generated token, the
log-prob under the distribution it was actually drawn from (tempered, top-k/top-p truncated) and under the untempered
model, both float32, so an RL loss can use either as its importance-ratio denominator.

Layout: `prompts` (B of them, ragged) are left-padded to a length bucket, prefilled **once**, and each prompt's cache
is repeated into its `n` sample rows (row `i * n + j` is sample `j` of prompt `i`), so a GRPO group costs one prefill,
not `n`. The decode loop is a `lax.while_loop` that stops as soon as every row has emitted a stop token, or after
`max_new_tokens`. Shapes are static per (batch, prompt bucket, settings), so a training run compiles the sampler once.

Randomness: row `r` draws its token at decode step `t` with `fold_in(fold_in(key(seed), r), t)`, so a sample depends
only on (seed, row, step) and the logits: the same seed gives the same samples on 1 or 8 devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxstages.config import ConfigError, check_keys
from jaxstages.losses import token_log_probs
from jaxstages.model import KVCache, Transformer
from jaxstages.model.transformer import convert_layers
from jaxstages.sharding import (DEFAULT_RULES, LogicalRules, constrain, data_parallel_size,
                                global_batch_from_process_local, local_rows, logical_to_spec, process_rows, use_mesh)

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. `temperature=0` is greedy decoding; `top_k=0` and `top_p=1` switch truncation off."""

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  n: int = 1  # samples per prompt (a GRPO group)
  stop_tokens: tuple[int, ...] = ()  # a row stops after emitting one of these (the stop token is kept and masked in)
  cache_dtype: str | None = None  # e.g. "bfloat16"; None: the model's compute dtype
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS  # prompts are left-padded to the smallest bucket that fits
  pad_id: int = 0  # written after a row has stopped (its mask is 0 there)
  # thinking budget (Qwen3-style): after `think_budget` tokens inside a `think_open_id` ... `think_close_id` block
  # the close token is forced, so the answer still follows, and outside a block the close token is never sampled;
  # a prompt that ends with the open token starts inside
  think_budget: int | None = None
  think_open_id: int = -1
  think_close_id: int = -1
  # forced right after a forced close, like Qwen3's "... I have to give the solution based on the thinking directly
  # now." transition: e.g. the tokens that open the answer line, so a model cut off mid-thought answers at once
  think_budget_suffix: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.n < 1:
      raise ConfigError(f"max_new_tokens ({self.max_new_tokens}) and n ({self.n}) must be >= 1")
    if self.think_budget is not None and (self.think_budget < 0 or min(self.think_open_id, self.think_close_id) < 0):
      raise ConfigError("think_budget needs think_open_id and think_close_id (the tokenizer's <think>, </think>)")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got temperature={self.temperature}, "
                        f"top_p={self.top_p}, top_k={self.top_k}")
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
    object.__setattr__(self, "think_budget_suffix", tuple(int(t) for t in self.think_budget_suffix))
    object.__setattr__(self, "prompt_buckets", tuple(sorted(int(b) for b in self.prompt_buckets)))

  @classmethod
  def from_config(cls, config=None, **overrides) -> "SamplingConfig":
    values = dict(config or {}, **overrides)
    check_keys(values, {f.name for f in dataclasses.fields(cls)}, "sampling config")
    return cls(**values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Samples:
  """What `sample` returns; `rows = prompts * n`, row `i * n + j` is sample `j` of prompt `i`.

  tokens          `[rows, max_new]` int32, `pad_id` after a row's stop token
  logprobs        `[rows, max_new]` float32, log-prob of each token under the distribution it was drawn from
                  (tempered and truncated; 0 for greedy decoding, a point mass)
  model_logprobs  `[rows, max_new]` float32, log-prob under the untempered, untruncated model
  mask            `[rows, max_new]` float32, 1 for generated tokens (the stop token included), 0 after
  lengths         `[rows]` int32, generated tokens per row (the stop token included)
  forced          `[rows, max_new]` float32, 1 where the thinking budget forced the close token or its suffix (the
                  policy did not choose it: an RL loss should leave it out; its `logprobs` entry is 0,
                  `model_logprobs` the model's)
  """

  tokens: jax.Array
  logprobs: jax.Array
  model_logprobs: jax.Array
  mask: jax.Array
  lengths: jax.Array
  forced: jax.Array

  def local(self) -> "Samples":
    """This process's rows as numpy arrays (every row on one process): what it decodes and verifies."""
    return Samples(**{f.name: local_rows(getattr(self, f.name)) for f in dataclasses.fields(self)})

  def completions(self) -> list[list[int]]:
    """Per row of this process (every row on one process), the generated tokens up to and including its stop token
    (host lists)."""
    tokens, lengths = local_rows(self.tokens), local_rows(self.lengths)
    return [row[:n].tolist() for row, n in zip(tokens, lengths)]


def prompt_bucket(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= length:
      return b
  raise ConfigError(f"a prompt of {length} tokens is longer than the largest prompt bucket ({max(buckets)}); "
                    f"add a bigger bucket to SamplingConfig.prompt_buckets")


def stop_ids(tokenizer, chat: bool = True) -> tuple[int, ...]:
  """The ids a completion stops at: the end of a document and, for chat prompts, the end of a turn (`<|im_end|>`)."""
  ids = [tokenizer.eos_id] + ([getattr(tokenizer, "im_end_id", None)] if chat else [])
  return tuple(int(i) for i in ids if i is not None and i >= 0)


def strip_stop(tokens: list[int], stops: Sequence[int]) -> list[int]:
  """A completion's tokens (`Samples.completions()`) without its final stop token, if it stopped."""
  return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def unpad_prompts(prompt_tokens: np.ndarray, prompt_mask: np.ndarray) -> list[list[int]]:
  """A pipeline's left-padded prompts (`[batch, prompt_len]` tokens and mask) as token lists, for `sample`."""
  return [row[mask == 1].tolist() for row, mask in zip(np.asarray(prompt_tokens), np.asarray(prompt_mask))]


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """`tokens`, `positions`, `segment_ids`, all `[len(prompts), width]`: each prompt right-aligned, padding slots with
  segment 0 (invisible) and positions counting from 0 at each prompt's first token."""
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= width:
      raise ConfigError(f"prompt {i} has {len(p)} tokens; prompts need 1..{width} tokens")
    tokens[i, width - len(p):] = p
    segments[i, width - len(p):] = 1
    positions[i, width - len(p):] = np.arange(len(p))
  return dict(tokens=tokens, positions=positions, segment_ids=segments)


def choose_tokens(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig,
                  banned: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token per row from float32 `logits [rows, vocab]` with per-row `keys [rows]`; `banned [rows, vocab]`
  (bool) takes tokens out of the sampled-from distribution. Returns (tokens, log-prob under the sampled-from
  distribution, log-prob under the untempered, unrestricted model), each `[rows]`."""
  logits = logits.astype(jnp.float32)
  model_lp = jax.nn.log_softmax(logits, axis=-1)
  if banned is not None:
    logits = jnp.where(banned, -jnp.inf, logits)
  if cfg.temperature == 0:
    tokens = jnp.argmax(logits, axis=-1)
    sampled_lp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    x = truncate_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    tokens = jax.vmap(categorical)(keys, x)
    sampled_lp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), sampled_lp, jnp.take_along_axis(model_lp, tokens[:, None], axis=-1)[:, 0]


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """`jax.random.categorical(key, logits)` for one row `logits [vocab]`, token for token (the same Gumbel noise, the
  same first index of the maximum), with the argmax written as a max and a min over the indices that reach it: XLA:CPU
  runs `jnp.argmax`'s variadic reduction ~2x slower, and with the noise fused alongside it a decode step's sampling
  took ~1.8x as long (4,096 rows x 512)."""
  y = jax.random.gumbel(key, logits.shape, logits.dtype) + logits
  index = jax.lax.broadcasted_iota(jnp.int32, y.shape, 0)
  return jnp.min(jnp.where(y == jnp.max(y), index, y.shape[0]))


def truncate_logits(x: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Top-k then top-p (nucleus) truncation of `x [rows, vocab]`: dropped entries become -inf. Top-p keeps the
  smallest set of most likely tokens whose probability reaches `top_p` (ties at the threshold are all kept)."""
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p < 1.0:
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= threshold, x, -jnp.inf)
  return x


def without_fsdp(rules: LogicalRules = DEFAULT_RULES) -> LogicalRules:
  """Rules for sampling with parameters sharded only over `tensor` (replicated over `data` and `fsdp`, so decoding
  never all-gathers weights); rows stay sharded over the data axes."""
  def drop(name, axes):
    if name == "batch":
      return axes
    axes = (axes,) if isinstance(axes, str) else axes or ()
    kept = tuple(a for a in axes if a != "fsdp")
    return kept[0] if len(kept) == 1 else kept or None
  return tuple((name, drop(name, axes)) for name, axes in rules)


def _reshard_params(state: nnx.State, rules: LogicalRules) -> nnx.State:
  """Constrains every parameter to its layout under `rules` (inside jit: XLA moves the weights once per call)."""
  mesh = jax.sharding.get_abstract_mesh()

  def one(v: nnx.Variable):
    spec = logical_to_spec(v.get_metadata()["logical_axes"], v.shape, mesh, rules)
    return v.replace(jax.lax.with_sharding_constraint(v[...], spec))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "rules", "reshard"))
def _generate(graphdef: nnx.GraphDef, cfg: SamplingConfig, rules: LogicalRules, reshard: bool, state: nnx.State,
              tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, row_keys: jax.Array) -> Samples:
  if reshard:
    state = _reshard_params(state, rules)
  # scanned layers decode as a list: their slices of the stacked params are taken once here, not at every step
  # (XLA:CPU re-slices loop-invariant weights inside the while loop: 2x slower decoding)
  model = convert_layers(nnx.merge(graphdef, state), False)
  mcfg = model.cfg
  b, width = tokens.shape
  rows, max_new = b * cfg.n, cfg.max_new_tokens
  cache_axes = KVCache.logical_axes(mcfg)
  constrain_cache = lambda c: jax.tree.map(constrain, c, cache_axes, is_leaf=lambda x: isinstance(x, jax.Array))

  cache = constrain_cache(KVCache.init(mcfg, b, width + max_new, cfg.cache_dtype))
  logits, cache = model(tokens, positions, segment_ids, cache)  # prefill: once per prompt
  # each prompt's cache and last logits go to its n sample rows
  cache = constrain_cache(jax.tree.map(lambda x: jnp.repeat(x, cfg.n, axis=0), cache))
  last_logits = constrain(jnp.repeat(logits[:, -1], cfg.n, axis=0), ("batch", "act_vocab"))
  next_pos = jnp.repeat(positions[:, -1] + 1, cfg.n, axis=0)
  stops = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

  def cond(carry):
    step, done = carry[0], carry[2]
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, logits, done, pos, cache, (thinking, thought, k), out = carry
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    banned = None
    if cfg.think_budget is not None:
      # a think block closes once: outside it the close token is not sampled (after a forced close, a model never
      # trained on cut-off thoughts would otherwise close the block again before answering)
      banned = (jnp.arange(logits.shape[-1]) == cfg.think_close_id)[None, :] & ~thinking[:, None]
    token, lp, model_lp = choose_tokens(logits, step_keys, cfg, banned)
    live = ~done
    forced = jnp.zeros_like(live)
    if cfg.think_budget is not None:
      close = cfg.think_close_id
      # row r forces `sequence[k[r]]` while k[r] < len(sequence): the close token, then the suffix
      sequence = jnp.asarray((close,) + cfg.think_budget_suffix, jnp.int32)
      k = jnp.where(live & thinking & (thought >= cfg.think_budget), 0, k)
      forced = live & (k < sequence.shape[0])
      token = jnp.where(forced, sequence[jnp.minimum(k, sequence.shape[0] - 1)], token)
      k = jnp.where(forced, k + 1, k)
      lp = jnp.where(forced, 0.0, lp)
      full_lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None], -1)[:, 0]
      model_lp = jnp.where(forced, full_lp, model_lp)
      opened = token == cfg.think_open_id
      thought = jnp.where(opened, 0, thought + thinking.astype(jnp.int32))
      thinking = (thinking | opened) & (token != close)
    token = jnp.where(live, token, cfg.pad_id)
    out = dict(tokens=out["tokens"].at[:, step].set(token),
               logprobs=out["logprobs"].at[:, step].set(jnp.where(live, lp, 0.0)),
               model_logprobs=out["model_logprobs"].at[:, step].set(jnp.where(live, model_lp, 0.0)),
               mask=out["mask"].at[:, step].set(live.astype(jnp.float32)),
               forced=out["forced"].at[:, step].set(forced.astype(jnp.float32)))
    done = done | jnp.isin(token, stops)
    logits, cache = model(token[:, None], pos[:, None], jnp.ones((rows, 1), jnp.int32), cache)
    return (step + 1, constrain(logits[:, -1], ("batch", "act_vocab")), done, pos + 1, constrain_cache(cache),
            (thinking, thought, k), out)

  out = dict(tokens=jnp.full((rows, max_new), cfg.pad_id, jnp.int32),
             logprobs=jnp.zeros((rows, max_new), jnp.float32),
             model_logprobs=jnp.zeros((rows, max_new), jnp.float32),
             mask=jnp.zeros((rows, max_new), jnp.float32), forced=jnp.zeros((rows, max_new), jnp.float32))
  out = jax.tree.map(lambda x: constrain(x, ("batch", None)), out)
  thinking = jnp.repeat(tokens[:, -1] == cfg.think_open_id, cfg.n, axis=0)  # the prompt opened the think block
  carry = (jnp.int32(0), last_logits, jnp.zeros((rows,), bool), next_pos, cache,
           (thinking, jnp.zeros((rows,), jnp.int32), jnp.full((rows,), 1 + len(cfg.think_budget_suffix), jnp.int32)),
           out)
  out = jax.lax.while_loop(cond, body, carry)[-1]
  return Samples(**out, lengths=out["mask"].sum(-1).astype(jnp.int32))


def sample(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, seed: int | jax.Array = 0,
           mesh: jax.sharding.Mesh | None = None, rules: LogicalRules = DEFAULT_RULES,
           sampler_rules: LogicalRules | None = None) -> Samples:
  """`cfg.n` completions of each prompt (token lists, ragged). With a `mesh`, rows are sharded over its data axes
  and the model's params are used in the sharding they already have (laid out by `rules`); with `sampler_rules`
  (e.g. `without_fsdp(rules)`) the params are resharded to those rules inside the jitted call, once per call, and
  the sampler's activations follow them. `seed` is an int or a `jax.random` key.

  On several processes (with a `mesh`) `prompts` are this process's own: every process passes as many, the
  process's rows of the global batch of prompts (`sharding.process_rows`), and the result is global arrays of which
  each process reads its own rows (`Samples.local`, `completions`). Row `r` of the global batch draws with
  `fold_in(key(seed), r)` however the rows are split over processes, so 1 and N processes sample alike."""
  if not prompts:
    raise ConfigError("sample() needs at least one prompt")
  longest = max(len(p) for p in prompts)
  if mesh is not None and jax.process_count() > 1 and len(cfg.prompt_buckets) > 1:
    longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))  # one bucket on every process
  width = prompt_bucket(longest, cfg.prompt_buckets)
  batch = left_pad(prompts, width, cfg.pad_id)
  base = jax.random.key(seed) if isinstance(seed, int) else seed
  graphdef, state = nnx.split(model)
  if mesh is None:
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(len(prompts) * cfg.n))
    return _generate(graphdef, cfg, tuple(rules), False, state,
                     *(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")), row_keys)
  reshard = sampler_rules is not None
  rules = tuple(sampler_rules) if reshard else tuple(rules)
  dp, total = data_parallel_size(mesh, rules), len(prompts) * jax.process_count()
  if total % dp:
    raise ConfigError(f"{total} prompts do not split over the {dp} data-parallel shards of mesh "
                      f"{dict(mesh.shape)}; pass a multiple of {dp} prompts")
  mine = process_rows(total, mesh, rules)
  if mine.stop - mine.start != len(prompts):
    raise ConfigError(f"this process passed {len(prompts)} prompts but holds rows {mine.start}..{mine.stop - 1} of "
                      f"the {total}: every process passes its own rows of the global batch")
  first = mine.start * cfg.n
  keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(first, first + len(prompts) * cfg.n))
  with use_mesh(mesh, rules):
    arrays = global_batch_from_process_local({**{k: batch[k] for k in ("tokens", "positions", "segment_ids")},
                                              "keys": np.asarray(jax.random.key_data(keys))}, mesh, rules)
    row_keys = jax.random.wrap_key_data(arrays.pop("keys"), impl=jax.random.key_impl(base))
    return _generate(graphdef, cfg, rules, reshard, state, arrays["tokens"], arrays["positions"],
                     arrays["segment_ids"], row_keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def _greedy_uncached(graphdef: nnx.GraphDef, new_tokens: int, state: nnx.State, prompts: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  b, p = prompts.shape
  seq = jnp.zeros((b, p + new_tokens), jnp.int32).at[:, :p].set(prompts)

  def step(t, seq):
    logits, _ = model(seq)  # causal: the padding after position p + t - 1 does not change its logits
    return seq.at[:, p + t].set(jnp.argmax(logits[:, p + t - 1], -1).astype(jnp.int32))

  return jax.lax.fori_loop(0, new_tokens, step, seq)[:, p:]


def greedy_uncached(model: Transformer, prompts: jax.Array, new_tokens: int) -> jax.Array:
  """The reference decoder: greedy, with a full forward over the whole fixed-size sequence at every step and no
  cache. `prompts [batch, prompt_len]` (all the same length) -> `[batch, new_tokens]`; compiled once per shape."""
  graphdef, state = nnx.split(model)
  return _greedy_uncached(graphdef, new_tokens, state, jnp.asarray(prompts, jnp.int32))


def completion_rows(prompts: Sequence[Sequence[int]], samples: Samples, n: int, pad_id: int = 0,
                    width: int | None = None) -> dict[str, np.ndarray]:
  """Prompt + completion of every sample row, for teacher-forced scoring, all `[rows, width + max_new - 1]` (the
  model's inputs): `tokens`, `positions`, `segment_ids`, `targets`, and `completion_mask`, 1 where the target is a
  generated token. Every prompt is right-aligned to end at column `width - 1` (default width: the longest prompt;
  give a fixed one to keep shapes fixed), so column `width - 1 + j` predicts completion token `j`."""
  tokens = np.asarray(samples.tokens)
  rows, max_new = tokens.shape
  width = width or max(len(p) for p in prompts)
  full = left_pad([list(prompts[r // n]) + tokens[r].tolist() for r in range(rows)], width + max_new, pad_id)
  mask = np.zeros((rows, width + max_new - 1), np.float32)
  mask[:, width - 1:] = np.asarray(samples.mask)
  return dict(tokens=full["tokens"][:, :-1], positions=full["positions"][:, :-1],
              segment_ids=full["segment_ids"][:, :-1], targets=full["tokens"][:, 1:], completion_mask=mask)


def sequence_log_probs(model: Transformer, prompts: Sequence[Sequence[int]], samples: Samples, n: int) -> jax.Array:
  """Teacher-forced float32 log-probs of the sampled tokens (`[rows, max_new]`, 0 where masked): one full forward
  over prompt + completion per row, no cache. The reference the sampler's `model_logprobs` must equal."""
  rows = completion_rows(prompts, samples, n)
  logits, _ = model(*(jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids")))
  max_new = samples.tokens.shape[1]
  picked = token_log_probs(logits[:, -max_new:], jnp.asarray(rows["targets"][:, -max_new:]))
  chex.assert_shape(picked, (samples.tokens.shape[0], max_new))
  return picked * samples.mask
