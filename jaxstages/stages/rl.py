"""Online RL as a stage: the rollout loop shared by GRPO and PPO.

Per step, on the host side of the shared train loop (`Objective.prepare`), top to bottom:

1. **prompts**: B prompts of the stage's `rl` pipeline (its op range is the difficulty the RL runs on; a finite
   prompt set is revisited over epochs, or the stream is endless: `data.num_examples`, `data.epochs`);
2. **rollout**: G samples of each from the current params through the one jitted sampler (`sampling.sample`,
   one prefill per prompt), by default with the params resharded once per rollout to the sampler's own layout
   (`rollout.layout`), optionally rounded to a lower precision (`rollout.dtype`);
3. **verify** (the host's only work besides reading metrics): decode each completion and score it with the task
   verifier (`rewards.verify`): outcome, process score, the interplay study's mix or strict correctness, plus a
   format reward and DAPO's soft overlong penalty; a right answer reached through a wrong step counts as a *hack*;
4. **dynamic sampling** (DAPO): groups whose rewards are all equal carry no signal and are dropped; more prompts are
   drawn from the same checkpointed data iterator until B groups are kept or `rollout.max_sampling_rounds` is hit
   (then the batch is filled with dropped groups, masked out);
5. **one jitted post-processing** (`training_batch_fn`) from (sampled tokens, rewards) to the training batch: the
   rows of prompt + completion; the old log-probs (the sampler's, or a trainer forward's: required with top-k /
   top-p, whose sampler log-probs are of the truncated distribution), the reference's only when β > 0, the
   critic's values for PPO, each forward micro-batched like the update and its log-probs taken from the hidden
   states in chunks (never `[rows, seq, vocab]` logits); KL to the reference in the reward (fixed or adaptive β) or
   handed to the loss; advantages (`grpo.ADVANTAGES`, or PPO's GAE with whitening, `ppo.ppo_postprocess`); metrics;
6. then the loop's jitted train step (`train.make_train_step`, which calls this module; nothing here calls the
   loop) runs `epochs x minibatches` clipped-surrogate updates over the rollout, with the loss of `grpo.py` /
   `ppo.py` (log-probs and entropy in chunks, the path the LM loss takes).

The config (`RLConfig`) is in blocks that read like a recipe: `rollout`, `reward`, `advantage`, `policy_loss`, `kl`,
`ppo`; what the objective carries from step to step is one small `RolloutState`.

On several processes, steps 2-3 are each process's own: it samples, decodes and verifies its rows of the global
batch of prompts and contributes them (rewards included) as global arrays
(`jax.make_array_from_process_local_data`); what every process must agree on (which groups are informative, the
longest sample for the FLOPs) is read from small replicated arrays, and steps 4-5 run on the global arrays, so no
completion crosses to another host. A row's sampling key is its global row index: one process and several draw the
same samples.

Everything random is keyed by (seed, step, round), so a resumed run repeats the same rollouts; the adaptive KL
coefficient and the FLOPs spent so far (measured: sampling as executed) are saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxstages.apply import map_micro_batches
from jaxstages import config as config_lib
from jaxstages.config import ConfigError, check_keys, from_config, to_dict
from jaxstages.data import tasks
from jaxstages.evaluation import EvalConfig, evaluate as run_eval, kl_drift_fn
from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import KL_ESTIMATORS
from jaxstages.model.config import check_positions
from jaxstages.model.io import load_model
from jaxstages.rewards import Verdict, format_ok, mixed_reward, verify
from jaxstages.sampling import SamplingConfig, sample, stop_ids, strip_stop, unpad_prompts, without_fsdp
from jaxstages.sharding import (batch_sharding, global_batch_from_process_local, local_rows, param_shardings,
                                replicate_to_host, shard_batch, use_mesh)
from jaxstages.stages.grpo import (ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, Clip, PolicyLossConfig,
                                   completion_log_probs, grpo_loss_fn)
from jaxstages.stages.objective import Objective
from jaxstages.stages.ppo import ppo_loss_fn, ppo_postprocess, values_fn

SCORES = ("outcome", "process", "mixed", "strict")
# each advantage estimator's default for `scale_rewards` (its published form): GRPO divides by the group std,
# REINFORCE++ by the batch std, RLOO's leave-one-out baseline is used unscaled (`grpo.rloo_advantages`)
SCALE_REWARDS = {"grpo": True, "rloo": False, "reinforce++": True}
# each policy loss's default clip range (low, high): PPO's token ratio ±0.2; GSPO's sequence ratio (Zheng et al. 2025)
CLIP_RANGES = {"ppo_clip": (0.2, 0.2), "gspo": (3e-4, 4e-4)}
GSPO_MAX_CLIP = 0.01  # a GSPO clip range this wide is a token-level range by mistake
KL_PLACEMENTS = ("loss", "reward")
TIS_LEVELS = ("none", "token", "sequence")
CRITICS = ("separate", "shared")
SAMPLER_LAYOUTS = ("sampler", "trainer")

# -- the config: one block per part of the recipe ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """`rollout`: what is sampled. Each step samples `group_size` completions of each of the data block's B prompts."""

  group_size: int = 8  # G samples per prompt
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  dtype: str = ""  # e.g. "bfloat16": sample with params rounded to it (the update stays in full precision)
  # where the sampler's params live: "sampler", resharded once per rollout to the sampler's own layout (weights
  # replicated over fsdp: decoding never all-gathers them, `sampling.without_fsdp`); "trainer", as trained
  layout: str = "sampler"
  dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill from more prompts
  max_sampling_rounds: int = 4


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """`reward`: the scalar reward of a completion from the task verifier."""

  score: str = "outcome"  # outcome | process | mixed ([α·outcome + (1−α)·process]·1[outcome]) | strict
  process_alpha: float = 0.5  # the mix's α
  format_weight: float = 0.0  # + weight · 1[one answer line at the end]
  overlong_buffer: int = 0  # DAPO soft overlong penalty: ramps to −overlong_penalty over the last N allowed tokens
  overlong_penalty: float = 1.0
  mask_truncated: bool = False  # completions that hit max_new_tokens without stopping are left out of the loss


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """`advantage`: the estimator. grpo | rloo | reinforce++ (GRPO's family; default grpo) | gae (PPO's only)."""

  estimator: str = ""
  # divide by the std (of the group; REINFORCE++: of the batch). None: the estimator's own default
  # (`SCALE_REWARDS`: GRPO and REINFORCE++ scale, RLOO does not; Dr.GRPO: False)
  scale_rewards: bool | None = None


