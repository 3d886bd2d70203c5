"""Preference-optimisation losses on summed sequence log-probabilities.

Every loss compares a preferred ("chosen", c) and a dispreferred ("rejected", r) completion of the same prompt. Inputs
are summed completion log-probabilities `[batch]`: π for the policy, ρ for the frozen reference. With the
reference-adjusted log-ratio difference

  h = (πc − ρc) − (πr − ρr)

the kinds are:

- `sigmoid`, DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7):
  loss = −log σ(β h).
  With `label_smoothing` ε > 0 it becomes conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
  preferences"), which assumes each label is flipped with probability ε:
  loss = −(1 − ε) log σ(β h) − ε log σ(−β h).
  (In TRL 1.16 this smoothed form is the CPO trainer's `label_smoothing`; TRL's DPO `loss_type="robust"` is the
  different loss of `robust` below.)
- `robust`, robust DPO (rDPO; Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
  Feedback", arXiv:2403.00409; TRL's DPO `loss_type="robust"`): with labels flipped with probability ε, the loss
  whose expectation over the flips is the clean-label DPO loss,
  loss = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε);
  ε = `label_smoothing` (0: plain `sigmoid`). cDPO's ε moves the optimum of h to a finite margin; rDPO's keeps
  DPO's target and only de-biases the noisy labels.
- `ipo`, IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  arXiv:2310.12036, Eq. 17, with TRL's parameterisation τ = β): loss = (h − 1/(2β))².
  Length normalisation, as in TRL: when `chosen_len` and `rejected_len` are given, every log-probability (policy
  and reference alike) is divided by its completion length before forming h, i.e.
  h = (πc − ρc)/|yc| − (πr − ρr)/|yr|. Without lengths h uses the summed log-probabilities, as in the paper.
  The squared loss regresses h onto a fixed target, so the mean-per-token form keeps that target's meaning
  independent of response length.
- `hinge`, SLiC-HF style (Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425; as TRL's `hinge`): loss = max(0, 1 − β h).
- `simpo`, SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734): reference-free, rewards are β times the length-averaged policy log-probability and
  γ = `simpo_gamma` is the target reward margin:
  loss = −log σ(β πc/|yc| − β πr/|yr| − γ).
  γ is the absolute margin of the paper (TRL's `CPOTrainer` `simpo_gamma`); the official SimPO code instead takes
  `gamma_beta_ratio` = γ/β. Requires lengths; the reference inputs are ignored. `label_smoothing` applies as for
  `sigmoid` (as in TRL's CPO trainer).

`ipo` and `hinge` are not probabilistic, so label smoothing has no meaning for them and is rejected.

Metrics per pair `[batch]` (the caller masks and averages): `rewards_chosen` = β(πc − ρc), `rewards_rejected` =
β(πr − ρr), computed from the same (length-normalised, for `ipo` with lengths) log-probabilities as the loss; for
`simpo` they are β πc/|yc| and β πr/|yr|. `margin` = chosen − rejected (without γ), `accuracy` = 1 where margin > 0.
"""

from __future__ import annotations

import dataclasses
import difflib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.apply import make_apply
from jaxstages.config import ConfigError, check_keys, from_config
from jaxstages.data import tasks
from jaxstages.evaluation import kl_drift_fn
from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import model_token_log_probs, token_log_probs
from jaxstages.model.io import load_model
from jaxstages.rewards import verify
from jaxstages.sampling import SamplingConfig, sample, stop_ids, unpad_prompts
from jaxstages.sharding import global_batch_from_process_local, local_rows
from jaxstages.stages.objective import Objective

KINDS = ("sigmoid", "robust", "ipo", "hinge", "simpo")
PAIR_SOURCES = ("task", "reference", "policy")
_SMOOTHABLE = ("sigmoid", "robust", "simpo")  # the kinds `label_smoothing` applies to


def sequence_log_probs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed log p(target) over positions where `mask` is nonzero (weighted by it), float32.

  logits `[batch, seq, vocab]`, targets and mask `[batch, seq]` -> `[batch]`.
  """
  chex.assert_rank([logits, targets, mask], [3, 2, 2])
  return masked_sum(token_log_probs(logits, targets), mask)


def masked_sum(lp: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-token log-probs `[batch, seq]` summed over positions where `mask` is nonzero (weighted by it) -> `[batch]`."""
  chex.assert_equal_shape([lp, mask])
  mask = mask.astype(jnp.float32)
  # Masked positions may hold pad/ignore ids whose gathered value is garbage or NaN; select rather than multiply so
  # they cannot poison the sum.
  return jnp.sum(jnp.where(mask != 0, lp * mask, 0.0), axis=-1)


