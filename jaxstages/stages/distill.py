"""Distillation divergences between a student and a teacher sharing one vocabulary.

All take logits `[batch, seq, vocab]`, do their math in float32 and return a per-token divergence `[batch, seq]`; the
caller masks and averages, as with every other loss here. With p = softmax(teacher / T) and q = softmax(student / T):

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
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.config import ConfigError, check_keys, from_config
from jaxstages.losses import token_log_probs

if TYPE_CHECKING:
  from jaxstages.stages import Objective


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


# -- the stage ------------------------------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl")
OFF_POLICY = ("dataset", "teacher")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The `distill` block of a `kind="distill"` stage.

  Off-policy on the **dataset** (`off_policy="dataset"`, `on_policy_fraction=0`, a packed data pipeline): the
  teacher's distribution at every trained position of the data. With sampling (an `rl` pipeline of prompts): each
  step draws completions from the student with probability `on_policy_fraction` (GKD's λ; 1 is fully on-policy)
  and otherwise from the **teacher** (`off_policy="teacher"`: sequence-level KD, the teacher's own outputs), and
  the divergence is taken at every completion position. `sampled_reverse_kl` is the on-policy policy-gradient
  form: the per-token advantage log p_teacher(x) − log q_student(x) of the student's sampled tokens weights
  −log q(x) (λ must be 1).
  """

  teacher: str = ""  # a stage folder, a params folder, or hf:FOLDER; must share the student's tokenizer
  divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | sampled_reverse_kl
  beta: float = 0.5  # jsd's β (TRL convention: 0 = forward KL, 1 = reverse KL)
  temperature: float = 1.0  # of both distributions in the divergence
  top_k: int = 0  # > 0: the teacher as its top-k log-probs + one tail bucket (forward_kl only)
  on_policy_fraction: float = 0.0  # GKD's λ
  off_policy: str = "dataset"  # dataset | teacher
  max_new_tokens: int = 128  # sampled completions
  sample_temperature: float = 1.0
  seed: int = 0

  def __post_init__(self):
    check_keys([self.divergence], DIVERGENCES, "distill.divergence")
    check_keys([self.off_policy], OFF_POLICY, "distill.off_policy")
    if not self.teacher:
      raise ConfigError("distill.teacher is required: a stage folder, a params folder or hf:FOLDER")
    if not 0.0 <= self.on_policy_fraction <= 1.0 or not 0.0 <= self.beta <= 1.0 or self.temperature <= 0:
      raise ConfigError("need 0 <= distill.on_policy_fraction <= 1, 0 <= distill.beta <= 1, distill.temperature > 0")
    if self.top_k and self.divergence != "forward_kl":
      raise ConfigError("distill.top_k keeps only the teacher's top-k log-probs, which determines forward KL only; "
                        f"{self.divergence!r} needs the full teacher distribution (set top_k=0)")
    if self.divergence == "sampled_reverse_kl" and self.on_policy_fraction != 1.0:
      raise ConfigError("divergence 'sampled_reverse_kl' is a policy gradient on the student's own samples: "
                        "set distill.on_policy_fraction=1")
    if self.on_policy_fraction > 0 and self.off_policy == "dataset" and self.on_policy_fraction < 1:
      raise ConfigError("mixing student samples with dataset sequences needs prompts and completions in one "
                        "pipeline; use off_policy='teacher' (teacher-generated sequences) with an rl pipeline")

  @property
  def samples(self) -> bool:
    """Whether the stage generates its sequences (from prompts) rather than reading them."""
    return self.on_policy_fraction > 0 or self.off_policy == "teacher"


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, where: str) -> None:
  """Raises `ConfigError` naming the first differing token unless both tokenizers map ids to the same pieces."""
  a, b = student_tokenizer.vocab_size, teacher_tokenizer.vocab_size
  if a != b:
    raise ConfigError(f"{where}: the teacher's tokenizer has {b} tokens, the student's {a}: distillation compares "
                      "token i of one with token i of the other, so they must share one tokenizer")
  for i in range(a):
    if student_tokenizer.id_to_token(i) != teacher_tokenizer.id_to_token(i):
      raise ConfigError(f"{where}: token {i} is {teacher_tokenizer.id_to_token(i)!r} for the teacher but "
                        f"{student_tokenizer.id_to_token(i)!r} for the student: they must share one tokenizer")


def distill_loss_fn(cfg: DistillConfig):
  """Pure loss over packed-style rows (`tokens`, `targets`, `loss_mask`, `positions`, `segment_ids`, each
  `[batch, seq]`) with the teacher's outputs added by `prepare` (`teacher_outputs`): (sum of the per-token divergence
  over `loss_mask`, trained tokens, {nll: the student's NLL of the row's tokens})."""

  def loss(model: nnx.Module, batch):
    logits, _ = model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    token_lp = token_log_probs(logits, batch["targets"])
    if cfg.divergence == "sampled_reverse_kl":
      advantage = sampled_token_reverse_kl_advantage(token_lp, batch["teacher_token_logprobs"])
      per_token = -advantage * token_lp  # its gradient is the policy gradient of −KL(q‖p)
      extra = {"reverse_kl_estimate": jnp.sum(-advantage * mask)}
    elif cfg.top_k:
      per_token = truncated_forward_kl(logits, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                       cfg.temperature)
      extra = {}
    else:
      divergence = {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
                    "jsd": functools.partial(generalized_jsd, beta=cfg.beta)}[cfg.divergence]
      per_token = divergence(logits, batch["teacher_logits"], temperature=cfg.temperature)
      extra = {}
    nll = jnp.sum(jnp.where(mask != 0, -token_lp * mask, 0.0))
    return jnp.sum(jnp.where(mask != 0, per_token * mask, 0.0)), jnp.sum(mask), {"nll": nll, **extra}

  return loss