@dataclasses.dataclass(frozen=True)
class PolicyLossBlock:
  """`policy_loss`: the clipped surrogate, its aggregation and its importance ratio."""

  kind: str = "ppo_clip"  # ppo_clip | gspo
  loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
  # the ratio's clip range [1 - clip_low, 1 + clip_high]. None: the policy loss's own (`CLIP_RANGES`: ppo_clip's
  # token ratio 0.2 / 0.2, DAPO's clip-higher 0.28 above; GSPO's sequence ratio 3e-4 / 4e-4)
  clip_low: float | None = None
  clip_high: float | None = None
  dual_clip: float = 0.0  # > 1: dual-clip PPO's c (e.g. 3); 0: off
  entropy_coef: float = 0.0
  log_entropy: bool = True  # the policy's entropy as a metric (in chunks; computed anyway when entropy_coef is set)
  # old log-probs from a trainer forward instead of the sampler's; required with top_k / top_p, whose sampler
  # log-probs are of the truncated distribution, not of the policy the trainer's log-probs are of
  recompute_old_logprobs: bool = False
  tis: str = "none"  # truncated importance sampling of trainer/sampler mismatch: none | token | sequence
  tis_cap: float = 2.0


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """`kl`: KL to the reference (the stage's starting params unless `reference` names a model); coef 0: no reference
  at all."""

  coef: float = 0.0
  placement: str = "loss"  # loss | reward
  estimator: str = "k3"  # k1 | k2 | k3 | k3+ (k3's value with k2's gradient)
  target: float = 0.0  # > 0 (reward placement): adaptive β toward this KL per sequence (Ziegler et al. 2019)
  horizon: int = 10_000  # the adaptive controller's horizon, in sequences
  reference: str = ""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """`ppo`: the critic and GAE (ignored by GRPO)."""

  gamma: float = 1.0
  lam: float = 0.95
  value_coef: float = 0.5
  value_clip: float = 0.2  # 0: no value clipping
  whiten_advantages: bool = True
  critic: str = "separate"  # separate (its own trunk, from the policy's starting params) | shared (a head on the
  # policy's trunk)


BLOCKS = {"rollout": RolloutConfig, "reward": RewardConfig, "advantage": AdvantageConfig,
          "policy_loss": PolicyLossBlock, "kl": KLConfig, "ppo": PPOConfig}
# the flat keys of the RL block before it was split into blocks -> where each lives now
MOVED_KEYS = {
    **{k: f"rollout.{k}" for k in ("group_size", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "dynamic_sampling", "max_sampling_rounds")},
    "rollout_dtype": "rollout.dtype", "reward": "reward.score",
    **{k: f"reward.{k}" for k in ("process_alpha", "format_weight", "overlong_buffer", "overlong_penalty",
                                  "mask_truncated")},
    "advantage": "advantage.estimator", "scale_rewards": "advantage.scale_rewards", "policy_loss": "policy_loss.kind",
    **{k: f"policy_loss.{k}" for k in ("loss_agg", "clip_low", "clip_high", "dual_clip", "entropy_coef",
                                       "recompute_old_logprobs", "tis", "tis_cap")},
    **{f"kl_{k}": f"kl.{k}" for k in ("coef", "placement", "estimator", "target", "horizon")},
    "reference": "kl.reference",
    **{k: f"ppo.{k}" for k in ("gamma", "lam", "value_coef", "value_clip", "whiten_advantages", "critic")}}