def check_kind(kind: str) -> None:
  """Raises `ValueError` for an unknown preference-loss kind, suggesting the closest valid one."""
  if kind in KINDS:
    return
  close = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.4)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise ValueError(f"unknown preference loss kind {kind!r}{hint}. Valid kinds: {', '.join(KINDS)}")


def _lengths(length: jax.Array, like: jax.Array) -> jax.Array:
  chex.assert_equal_shape([length, like])
  # A padding pair with no completion tokens must stay finite so the caller's mask can drop it.
  return jnp.maximum(jnp.asarray(length, jnp.float32), 1.0)


def preference_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array | None,
                    ref_rejected: jax.Array | None, kind: str, beta: float, label_smoothing: float = 0.0,
                    chosen_len: jax.Array | None = None, rejected_len: jax.Array | None = None,
                    simpo_gamma: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair preference loss and metrics (see the module docstring for each formula).

  policy_*, ref_*: summed completion log-probabilities `[batch]` (ref_* may be None for `simpo`).
  chosen_len, rejected_len: completion token counts `[batch]`; required for `simpo`, switch `ipo` to per-token
  log-probabilities, ignored by `sigmoid` and `hinge`.
  `kind`, `beta`, `label_smoothing` and `simpo_gamma` are static Python values.
  Returns (loss `[batch]`, {rewards_chosen, rewards_rejected, margin, accuracy} each `[batch]`), all float32.
  """
  check_kind(kind)
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if isinstance(label_smoothing, (int, float)):
    if not 0.0 <= label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and kind not in _SMOOTHABLE:
      raise ValueError(f"label_smoothing applies only to kinds {', '.join(_SMOOTHABLE)}, not {kind!r}")
  if (chosen_len is None) != (rejected_len is None):
    raise ValueError("give both chosen_len and rejected_len, or neither")

  chex.assert_rank(policy_chosen, 1)
  chex.assert_equal_shape([policy_chosen, policy_rejected])
  pc = policy_chosen.astype(jnp.float32)
  pr = policy_rejected.astype(jnp.float32)

  if kind == "simpo":
    if chosen_len is None:
      raise ValueError("kind 'simpo' needs chosen_len and rejected_len: its reward is the length-averaged log-prob")
    rewards_chosen = beta * pc / _lengths(chosen_len, pc)
    rewards_rejected = beta * pr / _lengths(rejected_len, pr)
    logits = rewards_chosen - rewards_rejected - simpo_gamma
  else:
    if ref_chosen is None or ref_rejected is None:
      raise ValueError(f"kind {kind!r} needs reference log-probs ref_chosen and ref_rejected")
    chex.assert_equal_shape([policy_chosen, ref_chosen, ref_rejected])
    chosen_ratio = pc - ref_chosen.astype(jnp.float32)
    rejected_ratio = pr - ref_rejected.astype(jnp.float32)
    if kind == "ipo" and chosen_len is not None:
      chosen_ratio = chosen_ratio / _lengths(chosen_len, pc)
      rejected_ratio = rejected_ratio / _lengths(rejected_len, pr)
    rewards_chosen = beta * chosen_ratio
    rewards_rejected = beta * rejected_ratio
    h = chosen_ratio - rejected_ratio
    logits = beta * h

  if kind == "robust":
    loss = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) + label_smoothing * jax.nn.log_sigmoid(-logits))
            / (1.0 - 2.0 * label_smoothing))
  elif kind in _SMOOTHABLE:
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  elif kind == "ipo":
    loss = jnp.square(h - 1.0 / (2.0 * beta))
  else:  # hinge
    loss = jax.nn.relu(1.0 - logits)

  margin = rewards_chosen - rewards_rejected
  metrics = {
      "rewards_chosen": rewards_chosen,
      "rewards_rejected": rewards_rejected,
      "margin": margin,
      "accuracy": (margin > 0).astype(jnp.float32),
  }
  return loss, metrics


# -- the stage ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The `dpo` block of a `kind="dpo"` stage (data: a `preference` pipeline)."""

  loss: str = "sigmoid"  # sigmoid | robust | ipo | hinge | simpo
  beta: float = 0.1
  label_smoothing: float = 0.0  # > 0: conservative DPO (sigmoid, simpo), or robust DPO's flip rate (robust)
  simpo_gamma: float = 0.5
  # RPO (Pang et al. 2024, arXiv:2404.19733; TRL's `rpo_alpha`): + α × the chosen response's per-token NLL, which
  # keeps DPO from lowering the likelihood of the preferred answers (here averaged per pair, then over pairs)
  rpo_alpha: float = 0.0
  reference: str | None = None  # a frozen reference other than the stage's starting params (a stage/params folder)
  # where pairs come from: "task" (the pipeline's gold vs. perturbed solution), or samples scored by the task
  # verifier: "reference" (the frozen reference's: offline, on-policy for the start model) or "policy" (the current
  # params': online DPO). Chosen = a strictly correct sample, rejected = a wrong one; a prompt without one of them
  # keeps the pipeline's side for it.
  pairs: str = "task"
  pair_samples: int = 4  # samples per prompt
  pair_temperature: float = 1.0
  pair_max_new_tokens: int = 64
  drift_prompts: int = 32  # held-out prompts for the KL-drift metric at every evaluation (0: off)
  drift_max_new_tokens: int = 96
  drift_seed: int = 0

  def __post_init__(self):
    check_keys([self.loss], KINDS, "dpo.loss")
    if self.beta <= 0:
      raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
    check_keys([self.pairs], PAIR_SOURCES, "dpo.pairs")
    if not 0.0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.loss not in _SMOOTHABLE):
      raise ConfigError(f"dpo.label_smoothing {self.label_smoothing} must be in [0, 0.5) and applies only to "
                        f"{', '.join(_SMOOTHABLE)}")


