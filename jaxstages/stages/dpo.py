"""Preference-optimisation losses on summed sequence log-probabilities.

Every loss compares a preferred ("chosen", c) and a dispreferred ("rejected", r) completion of the same prompt. Inputs
are summed completion log-probabilities `[batch]`: π for the policy, ρ for the frozen reference. With the
reference-adjusted log-ratio difference

  h = (πc − ρc) − (πr − ρr)

the kinds are:

- `sigmoid`, DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7):
  loss = −log σ(β h).
  With `label_smoothing` ε > 0 it becomes the conservative / robust DPO form used by TRL's `DPOTrainer`
  (Mitchell 2023, "A note on DPO with noisy preferences"), which assumes each label is flipped with probability ε:
  loss = −(1 − ε) log σ(β h) − ε log σ(−β h).
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

import difflib

import chex
import jax
import jax.numpy as jnp

from jaxstages.losses import token_log_probs

KINDS = ("sigmoid", "ipo", "hinge", "simpo")
_SMOOTHABLE = ("sigmoid", "simpo")


def sequence_log_probs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed log p(target) over positions where `mask` is nonzero (weighted by it), float32.

  logits `[batch, seq, vocab]`, targets and mask `[batch, seq]` -> `[batch]`.
  """
  chex.assert_rank([logits, targets, mask], [3, 2, 2])
  chex.assert_equal_shape([targets, mask])
  lp = token_log_probs(logits, targets)
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

  if kind in _SMOOTHABLE:
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