config_lib.MOVED_KEYS.update({f"{kind}.{old}": f"{kind}.{new}" for kind in ("grpo", "ppo")
                              for old, new in MOVED_KEYS.items()})  # command-line overrides of the old keys


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The `grpo` (or `ppo`) block of an RL stage, in blocks that read like a recipe. The data block (kind `rl`) gives
  B = `data.batch_size` prompts per step and their op range."""

  rollout: RolloutConfig = RolloutConfig()
  reward: RewardConfig = RewardConfig()
  advantage: AdvantageConfig = AdvantageConfig()
  policy_loss: PolicyLossBlock = PolicyLossBlock()
  kl: KLConfig = KLConfig()
  ppo: PPOConfig = PPOConfig()
  epochs: int = 1  # passes over each rollout
  minibatches: int = 1  # optimizer updates per pass
  # held-out evaluation (greedy, strict) at every eval_every and at the end; 0: none
  eval_problems: int = 0
  # the KL of the policy from its starting params on this many held-out prompts (one sample each, max_new_tokens) at
  # every evaluation (`evaluation.kl_drift_fn`, as DPO's `dpo.drift_prompts`); 0: none
  drift_prompts: int = 0
  seed: int = 0

  def __post_init__(self):
    ro, loss, kl = self.rollout, self.policy_loss, self.kl
    for where, value, allowed in (
        ("reward.score", self.reward.score, SCORES), ("kl.placement", kl.placement, KL_PLACEMENTS),
        ("policy_loss.tis", loss.tis, TIS_LEVELS), ("ppo.critic", self.ppo.critic, CRITICS),
        ("policy_loss.kind", loss.kind, POLICY_LOSSES), ("policy_loss.loss_agg", loss.loss_agg, AGGREGATIONS),
        ("kl.estimator", kl.estimator, KL_ESTIMATORS),
        ("advantage.estimator", self.advantage.estimator, ("", *ADVANTAGES, "gae")),
        ("rollout.layout", ro.layout, SAMPLER_LAYOUTS)):
      check_keys([value], allowed, f"rl {where}")
    if ro.group_size < 1 or ro.max_new_tokens < 1 or self.epochs < 1 or self.minibatches < 1:
      raise ConfigError("rollout.group_size, rollout.max_new_tokens, epochs and minibatches must be >= 1")
    if self.advantage.estimator in ("grpo", "rloo") and ro.group_size < 2:
      raise ConfigError(f"advantage {self.advantage.estimator!r} compares samples of a group: rollout.group_size "
                        "must be >= 2")
    if loss.tis != "none" and not loss.recompute_old_logprobs:
      raise ConfigError("tis corrects the sampler's log-probs toward the trainer's: set "
                        "policy_loss.recompute_old_logprobs")
    if kl.target and kl.placement != "reward":
      raise ConfigError("an adaptive KL coefficient (kl.target) applies to kl.placement='reward'")
    if loss.dual_clip and loss.dual_clip <= 1:
      raise ConfigError(f"policy_loss.dual_clip must be > 1 (or 0 to switch it off), got {loss.dual_clip}")
    if ro.dtype and ro.dtype not in ("bfloat16", "float16", "float32"):
      raise ConfigError(f"rollout.dtype {ro.dtype!r} is not one of bfloat16, float16, float32")
    if (ro.top_k or ro.top_p < 1) and not loss.recompute_old_logprobs:
      raise ConfigError(
          f"top_k={ro.top_k} / top_p={ro.top_p} sample from a truncated distribution, so the sampler's log-probs "
          "are not the policy's the trainer computes and the importance ratio would be biased at the first update; "
          "set policy_loss.recompute_old_logprobs=True (and policy_loss.tis='token' to correct for the truncation), "
          "or sample untruncated")
    low, high = self.clip_range
    if loss.kind == "gspo" and max(low, high) >= GSPO_MAX_CLIP:
      raise ConfigError(
          f"policy_loss 'gspo' clips one ratio per sequence, the geometric mean of its token ratios, which stays "
          f"within ~1e-3 of 1: clip_low={low} / clip_high={high} (a token-level range) would never clip it. Use "
          f"GSPO's own range (~3e-4 / 4e-4, the default when unset), below {GSPO_MAX_CLIP}")

  @property
  def clip_range(self) -> tuple[float, float]:
    """(low, high): the configured clip range, or the policy loss's own where unset."""
    low, high = CLIP_RANGES[self.policy_loss.kind]
    loss = self.policy_loss
    return (low if loss.clip_low is None else loss.clip_low, high if loss.clip_high is None else loss.clip_high)

  @property
  def scale_std(self) -> bool:
    """Whether the advantage estimator divides by the std: as configured, or the estimator's own default."""
    scale = self.advantage.scale_rewards
    return SCALE_REWARDS.get(self.advantage.estimator or "grpo", True) if scale is None else scale

  @property
  def max_new_tokens(self) -> int:
    return self.rollout.max_new_tokens

  def policy_loss_config(self, with_kl: bool = True) -> PolicyLossConfig:
    loss, kl = self.policy_loss, self.kl
    return PolicyLossConfig(
        policy_loss=loss.kind, clip=Clip(*self.clip_range, loss.dual_clip), loss_agg=loss.loss_agg,
        norm_length=float(self.rollout.max_new_tokens), temperature=self.rollout.temperature,
        kl_coef=kl.coef if with_kl and kl.placement == "loss" else 0.0, kl_estimator=kl.estimator,
        entropy_coef=loss.entropy_coef, tis=loss.tis, tis_cap=loss.tis_cap, log_entropy=loss.log_entropy)


def rl_config(block: Mapping, kind: str) -> RLConfig:
  """The stage's RL block (`grpo` or `ppo`), with the kind's default advantage (`grpo`, or `gae` for PPO). A key of
  the flat layout this block had before its sub-blocks fails with the key's new place."""
  where = f"{kind} config"
  values = to_dict(block or {})
  for key in values:
    if key in MOVED_KEYS and not isinstance(values[key], Mapping):
      raise ConfigError(f"{kind}.{key} is now {kind}.{MOVED_KEYS[key]}")
  blocks = {}
  for name, cls in BLOCKS.items():
    sub = values.pop(name, None) or {}
    if not isinstance(sub, Mapping):
      raise ConfigError(f"{kind}.{name} is a block of keys ({', '.join(f.name for f in dataclasses.fields(cls))})")
    blocks[name] = from_config(cls, sub, where=f"{where} block {name!r}")
  if not blocks["advantage"].estimator:
    blocks["advantage"] = dataclasses.replace(blocks["advantage"], estimator="gae" if kind == "ppo" else "grpo")
  cfg = from_config(RLConfig, values, where=where, **blocks)
  if (cfg.advantage.estimator == "gae") != (kind == "ppo"):
    raise ConfigError(f"advantage {cfg.advantage.estimator!r} does not fit stage kind {kind!r}: GAE needs PPO's "
                      "critic, and PPO's advantages are GAE")
  return cfg


