"""Strong-to-weak distillation as a stage: a frozen teacher's next-token distributions as the target of a student that
shares its tokenizer, off-policy on the dataset or the teacher's own samples, or on-policy on the student's (GKD).
The divergences themselves (`forward_kl`, `reverse_kl`, `generalized_jsd`, the top-k `truncated_forward_kl`, the
sampled-token advantage) are loss building blocks of `jaxstages.losses`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.apply import make_apply
from jaxstages.config import ConfigError, check_keys, from_config
from jaxstages.data.pipeline import PACKED_KINDS
from jaxstages.data.tokenizer import load_tokenizer
from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import (check_same_vocab, chunked_logits_map, forward_kl, generalized_jsd, reverse_kl,
                              sampled_token_reverse_kl_advantage, token_log_probs, topk_tail_log_probs,
                              truncated_forward_kl)
from jaxstages.model.io import load_model
from jaxstages.sampling import SamplingConfig, completion_rows, sample, stop_ids, unpad_prompts
from jaxstages.sharding import global_batch_from_process_local, local_rows
from jaxstages.stages.lm import lm_loss
from jaxstages.stages.objective import Objective

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

  def per_token(logits, targets, *teacher):
    """(student log-prob of the target, divergence) of one chunk of positions, from its logits."""
    token_lp = token_log_probs(logits, targets)
    if cfg.divergence == "sampled_reverse_kl":
      return token_lp, jnp.zeros_like(token_lp)  # the divergence is the advantage-weighted log-prob, below
    if cfg.top_k:
      return token_lp, truncated_forward_kl(logits, *teacher, cfg.temperature)
    divergence = {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
                  "jsd": functools.partial(generalized_jsd, beta=cfg.beta)}[cfg.divergence]
    return token_lp, divergence(logits, *teacher, temperature=cfg.temperature)

  def loss(model: nnx.Module, batch):
    hidden, _ = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    teacher = {"sampled_reverse_kl": (), "top_k": (batch.get("teacher_topk_ids"), batch.get("teacher_topk_logprobs")),
               "full": (batch.get("teacher_logits"),)}
    kind = "sampled_reverse_kl" if cfg.divergence == "sampled_reverse_kl" else "top_k" if cfg.top_k else "full"
    # the student's logits in chunks of `logits_chunk` positions (jaxstages.losses.chunked_logits_map)
    token_lp, divergence = chunked_logits_map(per_token, hidden, model.head(), batch["targets"], *teacher[kind],
                                              chunk=model.cfg.logits_chunk)
    extra = {}
    if kind == "sampled_reverse_kl":
      advantage = sampled_token_reverse_kl_advantage(token_lp, batch["teacher_token_logprobs"])
      divergence = -advantage * token_lp  # its gradient is the policy gradient of −KL(q‖p)
      extra = {"reverse_kl_estimate": jnp.sum(-advantage * mask)}
    nll = jnp.sum(jnp.where(mask != 0, -token_lp * mask, 0.0))
    return jnp.sum(jnp.where(mask != 0, divergence * mask, 0.0)), jnp.sum(mask), {"nll": nll, **extra}

  return loss


def teacher_outputs(cfg: DistillConfig):
  """`(teacher, batch) -> {...}`: what the loss needs from the teacher on the batch's `[batch, seq]` rows:
  `teacher_logits [batch, seq, vocab]` (float32); with `top_k`, `teacher_topk_ids [batch, seq, k]` and
  `teacher_topk_logprobs [batch, seq, k + 1]` (the last entry the tail); for `sampled_reverse_kl`,
  `teacher_token_logprobs [batch, seq]` of the row's own next tokens."""

  def fn(teacher: nnx.Module, batch):
    hidden, _ = teacher.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    head, chunk = teacher.head(), teacher.cfg.logits_chunk
    if cfg.divergence == "sampled_reverse_kl":
      return {"teacher_token_logprobs": chunked_logits_map(token_log_probs, hidden, head, batch["targets"],
                                                           chunk=chunk)}
    if cfg.top_k:
      ids, lps = chunked_logits_map(lambda logits: topk_tail_log_probs(logits, cfg.top_k, cfg.temperature), hidden,
                                    head, chunk=chunk)
      return {"teacher_topk_ids": ids, "teacher_topk_logprobs": lps}
    return {"teacher_logits": chunked_logits_map(lambda logits: logits, hidden, head)}

  return fn


def distill_objective(ctx, block) -> Objective:
  """Strong-to-weak distillation as a stage: the teacher (frozen, loaded once) scores every batch before the step;
  with sampling, the batch is first generated from the prompts by the student or the teacher. The held-out loss is
  the student's data NLL, comparable with any LM or SFT stage; the teacher's forwards and the sampling count in the
  stage's FLOPs."""
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
    host = {k: local_rows(batch[k]) for k in ("prompt_tokens", "prompt_mask")}  # this process's prompts
    prompts = unpad_prompts(host["prompt_tokens"], host["prompt_mask"])
    model = nnx.merge(ctx.graphdef, state.params) if on_policy else teacher
    samples = sample(model, prompts, sampling, int(np.random.default_rng([cfg.seed, step]).integers(2**31)),
                     ctx.mesh, ctx.rules).local()
    rows = completion_rows(prompts, samples, 1, tok.pad_id, width=host["prompt_tokens"].shape[1])
    rows["loss_mask"] = rows.pop("completion_mask")
    rows["on_policy"] = np.full((len(prompts),), float(on_policy), np.float32)
    return global_batch_from_process_local(rows, ctx.mesh, ctx.rules)

  def prepare(state, batch, step: int, next_batch=None):
    if cfg.samples:
      batch = generate(state, batch, step)
    return {**batch, **teacher_fn(teacher_params, batch)}

  plan = planned_distill_flops(ctx.model_cfg, teacher.cfg, d, cfg)
  return Objective(loss=distill_loss_fn(cfg), data_kinds=("rl",) if cfg.samples else PACKED_KINDS, prepare=prepare,
                   eval_loss=lm_loss, **plan)


def planned_distill_flops(student_cfg, teacher_cfg, data, cfg: DistillConfig) -> dict:
  """A distillation step's tokens and FLOPs: the student's training pass and the teacher's forward over every
  token, and with sampling the generation (λ of it by the student, the rest by the teacher; every row to the token
  limit, an upper bound)."""
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
