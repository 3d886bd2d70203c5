"""GRPO and its family (DeepSeekMath GRPO, DAPO, Dr.GRPO, RLOO, REINFORCE++, GSPO) as small registries of pure
functions, and the policy loss the RL stage trains with (`jaxstages.stages.rl` does the rollouts).

- `ADVANTAGES`: `(rewards [prompts, group], valid [prompts], scale_std) -> advantages [prompts, group]`.
- `POLICY_LOSSES`: `(logp, old_logp, advantages, mask, clip) -> (per-token loss, clipped, ratio)`, all `[rows, T]`.
- `KL_ESTIMATORS` (from `jaxstages.losses`): `(logp, ref_logp) -> [rows, T]` per-token estimates of KL(π‖π_ref)
  on the sampled tokens.
- `AGGREGATIONS`: `(per_token [rows, T], mask [rows, T], norm_length) -> (sum, count)`: the loss is `sum / count`
  of the whole minibatch, where `count` is tokens (`token-mean`) or sequences (the `seq-mean-*` modes), so a
  minibatch gives the same loss and gradient however it is split into micro-batches or sharded (the train step adds
  sums and counts before dividing).

Row `i * group + j` of a rollout is sample `j` of prompt `i` (the sampler's layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxstages.losses import KL_ESTIMATORS, entropy, hidden_token_log_probs, kl_k3, token_log_probs

# -- advantages ------------------------------------------------------------------------------------------------------


def _group_mean(rewards: jax.Array) -> jax.Array:
  return jnp.mean(rewards, axis=1, keepdims=True)


def _group_std(rewards: jax.Array) -> jax.Array:
  """Unbiased (ddof 1) per-group std, as DeepSeekMath, TRL and verl compute it."""
  g = rewards.shape[1]
  return jnp.sqrt(jnp.sum((rewards - _group_mean(rewards)) ** 2, axis=1, keepdims=True) / max(g - 1, 1))


def _spread(rewards: jax.Array) -> jax.Array:
  """`[prompts, 1]`: max - min of each group; 0 exactly when its rewards are all equal."""
  return jnp.max(rewards, axis=1, keepdims=True) - jnp.min(rewards, axis=1, keepdims=True)


def grpo_advantages(rewards: jax.Array, valid: jax.Array, scale_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """GRPO: `(r - mean_group) / (std_group + eps)`; Dr.GRPO drops the std division (`scale_std=False`), which
  otherwise up-weights groups that are nearly all right or all wrong. `[prompts, group]`; invalid groups get 0, and
  so, exactly, does a group whose rewards are all equal (its float32 mean is off by an ulp, e.g. eight 0.7s, and
  that rounding divided by std + eps = eps would give every sample an advantage of ~0.06)."""
  chex.assert_rank(rewards, 2)
  adv = rewards - _group_mean(rewards)
  if scale_std:
    adv = adv / (_group_std(rewards) + eps)
  return jnp.where(_spread(rewards) > 0, adv, 0.0) * valid[:, None]


def rloo_advantages(rewards: jax.Array, valid: jax.Array, scale_std: bool = False, eps: float = 1e-6) -> jax.Array:
  """RLOO: each sample's baseline is the mean reward of the *other* samples of its group,
  `r_i - (sum_j r_j - r_i) / (G - 1)` (= G/(G-1) times the group-centred reward); optionally divided by the group
  std."""
  chex.assert_rank(rewards, 2)
  g = rewards.shape[1]
  if g < 2:
    raise ValueError("RLOO needs at least 2 samples per prompt")
  adv = rewards - (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (g - 1)
  if scale_std:
    adv = adv / (_group_std(rewards) + eps)
  return jnp.where(_spread(rewards) > 0, adv, 0.0) * valid[:, None]  # all equal: exactly 0, as in GRPO


def reinforce_pp_advantages(rewards: jax.Array, valid: jax.Array, scale_std: bool = True,
                            eps: float = 1e-6) -> jax.Array:
  """REINFORCE++ (Hu 2025): no per-group baseline; the rewards are whitened over the whole batch (valid groups only):
  `(r - mean_batch) / (std_batch + eps)` (population std); exactly 0 when every valid reward is the same."""
  chex.assert_rank(rewards, 2)
  w = jnp.broadcast_to(valid[:, None], rewards.shape).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(rewards * w) / n
  adv = rewards - mean
  if scale_std:
    adv = adv / (jnp.sqrt(jnp.sum(adv ** 2 * w) / n) + eps)
  spread = jnp.max(jnp.where(w > 0, rewards, -jnp.inf)) - jnp.min(jnp.where(w > 0, rewards, jnp.inf))
  return jnp.where(spread > 0, adv, 0.0) * w


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    "grpo": grpo_advantages, "rloo": rloo_advantages, "reinforce++": reinforce_pp_advantages}

# -- policy losses ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Clip:
  """PPO clipping: the ratio is kept in `[1 - low, 1 + high]` (DAPO's clip-higher: high > low); `dual` > 1 also
  bounds the loss of negative-advantage tokens at `dual * |A|` (dual-clip PPO; 0 switches it off)."""

  low: float = 0.2
  high: float = 0.2
  dual: float = 0.0


def _clipped_surrogate(ratio: jax.Array, advantages: jax.Array, clip: Clip) -> tuple[jax.Array, jax.Array]:
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip.low, 1.0 + clip.high)
  loss = jnp.maximum(unclipped, clipped)
  was_clipped = clipped > unclipped
  if clip.dual:
    bound = -advantages * clip.dual  # positive where A < 0
    dual = (advantages < 0) & (loss > bound)
    loss = jnp.where(dual, bound, loss)
    was_clipped = was_clipped | dual
  return loss, was_clipped.astype(jnp.float32)


def ppo_clip_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                  clip: Clip) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The token-level clipped surrogate `max(-A r, -A clip(r))`, `r = π/π_old` per token."""
  ratio = jnp.exp(logp - old_logp)
  loss, clipped = _clipped_surrogate(ratio, advantages, clip)
  return loss, clipped, ratio


def gspo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
              clip: Clip) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its token ratios,
  `s = exp(mean_t log(π/π_old))`, clipped as a whole (its ε is ~1e-3, not 0.2). Written per token as
  `sg(s) · π_t / sg(π_t)`: the value is `s` at every token and the gradient is `s ∇log π_t`, which also lets
  per-token advantages through."""
  lengths = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
  seq_log_ratio = jnp.sum((logp - old_logp) * mask, axis=-1, keepdims=True) / lengths
  ratio = jnp.exp(jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp))
  loss, clipped = _clipped_surrogate(ratio, advantages, clip)
  return loss, clipped, ratio


POLICY_LOSSES: dict[str, Callable[..., tuple[jax.Array, jax.Array, jax.Array]]] = {
    "ppo_clip": ppo_clip_loss, "gspo": gspo_loss}

# -- loss aggregation ------------------------------------------------------------------------------------------------


def _token_mean(x, mask, norm_length):
  return jnp.sum(x * mask), jnp.sum(mask)


def _rows(mask):
  return jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))


def _seq_mean_token_mean(x, mask, norm_length):
  lengths = jnp.sum(mask, axis=-1)
  return jnp.sum(jnp.sum(x * mask, axis=-1) / jnp.maximum(lengths, 1.0)), _rows(mask)


def _seq_mean_token_sum(x, mask, norm_length):
  return jnp.sum(x * mask), _rows(mask)


def _seq_mean_token_sum_norm(x, mask, norm_length):
  """Dr.GRPO: token sums divided by one constant (the longest allowed completion), never by a sequence's own length,
  which would favour long wrong answers and short right ones."""
  return jnp.sum(x * mask) / norm_length, _rows(mask)


AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array, float], tuple[jax.Array, jax.Array]]] = {
    "token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum, "seq-mean-token-sum-norm": _seq_mean_token_sum_norm}

# -- importance-sampling correction for the sampler ------------------------------------------------------------------


def truncated_is_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, level: str,
                         cap: float) -> jax.Array:
  """Truncated importance sampling for a sampler that is not exactly the trainer (lower precision, another kernel):
  `min(π_old / π_sampler, cap)` per token (`level="token"`) or per sequence (the product over its tokens), as a
  `[rows, T]` weight without gradient. `level="none"`: ones."""
  if level not in ("none", "token", "sequence"):
    raise ValueError(f"truncated importance sampling level {level!r} is not one of none, token, sequence")
  if level == "none":
    return jnp.ones_like(old_logp)
  log_w = (old_logp - sampler_logp) * mask
  if level == "sequence":
    log_w = jnp.broadcast_to(jnp.sum(log_w, axis=-1, keepdims=True), log_w.shape)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


# -- the policy loss -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """What the policy loss needs from `rl.RLConfig` (a static, hashable part of it)."""

  policy_loss: str = "ppo_clip"
  clip: Clip = Clip()
  loss_agg: str = "token-mean"
  norm_length: float = 1.0  # seq-mean-token-sum-norm's constant
  temperature: float = 1.0  # the sampler's: the trainer's log-probs are of the same tempered distribution
  kl_coef: float = 0.0  # KL to the reference as a loss term (0: none)
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  tis: str = "none"  # none | token | sequence
  tis_cap: float = 2.0
  log_entropy: bool = True  # the policy's entropy as a metric (computed anyway when entropy_coef is set)

  @property
  def uses_entropy(self) -> bool:
    return bool(self.entropy_coef) or self.log_entropy


def completion_logits(logits: jax.Array, width: int) -> jax.Array:
  """The last `width` positions of `logits [rows, seq, vocab]`: those that predict the completion tokens."""
  return logits[:, logits.shape[1] - width:]


def completion_log_probs(policy: nnx.Module, hidden: jax.Array, targets: jax.Array, width: int, temperature: float,
                         with_entropy: bool = False):
  """The policy's float32 log-probs `[rows, width]` of the completion tokens (the last `width` of `targets
  [rows, seq]`) under softmax(logits / temperature), from its final hidden states `[rows, seq, embed]`: only the
  completion's positions, in chunks of the model's `logits_chunk` through the loss path every stage shares
  (`losses.hidden_token_log_probs`), so at most `[rows, chunk, vocab]` logits exist at a time. With `with_entropy`,
  `(log-probs, entropy)`."""
  hidden = hidden[:, hidden.shape[1] - width:]
  return hidden_token_log_probs(hidden, policy.head(), targets[:, targets.shape[1] - width:], policy.cfg.logits_chunk,
                                temperature, with_entropy)


def policy_terms(logits: jax.Array, batch: Mapping[str, jax.Array], cfg: PolicyLossConfig
                 ) -> tuple[jax.Array, jax.Array, dict]:
  """`policy_loss_terms` from the full `logits [rows, seq, vocab]` over prompt + completion: the reference the
  chunked path of the losses (`completion_log_probs`) is tested against (`tests/test_rl_losses.py`)."""
  t = batch["mask"].shape[1]
  logits = completion_logits(logits, t).astype(jnp.float32) / cfg.temperature
  return policy_loss_terms(token_log_probs(logits, batch["targets"][:, -t:]), entropy(logits), batch, cfg)


def policy_loss_terms(logp: jax.Array, ent: jax.Array | None, batch: Mapping[str, jax.Array], cfg: PolicyLossConfig
                      ) -> tuple[jax.Array, jax.Array, dict]:
  """The policy part of an RL loss from the policy's log-probs of the completion tokens `logp [rows, T]` (T =
  completion width) and their entropy `ent [rows, T]` (None when neither used nor logged, `cfg.uses_entropy`).

  batch: `mask`, `old_logprobs`, `advantages` `[rows, T]` (mask 1 on trained tokens); `ref_logprobs [rows, T]` when
  `kl_coef > 0`; `sampler_logprobs [rows, T]` when `tis` is on.
  Returns (sum, count, aux): the aggregated clipped surrogate (+ β·KL, − entropy bonus), and aux metrics as
  `(sum, count)` pairs of token means (the train step divides them after adding over micro-batches).
  """
  mask = batch["mask"].astype(jnp.float32)
  chex.assert_equal_shape([logp, mask, batch["old_logprobs"], batch["advantages"]])
  old = batch["old_logprobs"]
  per_token, clipped, ratio = POLICY_LOSSES[cfg.policy_loss](logp, old, batch["advantages"], mask, cfg.clip)
  if cfg.tis != "none":
    per_token = per_token * truncated_is_weights(old, batch["sampler_logprobs"], mask, cfg.tis, cfg.tis_cap)
  tokens = jnp.sum(mask)
  mean = lambda x: (jnp.sum(jax.lax.stop_gradient(x) * mask), tokens)
  aux = {"clip_fraction": mean(clipped), "ratio": mean(ratio), "abs_log_ratio": mean(jnp.abs(logp - old)),
         "kl_old": mean(kl_k3(logp, old))}
  if cfg.kl_coef:
    kl = KL_ESTIMATORS[cfg.kl_estimator](logp, batch["ref_logprobs"])
    per_token = per_token + cfg.kl_coef * kl
    aux["kl_ref"] = mean(kl_k3(logp, batch["ref_logprobs"]))
  if ent is not None:
    aux["entropy"] = mean(ent)
    if cfg.entropy_coef:
      per_token = per_token - cfg.entropy_coef * ent
  total, count = AGGREGATIONS[cfg.loss_agg](per_token, mask, cfg.norm_length)
  return total, count, aux


def grpo_loss_fn(cfg: PolicyLossConfig):
  """The GRPO-family loss `(model, batch) -> (sum, count, aux)` over a rollout minibatch: `tokens`, `positions`,
  `segment_ids`, `targets` `[rows, seq]` (prompt + completion) and the `[rows, T]` arrays of `policy_loss_terms`;
  log-probs and entropy from the hidden states in chunks (`completion_log_probs`), never the full logits."""

  def loss(model: nnx.Module, batch):
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    stats = completion_log_probs(model, hidden, batch["targets"], batch["mask"].shape[1], cfg.temperature,
                                 cfg.uses_entropy)
    logp, ent = stats if cfg.uses_entropy else (stats, None)
    return policy_loss_terms(logp, ent, batch, cfg)

  return loss