# -- rewards ---------------------------------------------------------------------------------------------------------


def completion_reward(verdict: Verdict, text: str, length: int, truncated: bool, cfg: RewardConfig,
                      max_new_tokens: int) -> float:
  """The scalar reward of one completion (`length` generated tokens)."""
  base = {"outcome": float(verdict.outcome_correct), "process": verdict.process_score,
          "strict": float(verdict.strict_correct),
          "mixed": mixed_reward(verdict, cfg.process_alpha)}[cfg.score]
  if cfg.format_weight:
    base += cfg.format_weight * float(format_ok(text))
  if cfg.overlong_buffer:
    # DAPO: 0 up to max_new - buffer tokens, then linearly down to -penalty at max_new (and past it: truncated)
    start = max_new_tokens - cfg.overlong_buffer
    base -= cfg.overlong_penalty * (1.0 if truncated else min(max(length - start, 0) / cfg.overlong_buffer, 1.0))
  return base


class AdaptiveKL:
  """β for KL in the reward, moved toward a target KL per sequence (Ziegler et al. 2019):
  `β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)` after each step of n sequences."""

  def __init__(self, coef: float, target: float, horizon: int):
    self.coef, self.target, self.horizon = coef, target, horizon

  def update(self, kl: float, n: int) -> None:
    if self.target:
      self.coef *= 1.0 + float(np.clip(kl / self.target - 1.0, -0.2, 0.2)) * n / self.horizon


# -- groups ----------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="g")
def group_flags(reward: jax.Array, valid: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
  """`([groups] valid, [groups] informative)` of a round's `[rows]` rewards and valid flags: informative groups are
  valid ones whose rewards are not all equal (the others carry no GRPO advantage). Small: read on every process
  (`sharding.replicate_to_host`) to choose the groups alike."""
  rewards = reward.reshape(-1, g)
  ok = valid.reshape(-1, g)[:, 0] > 0
  return ok, ok & (jnp.max(rewards, axis=1) - jnp.min(rewards, axis=1) > 0)


def select_groups(flags: list[tuple[np.ndarray, np.ndarray]], b: int, dynamic: bool
                  ) -> tuple[list[tuple[int, int]], int, dict]:
  """The B groups an update trains on, from one or more sampling rounds, given each round's `(valid, informative)`
  group flags (`group_flags`). Plain: the first round as it is. Dynamic sampling (DAPO): informative groups in the
  order sampled, then, if there are fewer than B, dropped groups (the caller sets their `valid` to 0: they fill the
  batch's static shape and train nothing). Returns `(chosen (round, group) pairs, groups kept, counts for the
  metrics)`; the same on every process (the flags are)."""
  groups = [(ri, gi) for ri, (ok, _) in enumerate(flags) for gi in range(len(ok))]
  useful = {(ri, gi) for ri, (_, informative) in enumerate(flags) for gi in np.flatnonzero(informative)}
  kept = [x for x in groups if x in useful] if dynamic else groups
  kept_set = set(kept)
  chosen = kept[:b] + [x for x in groups if x not in kept_set][:max(0, b - len(kept))]
  first_valid, first_informative = flags[0]
  zero_variance = float(np.mean(~first_informative[first_valid])) if first_valid.any() else 0.0
  return chosen, min(len(kept), b), {
      "zero_variance_groups": zero_variance, "groups_dropped": float(len(groups) - len(kept)) if dynamic else 0.0,
      "groups_filled": float(max(0, b - len(kept))), "sampling_rounds": float(len(flags))}


def planned_rl_flops(model_cfg, data, cfg: RLConfig, kind: str) -> dict:
  """An RL step's FLOPs from the config: one prefill per prompt, decoding every sample to the token limit (an upper
  bound: `prepare` counts the decode steps the loop ran, which stops when a round's longest sample stops), the extra
  forward passes (recomputed old log-probs, the reference, the critic) and `epochs` training passes over prompt +
  completion (twice for a separate critic). Also the parts a measured step is made of: `prefill_flops` (one sampling
  round), `decode_flops_per_token`, `logprobs_flops`, `update_flops`; and `flops_per_step_min`, a step whose samples
  all stop after one token."""
  b, width, n_new = data.batch_size, data.prompt_len, cfg.rollout.max_new_tokens
  rows, seq = b * cfg.rollout.group_size, data.prompt_len + n_new - 1
  critic = 2.0 if kind == "ppo" and cfg.ppo.critic == "separate" else 1.0
  passes = int(cfg.policy_loss.recompute_old_logprobs) + int(cfg.kl.coef > 0) + int(kind == "ppo")
  parts = {"prefill_flops": forward_flops_per_token(model_cfg, width) * width * b,
           "decode_flops_per_token": forward_flops_per_token(model_cfg, seq),
           "logprobs_flops": passes * forward_flops_per_token(model_cfg, seq) * seq * rows,
           "update_flops": critic * cfg.epochs * train_flops_per_token(model_cfg, seq) * seq * rows}
  fixed = parts["prefill_flops"] + parts["logprobs_flops"] + parts["update_flops"]
  return {"tokens_per_step": rows * seq, "flops_per_step": fixed + parts["decode_flops_per_token"] * n_new * rows,
          "flops_per_step_min": fixed + parts["decode_flops_per_token"] * rows, **parts}


# -- the jitted pieces: rows, log-probs, the post-processing ---------------------------------------------------------


def policy_of(model: nnx.Module) -> nnx.Module:
  """The policy inside a stage's model (PPO's model also holds a critic)."""
  return getattr(model, "policy", model)


def policy_logprobs_fn(width: int, temperature: float) -> Callable:
  """`(model, rows) -> [rows, width]` float32 log-probs of the completion tokens under the (tempered) policy, from
  its hidden states in chunks (`grpo.completion_log_probs`): no `[rows, seq, vocab]` logits."""

  def fn(model, batch):
    policy = policy_of(model)
    hidden, _ = policy.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return completion_log_probs(policy, hidden, batch["targets"], width, temperature)

  return fn


ROW_KEYS = ("tokens", "positions", "segment_ids", "targets")  # a rollout's rows of prompt + completion


def rollout_rows(prompt_tokens: jax.Array, prompt_mask: jax.Array, completion: jax.Array, pad_id: int) -> dict:
  """The teacher-forced rows of prompt + completion, all `[rows, width + T - 1]`: `tokens`, `positions`,
  `segment_ids`, `targets`. prompt_tokens / prompt_mask `[rows, width]` left-padded (the pipeline's), completion
  `[rows, T]` (the sampler's, `pad_id` after the stop token). Column `width - 1 + j` predicts completion token j (the
  on-device form of `sampling.completion_rows`)."""
  segments = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones_like(completion, jnp.int32)], axis=1)
  full = jnp.concatenate([jnp.where(prompt_mask > 0, prompt_tokens, pad_id), completion], axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0) * segments
  return {"tokens": full[:, :-1], "positions": positions[:, :-1], "segment_ids": segments[:, :-1],
          "targets": full[:, 1:]}