def pair_log_probs(model: nnx.Module, batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Summed response log-probs and response lengths of both sides of every pair, in one forward over the
  concatenated `[2 * batch, seq]` sequences: (chosen, rejected, chosen_len, rejected_len), each `[batch]`."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])[:, 1:]
  segments = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])[:, :-1]
  rows, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (rows, t - 1))  # right-padded: 0, 1, 2, ...
  # log-probs from hidden states in chunks of the model's `logits_chunk` positions (jaxstages.losses), never the
  # `[2 * batch, seq, vocab]` logits at once
  lp = model_token_log_probs(model, tokens[:, :-1], tokens[:, 1:], positions, segments)
  logps = masked_sum(lp, mask)
  lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
  half = rows // 2
  return logps[:half], logps[half:], lengths[:half], lengths[half:]


def dpo_loss_fn(cfg: DPOConfig):
  """The stage's pure loss: (sum of per-pair losses over valid pairs, number of valid pairs, metric sums)."""

  def loss(model: nnx.Module, batch):
    chosen, rejected, chosen_len, rejected_len = pair_log_probs(model, batch)
    per_pair, metrics = preference_loss(chosen, rejected, batch.get("ref_chosen"), batch.get("ref_rejected"),
                                        cfg.loss, cfg.beta, cfg.label_smoothing, chosen_len, rejected_len,
                                        cfg.simpo_gamma)
    valid = batch["valid"].astype(jnp.float32)
    sums = {k: jnp.sum(v * valid) for k, v in metrics.items()}
    for k in ("sampled_chosen", "sampled_rejected"):  # shares of pairs whose side came from samples
      if k in batch:
        sums[k] = jnp.sum(batch[k] * valid)
    if cfg.rpo_alpha:
      chosen_nll = -chosen / jnp.maximum(chosen_len, 1.0)
      per_pair = per_pair + cfg.rpo_alpha * chosen_nll
      sums["chosen_nll"] = jnp.sum(chosen_nll * valid)
    sums["logps_chosen"] = jnp.sum(chosen * valid)
    sums["logps_rejected"] = jnp.sum(rejected * valid)
    return jnp.sum(per_pair * valid), jnp.sum(valid), sums

  return loss


