"""Loss building blocks shared by every stage, and every divergence between two models.

**Log-probs from hidden states, in chunks** (`chunked_logits_map`, `model_token_log_probs`): the one path every loss
takes from a model's final hidden states `[batch, seq, embed]` to per-token values. With `ModelConfig.logits_chunk`
set, the float32 logits exist one `[batch, chunk, vocab]` slice at a time, in the forward pass and (recomputed from
the hidden states) in the backward: at Qwen's 151,936-token vocabulary, 8 x 4,096 positions of full logits would be
20 GB. Loss and gradient equal the unchunked ones (`tests/test_losses_chunked.py`).

Losses return a `(sum, count)` pair rather than a mean: the caller divides by the *global* count of the whole batch,
so a batch gives the same loss and gradient however it is split into micro-batches or sharded over devices.

**Divergences between two next-token distributions** (distillation's losses, the KL drift of a policy from its
reference) take logits `[batch, seq, vocab]` of two models sharing one vocabulary, do their math in float32 and
return a per-token divergence `[batch, seq]`; the caller masks and averages. With p = softmax(teacher / T) and
q = softmax(student / T):

- `forward_kl` = KL(p‖q) = Σ p (log p − log q): the classic knowledge-distillation loss (Hinton et al. 2015,
  "Distilling the Knowledge in a Neural Network", arXiv:1503.02531), mass-covering. Hinton et al. multiply it by T²
  to keep gradient scale independent of T; that factor is left to the caller.
- `reverse_kl` = KL(q‖p): mode-seeking (MiniLLM, Gu et al. 2024, arXiv:2306.08543).
- `generalized_jsd`, GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, "On-Policy Distillation of
  Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, Eq. 1), in TRL's
  `GKDTrainer.generalized_jsd_loss` convention: with the mixture m = β p + (1 − β) q,
    JSD_β = β KL(p‖m) + (1 − β) KL(q‖m),
  and at the end points, taken as explicit cases, β = 0 -> forward KL(p‖q) and β = 1 -> reverse KL(q‖p).
  The interpolated formula itself tends to 0 at both ends (m collapses onto q or p); what it approaches is the end
  point's KL scaled down: JSD_β / β -> KL(p‖q) as β -> 0 and JSD_β / (1 − β) -> KL(q‖p) as β -> 1. The explicit
  cases therefore match its direction, not its value, and also avoid the 0·log 0 terms of a degenerate mixture.
- `truncated_forward_kl`: forward KL against a teacher stored as its top-k log-probabilities plus one tail bucket
  holding the remaining mass log(1 − Σ top-k p) (`topk_tail_log_probs`), so teacher logits can be cached at
  k + 1 numbers per token. The student is aggregated to the same k + 1 buckets (its log-probs at the teacher's
  indices, and the log of its remaining mass), so this is an exact KL between two distributions on k + 1 outcomes:
  never negative and, by the data-processing inequality, never above the full forward KL; at k >= vocab − 1 it is
  the full forward KL.
- `sampled_token_reverse_kl_advantage`: for a token sampled from the student, log p(x) − log q(x) is minus a
  one-sample estimate of the per-token reverse KL; on-policy distillation uses it as a per-token advantage in a
  policy-gradient update (Agarwal et al. 2024; Thinking Machines Lab 2025, "On-Policy Distillation" blog post).

**KL estimators from sampled tokens** (`KL_ESTIMATORS`, RL's KL to a reference): `(logp, ref_logp) -> [rows, T]`
per-token estimates of KL(π‖π_ref) from the log-probs of tokens sampled from π.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstages.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, constrain, param_shardings, use_mesh

Batch = Mapping[str, jax.Array]


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, float32. logits `[batch, seq, vocab]`, targets `[batch, seq]` -> `[batch, seq]`."""
  chex.assert_equal_shape_prefix([logits, targets], 2)
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def logits_of(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """`[batch, seq, embed] @ [embed, vocab]` -> float32 `[batch, seq, vocab]` (one 2-D matmul over the flattened
  tokens, as `jaxstages.model.transformer.dense` does, for XLA:CPU's weight gradient)."""
  b, t, e = hidden.shape
  logits = jnp.dot(hidden.reshape(b * t, e), head.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return constrain(logits.reshape(b, t, -1), ("batch", "seq", "act_vocab"))


def chunked_logits_map(fn: Callable[..., object], hidden: jax.Array, head: jax.Array, *per_token: jax.Array,
                       chunk: int = 0):
  """`fn(logits, *per_token)` computed `chunk` positions at a time, without ever holding all the logits.

  hidden `[batch, seq, embed]` (compute dtype), head `[embed, vocab]`; each of `per_token` is `[batch, seq, ...]`;
  `fn(logits [batch, c, vocab] float32, *slices [batch, c, ...])` returns a tree of `[batch, c, ...]` arrays, and the
  result is that tree over the whole `[batch, seq, ...]`. `chunk` 0 (or >= seq) is one chunk. Chunks run in a
  `lax.map` whose body is rematerialised, so the backward pass recomputes each chunk's logits from its hidden states
  instead of storing them: the loss and gradient are the unchunked ones, with one chunk's logits live at a time. The
  sequence is padded to a multiple of `chunk` (the padding's outputs are dropped); the batch axis stays whole, so a
  batch-sharded input stays sharded."""
  b, t, _ = hidden.shape
  if not chunk or chunk >= t:
    return fn(logits_of(hidden, head), *per_token)
  n = -(-t // chunk)

  def split(x):  # [b, t, ...] -> [n, b, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  def merge(y):  # [n, b, chunk, ...] -> [b, t, ...]
    return jnp.moveaxis(y, 0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :t]

  body = jax.checkpoint(lambda h, *xs: fn(logits_of(h, head), *xs), prevent_cse=False)
  out = jax.lax.map(lambda xs: body(*xs), (split(hidden), *map(split, per_token)))
  return jax.tree.map(merge, out)


def entropy(logits: jax.Array) -> jax.Array:
  """Per-position entropy of softmax(logits), float32. `[batch, seq, vocab]` -> `[batch, seq]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_log_probs_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p(target), entropy) per position, float32, from one log-sum-exp over the vocabulary.
  logits `[batch, seq, vocab]`, targets `[batch, seq]` -> two `[batch, seq]`."""
  chex.assert_equal_shape_prefix([logits, targets], 2)
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  probs = jnp.exp(logits - lse[..., None])
  return picked - lse, lse - jnp.sum(probs * logits, axis=-1)


def hidden_token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 0,
                           temperature: float = 1.0, with_entropy: bool = False):
  """log p(target) per position under softmax(logits / temperature), float32, in chunks (`chunked_logits_map`).
  hidden `[batch, seq, embed]`, head `[embed, vocab]`, targets `[batch, seq]` -> `[batch, seq]`; with
  `with_entropy`, `(log-probs, entropy)`, both `[batch, seq]`, from the same chunk of logits (the RL losses: the
  entropy of the tempered policy, only when it is used or logged)."""
  scale = lambda logits: logits if temperature == 1.0 else logits / temperature
  per_chunk = token_log_probs_and_entropy if with_entropy else token_log_probs
  return chunked_logits_map(lambda logits, y: per_chunk(scale(logits), y), hidden, head, targets, chunk=chunk)


def model_token_log_probs(model: nnx.Module, tokens: jax.Array, targets: jax.Array, positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
  """A `Transformer`'s float32 log p(target) `[batch, seq]` for `tokens` `[batch, seq]`, in chunks of its
  `cfg.logits_chunk` positions."""
  hidden, _ = model.hidden_states(tokens, positions, segment_ids)
  return hidden_token_log_probs(hidden, model.head(), targets, model.cfg.logits_chunk, temperature)


def next_token_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over positions where `loss_mask` is 1, and their count.

  batch: `tokens`, `targets`, `loss_mask` `[batch, seq]`; optional `positions`, `segment_ids` `[batch, seq]`.
  """
  lp = model_token_log_probs(model, batch["tokens"], batch["targets"], batch.get("positions"),
                             batch.get("segment_ids"))
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(-lp * mask), jnp.sum(mask)


LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]


def make_loss_and_grad(model: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                       loss_fn: LossFn = next_token_loss):
  """A jitted `(params, batch) -> (loss, grads, grad_norm)` with explicit shardings: params and grads laid out by the
  rules, the batch sharded over the data axes, the loss the global-count-normalised mean."""
  graphdef, params = nnx.split(model)
  p_shard = param_shardings(params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def loss_and_grad(params: nnx.State, batch: Batch):
    def mean_loss(params):
      total, count = loss_fn(nnx.merge(graphdef, params), batch)
      return total / jnp.maximum(count, 1.0)

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return loss, grads, optax.global_norm(grads)

  def batch_shardings(batch):
    return {k: batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}

  compiled = {}

  def call(params: nnx.State, batch: Batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in compiled:
      compiled[key] = jax.jit(loss_and_grad, in_shardings=(p_shard, batch_shardings(batch)),
                              out_shardings=(replicated, p_shard, replicated))
    with use_mesh(mesh, rules):
      return compiled[key](params, batch)

  return call


# -- divergences between two next-token distributions -----------------------------------------------------------------


def check_same_vocab(student_vocab_size: int, teacher_vocab_size: int) -> None:
  """Raises `ValueError` unless student and teacher share one vocabulary size (the divergences compare token i of one
  with token i of the other)."""
  if student_vocab_size != teacher_vocab_size:
    raise ValueError(f"student vocab size {student_vocab_size} != teacher vocab size {teacher_vocab_size}: logit "
                     "distillation needs one shared tokenizer (pad the smaller embedding or map tokens first)")


def _log_probs(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _check_pair(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
  chex.assert_rank([student_logits, teacher_logits], 3)
  check_same_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
  chex.assert_equal_shape([student_logits, teacher_logits])


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p‖q) over the last axis from log-probabilities; outcomes with p = 0 contribute 0 (not 0·(−inf) = NaN)."""
  p = jnp.exp(log_p)
  present = p > 0
  # The inner where keeps log p = −inf out of the product, so the gradient stays finite too.
  return jnp.sum(jnp.where(present, p * (jnp.where(present, log_p, 0.0) - log_q), 0.0), axis=-1)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KL(teacher‖student) per token on softmax(logits / T). logits `[batch, seq, vocab]` -> `[batch, seq]`."""
  _check_pair(student_logits, teacher_logits)
  return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KL(student‖teacher) per token on softmax(logits / T). logits `[batch, seq, vocab]` -> `[batch, seq]`."""
  _check_pair(student_logits, teacher_logits)
  return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
  """GKD's JSD_β per token: β KL(teacher‖m) + (1 − β) KL(student‖m), m = β teacher + (1 − β) student; β = 0 is
  KL(teacher‖student), β = 1 is KL(student‖teacher). `beta` is a static float in [0, 1].

  logits `[batch, seq, vocab]` -> `[batch, seq]`.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"generalized_jsd beta must be in [0, 1], got {beta}")
  _check_pair(student_logits, teacher_logits)
  log_t = _log_probs(teacher_logits, temperature)
  log_s = _log_probs(student_logits, temperature)
  if beta == 0.0:
    return _kl(log_t, log_s)
  if beta == 1.0:
    return _kl(log_s, log_t)
  log_m = jnp.logaddexp(jnp.log(beta) + log_t, jnp.log1p(-beta) + log_s)
  return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _tail_log_mass(log_probs: jax.Array, indices: jax.Array) -> jax.Array:
  """log Σ of `log_probs` over the entries NOT in `indices`; −inf where `indices` cover the whole vocabulary.

  log_probs `[batch, seq, vocab]`, indices `[batch, seq, k]` -> `[batch, seq]`.
  """
  # A log-sum-exp over the complement keeps a tiny tail exact; log1p(−Σ top-k p) would cancel to log 0 in float32
  # once the top-k mass rounds to 1.
  inside = jnp.put_along_axis(jnp.zeros(log_probs.shape, bool), indices, True, axis=-1, inplace=False)
  outside = ~inside
  has_tail = jnp.any(outside, axis=-1)
  # Rows with an empty tail get a dummy finite input, so the log-sum-exp of nothing never makes NaN gradients.
  masked = jnp.where(has_tail[..., None], jnp.where(outside, log_probs, -jnp.inf), 0.0)
  return jnp.where(has_tail, jax.nn.logsumexp(masked, axis=-1), -jnp.inf)


def topk_tail_log_probs(teacher_logits: jax.Array, k: int, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The teacher's top-k token ids and their log-probs plus one tail bucket, log(1 − Σ top-k p).

  teacher_logits `[batch, seq, vocab]`, static k in [1, vocab] -> (indices `[batch, seq, k]` int32,
  log-probs `[batch, seq, k + 1]` float32, last entry the tail; −inf when k = vocab).
  """
  chex.assert_rank(teacher_logits, 3)
  vocab = teacher_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"top-k k must be in [1, vocab={vocab}], got {k}")
  log_t = _log_probs(teacher_logits, temperature)
  top, indices = jax.lax.top_k(log_t, k)
  tail = _tail_log_mass(log_t, indices)
  return indices, jnp.concatenate([top, tail[..., None]], axis=-1)


def truncated_forward_kl(student_logits: jax.Array, topk_indices: jax.Array, teacher_topk_tail_logprobs: jax.Array,
                         temperature: float = 1.0) -> jax.Array:
  """KL(teacher buckets‖student buckets) over the teacher's k top tokens plus one tail bucket.

  student_logits `[batch, seq, vocab]`; topk_indices `[batch, seq, k]` and teacher_topk_tail_logprobs
  `[batch, seq, k + 1]` from `topk_tail_log_probs` (same temperature) -> `[batch, seq]`, >= 0.
  """
  chex.assert_rank([student_logits, topk_indices, teacher_topk_tail_logprobs], 3)
  chex.assert_equal_shape_prefix([student_logits, topk_indices, teacher_topk_tail_logprobs], 2)
  k = topk_indices.shape[-1]
  chex.assert_axis_dimension(teacher_topk_tail_logprobs, 2, k + 1)
  if k > student_logits.shape[-1]:
    raise ValueError(f"top-k k={k} exceeds the student vocab size {student_logits.shape[-1]}")
  teacher = teacher_topk_tail_logprobs.astype(jnp.float32)
  # Renormalise so buckets cached in reduced precision still form a distribution, keeping the KL a true KL.
  teacher = teacher - jax.nn.logsumexp(teacher, axis=-1, keepdims=True)
  log_s = _log_probs(student_logits, temperature)
  student = jnp.concatenate([jnp.take_along_axis(log_s, topk_indices, axis=-1),
                             _tail_log_mass(log_s, topk_indices)[..., None]], axis=-1)
  return _kl(teacher, student)


def sampled_token_reverse_kl_advantage(student_token_logprobs: jax.Array,
                                       teacher_token_logprobs: jax.Array) -> jax.Array:
  """Per-token advantage teacher − student log-prob of the sampled tokens, with gradients stopped (an advantage
  weights the policy gradient; it is not itself differentiated). `[batch, seq]` -> `[batch, seq]` float32."""
  chex.assert_equal_shape([student_token_logprobs, teacher_token_logprobs])
  advantage = teacher_token_logprobs.astype(jnp.float32) - student_token_logprobs.astype(jnp.float32)
  return jax.lax.stop_gradient(advantage)


# -- KL estimators ---------------------------------------------------------------------------------------------------
# Schulman's estimators of KL(π‖π_ref) from tokens sampled from π, with Δ = log π_ref − log π:
# k1 = −Δ (unbiased, high variance, can be negative), k2 = Δ²/2, k3 = e^Δ − Δ − 1 (unbiased, ≥ 0, low variance).


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  return logp - ref_logp


def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  delta = ref_logp - logp
  return jnp.exp(delta) - delta - 1.0


def kl_k3_straight_through(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3's value with k2's gradient: k3's own gradient is a biased estimate of ∇KL; k2's is the unbiased one."""
  k2 = kl_k2(logp, ref_logp)
  return k2 + jax.lax.stop_gradient(kl_k3(logp, ref_logp) - k2)


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "k3+": kl_k3_straight_through}