@jax.jit
def _round_params(params, like):
  return jax.tree.map(lambda x: x.astype(like.dtype).astype(x.dtype), params)


def training_batch_fn(cfg: RLConfig, kind: str, graphdef: nnx.GraphDef, ref_graphdef: nnx.GraphDef | None,
                      group: int, pad_id: int, micro_batches: int) -> Callable:
  """The one post-processing of a verified rollout, `(params, ref_params, rollout, kl_coef) -> (batch, metrics)`,
  pure (the caller jits it with explicit shardings):

  rollout, one global row per sample (row `i * G + j`: sample j of prompt i): `prompt_tokens`, `prompt_mask`
  `[rows, width]`; `tokens`, `logprobs`, `sample_mask`, `forced` `[rows, T]` (the sampler's); `lengths`, `reward`,
  `strict`, `outcome`, `truncated`, `valid` `[rows]` (the host's verdicts).

  It builds the rows of prompt + completion, runs the extra forwards micro-batched like the update (old log-probs
  when recomputed, the reference's when β > 0, the critic's values for PPO; log-probs in chunks, never the full
  logits), KL to the reference (in the loss, or in the reward), the advantages (GRPO's family, or GAE for PPO) and
  the rollout's metrics. Returns the train step's batch (`ROW_KEYS` `[rows, seq]`; `mask`, `old_logprobs`,
  `advantages`, and as configured `sampler_logprobs`, `ref_logprobs`, `returns`, `old_values` `[rows, T]`) and
  replicated scalar metrics."""
  width = cfg.rollout.max_new_tokens
  temperature = cfg.rollout.temperature
  kl = cfg.kl

  def forward(fn_of_model, gd, params, rows):
    return map_micro_batches(lambda mb: fn_of_model(nnx.merge(gd, params), mb), rows, micro_batches)

  def postprocess(params, ref_params, ro, kl_coef):
    rows = rollout_rows(ro["prompt_tokens"], ro["prompt_mask"], ro["tokens"], pad_id)
    valid = ro["valid"] > 0
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    row_mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n_valid
    mask = ro["sample_mask"] * (1.0 - ro["forced"]) * ro["valid"][:, None]
    if cfg.reward.mask_truncated:
      mask = mask * (1.0 - ro["truncated"])[:, None]
    token_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {}

    # old log-probs: the sampler's, or a trainer forward's
    sampler_lp = ro["logprobs"]
    old = sampler_lp
    if cfg.policy_loss.recompute_old_logprobs:
      old = forward(policy_logprobs_fn(width, temperature), graphdef, params, rows) * ro["sample_mask"]
      metrics["mismatch_abs_logprob"] = token_mean(jnp.abs(old - sampler_lp))
    out = {"mask": mask, "old_logprobs": old, "sampler_logprobs": sampler_lp}

    # KL to the reference: a loss term (its log-probs go to the update) or a per-token penalty in the reward
    rewards, token_rewards = ro["reward"], jnp.zeros_like(mask)
    if ref_params is not None:
      ref = forward(policy_logprobs_fn(width, temperature), ref_graphdef, ref_params, rows) * ro["sample_mask"]
      kl_tokens = KL_ESTIMATORS[kl.estimator](old, ref) * mask
      metrics["kl_ref_sequence"] = row_mean(kl_tokens.sum(-1))
      if kl.placement == "loss":
        out["ref_logprobs"] = ref
      else:
        token_rewards = -kl_coef * kl_tokens
        rewards = rewards - kl_coef * kl_tokens.sum(-1)

    # advantages: PPO's GAE over the critic's values, or a GRPO-family estimator of each group's rewards
    if kind == "ppo":
      values = forward(values_fn(width), graphdef, params, rows) * mask
      adv, returns = ppo_postprocess(ro["reward"], token_rewards, values, mask, gamma=cfg.ppo.gamma,
                                     lam=cfg.ppo.lam, whiten_advantages=cfg.ppo.whiten_advantages)
      out.update(advantages=adv, returns=returns, old_values=values)
      metrics["value_mean"] = token_mean(values)
    else:
      adv = ADVANTAGES[cfg.advantage.estimator](rewards.reshape(-1, group), ro["valid"][::group], cfg.scale_std)
      out["advantages"] = jnp.repeat(adv.reshape(-1, 1), width, axis=1) * mask

    reward_mean = row_mean(ro["reward"])
    metrics.update(reward_mean=reward_mean, reward_std=jnp.sqrt(row_mean((ro["reward"] - reward_mean) ** 2)),
                   pass_rate=row_mean(ro["strict"]), outcome_rate=row_mean(ro["outcome"]),
                   hack_rate=row_mean(ro["outcome"] * (1 - ro["strict"])),
                   response_length=row_mean(ro["lengths"].astype(jnp.float32)),
                   truncated_fraction=row_mean(ro["truncated"]))
    keep = training_batch_keys(cfg, kind)
    batch = {**rows, **{k: v.astype(jnp.float32) for k, v in out.items() if k in keep}}
    return batch, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  return postprocess