def sampled_pairs(model: nnx.Module, batch, cfg: DPOConfig, data_cfg, tokenizer, seed: int, mesh, rules) -> dict:
  """The batch with each pair's sides replaced, where the samples allow, by `cfg.pair_samples` completions of its
  prompt from `model`, scored by the task verifier: chosen = the first strictly correct one, rejected = the first
  wrong one. Adds `sampled_chosen` / `sampled_rejected` `[batch]` (1 where that side is a sample). Host-side
  (the verifier parses text): each process samples, verifies and rewrites its own rows of the global batch."""
  host = {k: local_rows(v) for k, v in batch.items()}
  prompts = unpad_prompts(host["prompt_tokens"], host["prompt_mask"])
  stops = stop_ids(tokenizer)
  g = cfg.pair_samples
  out = sample(model, prompts, SamplingConfig(max_new_tokens=cfg.pair_max_new_tokens, temperature=cfg.pair_temperature,
                                              n=g, stop_tokens=stops, pad_id=tokenizer.pad_id), seed, mesh, rules)
  completions = out.completions()  # this process's rows
  seq_len = host["chosen_tokens"].shape[1]
  flags = {"sampled_chosen": np.zeros(len(prompts), np.float32), "sampled_rejected": np.zeros(len(prompts), np.float32)}
  for i, prompt in enumerate(prompts):
    if not host["valid"][i]:
      continue
    src = data_cfg.source_configs[int(host["source"][i])]
    problem = tasks.generate(src.task, src.seed, data_cfg.split, int(host["index"][i]))
    picks = {}
    for c in completions[i * g:(i + 1) * g]:
      text = tokenizer.decode(c[:-1] if c and c[-1] in stops else c)
      side = "chosen" if verify(problem, text).strict_correct else "rejected"
      if side not in picks and len(prompt) + len(c) <= seq_len:
        picks[side] = c
    for side, c in picks.items():
      row = prompt + c
      tokens, segments = np.full(seq_len, tokenizer.pad_id, np.int32), np.zeros(seq_len, np.int32)
      tokens[:len(row)], segments[:len(row)] = row, 1
      mask = np.zeros(seq_len, np.int32)
      mask[len(prompt):len(row)] = 1
      host[f"{side}_tokens"][i], host[f"{side}_segment_ids"][i], host[f"{side}_mask"][i] = tokens, segments, mask
      flags[f"sampled_{side}"][i] = 1.0
  return global_batch_from_process_local({**host, **flags}, mesh, rules)


def dpo_objective(ctx, block) -> Objective:
  """DPO and its variants as a stage: reference log-probs from a frozen copy of the starting params (or
  `dpo.reference`) added to every batch before the step; the KL of the policy from the reference on held-out
  prompts, sum over the completion of the exact per-token KL(π‖π_ref) along samples from π (a Rao-Blackwellised,
  lower-variance estimate of the sequence KL), at every evaluation."""
  cfg = from_config(DPOConfig, block, where="dpo config")
  if cfg.reference:
    ref_model = load_model(cfg.reference, ctx.mesh, ctx.rules)
    if ref_model.cfg.vocab_size != ctx.model_cfg.vocab_size:
      raise ConfigError(f"dpo.reference {cfg.reference} has vocab size {ref_model.cfg.vocab_size}, the policy "
                        f"{ctx.model_cfg.vocab_size}")
    ref_graphdef, ref_params = nnx.split(ref_model)
  else:
    ref_graphdef, ref_params = ctx.graphdef, jax.tree.map(lambda x: x.copy(), ctx.initial_params)
  ref_sharding = jax.tree.map(lambda x: x.sharding, ref_params)
  needs_ref = cfg.loss != "simpo"

  ref_fn = make_apply(ref_graphdef, lambda m, b: dict(zip(("ref_chosen", "ref_rejected"), pair_log_probs(m, b)[:2])),
                      ctx.mesh, ref_sharding, ctx.rules, out_batch_sharded=True)

  def add_reference(batch):
    return {**batch, **ref_fn(ref_params, batch)}

  def prepare(state, batch, step: int, next_batch=None):
    if cfg.pairs != "task":
      model = (nnx.merge(ref_graphdef, ref_params) if cfg.pairs == "reference"
               else nnx.merge(ctx.graphdef, state.params))
      seed = int(np.random.default_rng([ctx.stage.seed, step, 0x7061]).integers(2**31))
      batch = sampled_pairs(model, batch, cfg, ctx.data, ctx.tokenizer, seed, ctx.mesh, ctx.rules)
    return add_reference(batch) if needs_ref else batch

  kl_drift = (kl_drift_fn(ctx, ref_graphdef, ref_params, cfg.drift_prompts, cfg.drift_max_new_tokens, cfg.drift_seed)
              if cfg.drift_prompts else None)

  d = ctx.data
  tokens = 2 * d.batch_size * (d.seq_len - 1)
  flops = train_flops_per_token(ctx.model_cfg, d.seq_len) * tokens
  if needs_ref:
    flops += forward_flops_per_token(nnx.merge(ref_graphdef, ref_params).cfg, d.seq_len) * tokens
  if cfg.pairs != "task":  # sampling: every row generates up to pair_max_new_tokens
    flops += (forward_flops_per_token(ctx.model_cfg, d.prompt_len + cfg.pair_max_new_tokens)
              * d.batch_size * cfg.pair_samples * (d.prompt_len + cfg.pair_max_new_tokens))
  return Objective(loss=dpo_loss_fn(cfg), data_kinds=("preference",),
                   prepare=prepare if needs_ref or cfg.pairs != "task" else None,
                   eval_prepare=add_reference if needs_ref else None,
                   evaluate=kl_drift, tokens_per_step=tokens, flops_per_step=flops)