def teacher_outputs(cfg: DistillConfig):
  """`(teacher, batch) -> {...}`: what the loss needs from the teacher on the batch's `[batch, seq]` rows:
  `teacher_logits [batch, seq, vocab]` (float32); with `top_k`, `teacher_topk_ids [batch, seq, k]` and
  `teacher_topk_logprobs [batch, seq, k + 1]` (the last entry the tail); for `sampled_reverse_kl`,
  `teacher_token_logprobs [batch, seq]` of the row's own next tokens."""

  def fn(teacher: nnx.Module, batch):
    logits, _ = teacher(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    if cfg.divergence == "sampled_reverse_kl":
      return {"teacher_token_logprobs": token_log_probs(logits, batch["targets"])}
    if cfg.top_k:
      ids, lps = topk_tail_log_probs(logits, cfg.top_k, cfg.temperature)
      return {"teacher_topk_ids": ids, "teacher_topk_logprobs": lps}
    return {"teacher_logits": logits.astype(jnp.float32)}

  return fn


def distill_objective(ctx, block) -> Objective:
  """Strong-to-weak distillation as a stage: the teacher (frozen, loaded once) scores every batch before the step;
  with sampling, the batch is first generated from the prompts by the student or the teacher. The held-out loss is
  the student's data NLL, comparable with any LM or SFT stage; the teacher's forwards and the sampling count in the
  stage's FLOPs."""
  from jaxstages.data.tokenizer import load_tokenizer
  from jaxstages.sampling import SamplingConfig, completion_rows, sample, stop_ids, unpad_prompts
  from jaxstages.sharding import gather_to_host, shard_batch
  from jaxstages.stages import PACKED, Objective  # noqa: F811
  from jaxstages.stages.lm import lm_loss
  from jaxstages.train import load_model, make_apply

  cfg = from_config(DistillConfig, block, where="distill config")
  teacher = load_model(cfg.teacher, ctx.mesh, ctx.rules)
  check_same_vocab(ctx.model_cfg.vocab_size, teacher.cfg.vocab_size)
  teacher_tokenizer = Path(cfg.teacher) / "tokenizer"
  if not cfg.teacher.startswith("hf:") and teacher_tokenizer.exists():
    check_same_tokenizer(ctx.tokenizer, load_tokenizer(teacher_tokenizer), f"distill.teacher {cfg.teacher}")
  teacher_graphdef, teacher_params = nnx.split(teacher)
  teacher_fn = make_apply(teacher_graphdef, teacher_outputs(cfg), ctx.mesh,
                          jax.tree.map(lambda x: x.sharding, teacher_params), ctx.rules, out_batch_sharded=True)
  tok = ctx.tokenizer
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                            stop_tokens=stop_ids(tok, chat=ctx.data.prompt == "chat"), pad_id=tok.pad_id)
  d = ctx.data

  def generate(state, batch, step: int) -> dict:
    """Rows of prompt + completion, sampled by the student (probability λ, from the step's seed) or the teacher."""
    on_policy = np.random.default_rng([cfg.seed, step, 0x6B64]).random() < cfg.on_policy_fraction
    host = gather_to_host({k: batch[k] for k in ("prompt_tokens", "prompt_mask")})
    prompts = unpad_prompts(host["prompt_tokens"], host["prompt_mask"])
    model = nnx.merge(ctx.graphdef, state.params) if on_policy else teacher
    samples = sample(model, prompts, sampling, int(np.random.default_rng([cfg.seed, step]).integers(2**31)),
                     ctx.mesh, ctx.rules)
    rows = completion_rows(prompts, samples, 1, tok.pad_id, width=host["prompt_tokens"].shape[1])
    rows["loss_mask"] = rows.pop("completion_mask")
    rows["on_policy"] = np.full((len(prompts),), float(on_policy), np.float32)
    return shard_batch(rows, ctx.mesh, ctx.rules)

  def prepare(state, batch, step: int, next_batch=None):
    if cfg.samples:
      batch = generate(state, batch, step)
    return {**batch, **teacher_fn(teacher_params, batch)}

  plan = planned_distill_flops(ctx.model_cfg, teacher.cfg, d, cfg)
  return Objective(loss=distill_loss_fn(cfg), data_kinds=("rl",) if cfg.samples else PACKED, prepare=prepare,
                   eval_loss=lm_loss, **plan)


def planned_distill_flops(student_cfg, teacher_cfg, data, cfg: DistillConfig) -> dict:
  """A distillation step's tokens and FLOPs: the student's training pass and the teacher's forward over every
  token, and with sampling the generation (λ of it by the student, the rest by the teacher; every row to the token
  limit, an upper bound)."""
  from jaxstages.flops import forward_flops_per_token, train_flops_per_token

  if cfg.samples:
    seq = data.prompt_len + cfg.max_new_tokens - 1
    tokens = data.batch_size * seq
    sampled = data.batch_size * cfg.max_new_tokens
    sampler_flops = (cfg.on_policy_fraction * forward_flops_per_token(student_cfg, seq)
                     + (1 - cfg.on_policy_fraction) * forward_flops_per_token(teacher_cfg, seq)) * sampled
  else:
    seq, tokens, sampler_flops = data.seq_len, data.batch_size * data.seq_len, 0.0
  flops = (train_flops_per_token(student_cfg, seq) + forward_flops_per_token(teacher_cfg, seq)) * tokens
  return {"tokens_per_step": tokens, "flops_per_step": flops + sampler_flops}