def training_batch_keys(cfg: RLConfig, kind: str) -> tuple[str, ...]:
  """The `[rows, T]` arrays the update reads besides the rows (`ROW_KEYS`)."""
  keys = ["mask", "old_logprobs", "advantages"]
  keys += ["sampler_logprobs"] if cfg.policy_loss.tis != "none" else []
  keys += ["ref_logprobs"] if cfg.kl.coef > 0 and cfg.kl.placement == "loss" else []
  keys += ["returns", "old_values"] if kind == "ppo" else []
  return tuple(keys)


def jit_training_batch(postprocess: Callable, mesh, rules, params_sharding, ref_sharding) -> Callable:
  """`postprocess` (`training_batch_fn`) jitted with explicit shardings: params as trained (the reference as loaded),
  the rollout's rows and the batch sharded over the data axes, metrics replicated (every process reads them).
  Compiled once per rollout shape; `.lower(...)` of the same arguments (abstract ones too) for `plan`."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rows_sharded = lambda tree: jax.tree.map(lambda x: batch_sharding(mesh, rules, len(x.shape)), tree)
  compiled = {}

  def jitted(params, ref_params, rollout, kl_coef):
    key = tuple(sorted((k, v.shape) for k, v in rollout.items()))
    if key not in compiled:
      batch, metrics = jax.eval_shape(postprocess, params, ref_params, rollout, kl_coef)
      # kl_coef: a host float (the adaptive coefficient), left to jit (replicated on every process)
      compiled[key] = jax.jit(postprocess, in_shardings=(params_sharding, ref_sharding, rows_sharded(rollout), None),
                              out_shardings=(rows_sharded(batch), jax.tree.map(lambda _: replicated, metrics)))
    return compiled[key]

  def call(params, ref_params, rollout, kl_coef):
    with use_mesh(mesh, rules):
      return jitted(params, ref_params, rollout, kl_coef)(params, ref_params, rollout, kl_coef)

  def lower(params, ref_params, rollout, kl_coef=jax.ShapeDtypeStruct((), jnp.float32)):
    with use_mesh(mesh, rules):
      return jitted(params, ref_params, rollout, kl_coef).lower(params, ref_params, rollout, kl_coef)

  call.lower = lower
  return call


def rl_plan_programs(block: Mapping, kind: str, data, graphdef: nnx.GraphDef, params, mesh, rules,
                     micro_batches: int) -> tuple[Callable, dict, Callable, tuple[int, int]]:
  """What `jaxstages plan` compiles for a GRPO stage without sampling: `(loss, abstract training batch, log-prob pass,
  (minibatches, epochs))` where the log-prob pass is `() -> lowered` post-processing of an abstract rollout (rows,
  old / reference log-probs as configured, micro-batched like the update). `params`: abstract, as trained."""
  if kind != "grpo":
    raise ConfigError(f"plan sizes GRPO stages among the RL kinds, not {kind!r}")
  cfg = rl_config(block, kind)
  rows, n_new, width = data.batch_size * cfg.rollout.group_size, cfg.rollout.max_new_tokens, data.prompt_len
  seq = width + n_new - 1
  shape = lambda n, dtype: jax.ShapeDtypeStruct((rows, n) if n else (rows,), dtype)
  batch = {**{k: shape(seq, jnp.int32) for k in ROW_KEYS},
           **{k: shape(n_new, jnp.float32) for k in training_batch_keys(cfg, kind)}}
  rollout = {"prompt_tokens": shape(width, jnp.int32), "prompt_mask": shape(width, jnp.int32),
             "tokens": shape(n_new, jnp.int32), "lengths": shape(0, jnp.int32),
             **{k: shape(n_new, jnp.float32) for k in ("logprobs", "sample_mask", "forced")},
             **{k: shape(0, jnp.float32) for k in ("reward", "strict", "outcome", "truncated", "valid")}}
  params_sharding = param_shardings(params, mesh, rules)
  with_ref = cfg.kl.coef > 0
  post = jit_training_batch(
      training_batch_fn(cfg, kind, graphdef, graphdef if with_ref else None, cfg.rollout.group_size, 0,
                        cfg.minibatches * micro_batches),
      mesh, rules, params_sharding, params_sharding if with_ref else None)
  lower = lambda: post.lower(params, params if with_ref else None, rollout)
  return grpo_loss_fn(cfg.policy_loss_config()), batch, lower, (cfg.minibatches, cfg.epochs)


# -- the objective ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RolloutState:
  """What the RL objective carries from step to step: the KL coefficient's controller (adaptive with `kl.target`),
  the FLOPs spent so far (both saved with every checkpoint), the reference forwards run, when the last rollout
  ended, and the last step's host metrics."""

  kl: AdaptiveKL
  flops_spent: float = 0.0
  reference_forwards: int = 0
  rollout_end: float | None = None
  metrics: dict = dataclasses.field(default_factory=dict)


def rl_objective(ctx, block: Mapping, kind: str):
  """GRPO (`kind="grpo"`) or PPO (`kind="ppo"`) as an `Objective` of the shared train loop."""
  cfg = rl_config(block, kind)
  d, tok, ro_cfg = ctx.data, ctx.tokenizer, cfg.rollout
  b, g, n_new, width = d.batch_size, ro_cfg.group_size, ro_cfg.max_new_tokens, d.prompt_len
  check_positions(ctx.model_cfg, {"data.prompt_len": width, f"{kind}.rollout.max_new_tokens": n_new})
  rows_per_step = b * g
  plan = planned_rl_flops(ctx.model_cfg, d, cfg, kind)
  stops = stop_ids(tok, chat=d.prompt == "chat")
  scfg = SamplingConfig(max_new_tokens=n_new, temperature=ro_cfg.temperature, top_k=ro_cfg.top_k,
                        top_p=ro_cfg.top_p, n=g, stop_tokens=stops, pad_id=tok.pad_id, prompt_buckets=(width,))
  sampler_rules = without_fsdp(ctx.rules) if ro_cfg.layout == "sampler" else None
  sources = d.source_configs

  # the reference: loaded (or copied from the starting params) only when β > 0
  ref_graphdef = ref_params = ref_sharding = None
  if cfg.kl.coef > 0:
    ref_model = (load_model(cfg.kl.reference, ctx.mesh, ctx.rules) if cfg.kl.reference else
                 policy_of(nnx.merge(ctx.graphdef, jax.tree.map(jnp.copy, ctx.initial_params))))
    ref_graphdef, ref_params = nnx.split(ref_model)
    ref_sharding = jax.tree.map(lambda x: x.sharding, ref_params)
  # the extra forwards run as many rows at a time as one micro-batch of an update
  passes_split = cfg.minibatches * ctx.stage.micro_batches
  training_batch = jit_training_batch(
      training_batch_fn(cfg, kind, ctx.graphdef, ref_graphdef, g, tok.pad_id, passes_split),
      ctx.mesh, ctx.rules, ctx.params_sharding, ref_sharding)
  state = RolloutState(kl=AdaptiveKL(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon))

  def problems_of(host: Mapping[str, np.ndarray]) -> list[tasks.Problem]:
    """The verifier's problems of a batch: (source, index) -> the problem the pipeline generated."""
    out = []
    for s, i in zip(host["source"], host["index"]):
      src = sources[int(s)]
      out.append(tasks.generate(src.task, src.seed, d.split, int(i)))
    return out

  def roll_out(params, batch, seed: int, clock: dict) -> dict:
    """One round: G samples of each of this process's prompts of `batch` (its rows of the global batch), decoded and
    verified here; returned as global `[B * G, ...]` arrays to which every process contributed its own rows."""
    host = {k: local_rows(batch[k]) for k in ("prompt_tokens", "prompt_mask", "source", "index", "valid")}
    prompts = unpad_prompts(host["prompt_tokens"], host["prompt_mask"])
    t0 = time.perf_counter()
    samples = sample(policy_of(nnx.merge(ctx.graphdef, params)), prompts, scfg, seed, ctx.mesh, ctx.rules,
                     sampler_rules=sampler_rules)
    jax.block_until_ready(samples)
    clock["sampler"] += time.perf_counter() - t0
    samples = samples.local()
    problems = problems_of(host)
    rewards, strict, outcome, truncated = [], [], [], []
    for r, tokens in enumerate(samples.completions()):
      body = strip_stop(tokens, stops)
      text = tok.decode(body)
      verdict = verify(problems[r // g], text)
      truncated.append(len(body) == len(tokens) >= n_new)  # hit the limit without a stop token
      rewards.append(completion_reward(verdict, text, len(tokens), truncated[-1], cfg.reward, n_new))
      strict.append(verdict.strict_correct)
      outcome.append(verdict.outcome_correct)
    per_row = lambda x: np.repeat(x, g, axis=0)  # a prompt's entry for each of its G samples
    local = {"prompt_tokens": per_row(host["prompt_tokens"]), "prompt_mask": per_row(host["prompt_mask"]),
             "tokens": samples.tokens, "logprobs": samples.logprobs, "sample_mask": samples.mask,
             "forced": samples.forced, "lengths": samples.lengths, "reward": np.asarray(rewards, np.float32),
             "strict": np.asarray(strict, np.float32), "outcome": np.asarray(outcome, np.float32),
             "truncated": np.asarray(truncated, np.float32), "valid": per_row(host["valid"].astype(np.float32))}
    return global_batch_from_process_local(local, ctx.mesh, ctx.rules)

  def take_rows(rounds: list[dict], chosen: list[tuple[int, int]], kept: int) -> dict:
    """The chosen groups' rows of every round, as one batch sharded like the rounds; groups past the first `kept`
    fill the shape with `valid` 0. On device: each process ends up with its own rows, wherever they were sampled."""
    idx = np.concatenate([ri * rows_per_step + gi * g + np.arange(g) for ri, gi in chosen]).astype(np.int32)
    keep = np.repeat((np.arange(b) < kept).astype(np.float32), g)
    fixed = shard_batch({"idx": idx, "keep": keep}, ctx.mesh, ctx.rules)
    return gather_rows(rounds, fixed["idx"], fixed["keep"])

  @jax.jit
  def gather_rows(rounds: list[dict], idx: jax.Array, keep: jax.Array) -> dict:
    """Rows `idx` of the rounds' rows laid end to end, `valid` times `keep`, batch-sharded."""
    out = {}
    for k in rounds[0]:
      x = jnp.concatenate([r[k] for r in rounds])[idx]
      out[k] = jax.lax.with_sharding_constraint(x, batch_sharding(ctx.mesh, ctx.rules, x.ndim))
    out["valid"] = out["valid"] * keep
    return out

  def prepare(train_state, batch, step: int, next_batch: Callable[[], dict]) -> dict:
    """rollout (sampler) -> verify (host) -> one jitted post-processing: the update's batch."""
    jax.block_until_ready(train_state.params)
    t0 = time.perf_counter()
    # from the end of the previous step's rollout until its update has finished (dispatch may run it inline)
    t_update = t0 - (state.rollout_end or t0)
    params = train_state.params
    if ro_cfg.dtype:
      params = _round_params(params, jnp.zeros((), ro_cfg.dtype))

    # 1. rollouts, verified on the host; with dynamic sampling, more rounds until B informative groups
    clock = {"sampler": 0.0}
    rounds, flags, longest = [], [], []
    while True:
      seed = int(np.random.default_rng([cfg.seed, step, len(rounds), 0x524C]).integers(2**31))
      rounds.append(roll_out(params, batch, seed, clock))
      ok, informative, most = replicate_to_host((*group_flags(rounds[-1]["reward"], rounds[-1]["valid"], g),
                                                 jnp.max(rounds[-1]["lengths"])), ctx.mesh)
      flags.append((ok, informative))
      longest.append(int(most))
      if not ro_cfg.dynamic_sampling or len(rounds) >= ro_cfg.max_sampling_rounds:
        break
      if sum(int(f.sum()) for _, f in flags) >= b:
        break
      batch = next_batch()
    chosen, kept, group_counts = select_groups(flags, b, ro_cfg.dynamic_sampling)
    rollout = rounds[0] if not ro_cfg.dynamic_sampling else take_rows(rounds, chosen, kept)
    t_sample = time.perf_counter() - t0

    # 2. one jitted call: rows, old / reference log-probs, values, KL, advantages, metrics
    t1 = time.perf_counter()
    kl_coef = state.kl.coef
    batch_out, rollout_metrics = training_batch(train_state.params, ref_params, rollout, kl_coef)
    jax.block_until_ready(batch_out)
    state.reference_forwards += int(ref_params is not None)
    host = {k: float(v) for k, v in rollout_metrics.items()}  # replicated: every process reads the same values
    if ref_params is not None and cfg.kl.placement == "reward":
      host["kl_coef"] = kl_coef
      state.kl.update(host["kl_ref_sequence"], rows_per_step)
    state.rollout_end = time.perf_counter()
    t_logprobs = state.rollout_end - t1

    # the decode loop runs every row until the round's longest sample stops: that is the compute spent
    decoded_tokens = sum(float(rows_per_step * most) for most in longest)
    state.metrics = dict(
        host, **group_counts, time_sampling_s=t_sample, time_sampler_s=clock["sampler"],
        time_logprobs_s=t_logprobs, time_update_s=t_update, reference_forwards=float(state.reference_forwards),
        flops_sampling=plan["prefill_flops"] * len(rounds) + plan["decode_flops_per_token"] * decoded_tokens,
        flops_logprobs=plan["logprobs_flops"], flops_update=plan["update_flops"])
    state.flops_spent += (state.metrics["flops_sampling"] + state.metrics["flops_logprobs"]
                          + state.metrics["flops_update"])
    return batch_out

  def get_state() -> dict:
    return {"kl_coef": state.kl.coef, "flops_spent": state.flops_spent}

  def set_state(saved: Mapping) -> None:
    state.kl.coef = float(saved["kl_coef"])
    state.flops_spent = float(saved.get("flops_spent", 0.0))

  kl_drift = None
  if cfg.drift_prompts:
    kl_drift = kl_drift_fn(ctx, ctx.graphdef, jax.tree.map(jnp.copy, ctx.initial_params), cfg.drift_prompts, n_new,
                           seed=cfg.seed)

  def evaluate(params) -> dict[str, float]:
    drift = kl_drift(params) if kl_drift else {}
    if not cfg.eval_problems:
      return drift
    lo, hi = d.task.op_range
    contexts = tuple(dict.fromkeys(m.context for m in d.task.mixture))
    ecfg = EvalConfig(ops=tuple(range(lo, hi + 1)), contexts=contexts, problems=cfg.eval_problems, prompt=d.prompt,
                      max_new_tokens=n_new, batch_size=max(cfg.eval_problems, 1))
    result = run_eval(policy_of(nnx.merge(ctx.graphdef, params)), tok, d.task, ecfg, mesh=ctx.mesh,
                      show_progress=False)
    out = {f"eval_pass@1_op{c['op']}_{c['context']}": c["pass@1"] for c in result["cells"]}
    out["eval_pass@1"] = float(np.mean([c["pass@1"] for c in result["cells"]]))
    out["eval_answer@1"] = float(np.mean([c["answer@1"] for c in result["cells"]]))
    return {**out, **drift}

  loss = ppo_loss_fn(cfg) if kind == "ppo" else grpo_loss_fn(cfg.policy_loss_config())
  return Objective(
      loss=loss, data_kinds=("rl",), prepare=prepare, evaluate=evaluate, tokens_per_step=plan["tokens_per_step"],
      flops_per_step=plan["flops_per_step"], host_metrics=lambda: dict(state.metrics), get_state=get_state,
      set_state=set_state, minibatches=cfg.minibatches, epochs=cfg.epochs)
