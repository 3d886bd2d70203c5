"""Online RL as a stage: the rollout loop shared by GRPO and PPO.

Per step, on the host side of the shared train loop (`Objective.prepare`), top to bottom:

1. **prompts**: B prompts of the stage's `rl` pipeline (its op range is the difficulty the RL runs on; a finite
   prompt set is revisited over epochs, or the stream is endless: `data.num_examples`, `data.epochs`);
2. **rollout**: G samples of each from the current params through the one jitted sampler (`sampling.sample`,
   one prefill per prompt), optionally with params rounded to a lower precision (`rollout_dtype`);
3. **rewards** from the task verifier (`rewards.verify`): outcome, process score, the interplay study's mix or
   strict correctness, plus a format reward and DAPO's soft overlong penalty; a right answer reached through a wrong
   step counts as a *hack*;
4. **dynamic sampling** (DAPO): groups whose rewards are all equal carry no signal and are dropped; more prompts are
   drawn from the same checkpointed data iterator until B groups are kept or `max_sampling_rounds` is hit (then
   the batch is filled with dropped groups, masked out);
5. **log-probs**: the sampler's own (or recomputed by the trainer: required with top-k / top-p, whose sampler
   log-probs are of the truncated distribution), the reference model's only when β > 0, the critic's values for
   PPO (jitted forwards, `apply.make_apply`);
6. **advantages**: a GRPO-family estimator of the group rewards (`grpo.ADVANTAGES`, with its own std-scaling
   default, `SCALE_REWARDS`), or PPO's one jitted post-processing (`ppo.ppo_postprocess`: terminal rewards, GAE
   over the critic's values, whitening); KL to the reference either in the reward (fixed or adaptive β) or in the
   loss;
7. then the loop's jitted train step (`train.make_train_step`, which calls this module; nothing here calls the
   loop) runs `epochs x minibatches` clipped-surrogate updates over the rollout, with the loss of `grpo.py` /
   `ppo.py`.

On several processes, steps 2-3 are each process's own: it samples, decodes and verifies its rows of the global
batch of prompts and contributes them (rewards included) as global arrays
(`jax.make_array_from_process_local_data`); what every process must agree on (which groups are informative, the
longest sample for the FLOPs) is read from small replicated arrays, and steps 4-6 run on the global arrays (one
jitted post-processing), so no completion crosses to another host. A row's sampling key is its global row index:
one process and several draw the same samples.

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

from jaxstages.apply import make_apply
from jaxstages.config import ConfigError, check_keys, from_config
from jaxstages.data import tasks
from jaxstages.evaluation import EvalConfig, evaluate as run_eval, kl_drift_fn
from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import KL_ESTIMATORS, token_log_probs
from jaxstages.model.config import check_positions
from jaxstages.model.io import load_model
from jaxstages.rewards import Verdict, format_ok, mixed_reward, verify
from jaxstages.sampling import SamplingConfig, completion_rows, sample, stop_ids, strip_stop, unpad_prompts
from jaxstages.sharding import (batch_sharding, global_batch_from_process_local, local_rows, replicate_to_host,
                                shard_batch)
from jaxstages.stages.grpo import (ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, Clip, PolicyLossConfig, completion_logits,
                                   grpo_loss_fn)
from jaxstages.stages.objective import Objective
from jaxstages.stages.ppo import ppo_loss_fn, ppo_postprocess, values_fn

REWARDS = ("outcome", "process", "mixed", "strict")
# each advantage estimator's default for `scale_rewards` (its published form): GRPO divides by the group std,
# REINFORCE++ by the batch std, RLOO's leave-one-out baseline is used unscaled (`grpo.rloo_advantages`)
SCALE_REWARDS = {"grpo": True, "rloo": False, "reinforce++": True}
# each policy loss's default clip range (low, high): PPO's token ratio ±0.2; GSPO's sequence ratio (Zheng et al. 2025)
CLIP_RANGES = {"ppo_clip": (0.2, 0.2), "gspo": (3e-4, 4e-4)}
GSPO_MAX_CLIP = 0.01  # a GSPO clip range this wide is a token-level range by mistake
KL_PLACEMENTS = ("loss", "reward")
TIS_LEVELS = ("none", "token", "sequence")
CRITICS = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The `grpo` (or `ppo`) block of an RL stage. The data block (kind `rl`) gives B = `data.batch_size` prompts per
  step and their op range; each step samples `group_size` completions of each.

  PPO-only keys (`gamma`, `lam`, `value_coef`, `value_clip`, `critic`, `whiten_advantages`) are ignored by GRPO."""

  # rollout
  group_size: int = 8  # G samples per prompt
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  rollout_dtype: str = ""  # e.g. "bfloat16": sample with params rounded to it (the update stays in full precision)
  # rewards
  reward: str = "outcome"  # outcome | process | mixed ([α·outcome + (1−α)·process]·1[outcome]) | strict
  process_alpha: float = 0.5  # the mix's α
  format_weight: float = 0.0  # + weight · 1[one answer line at the end]
  overlong_buffer: int = 0  # DAPO soft overlong penalty: ramps to −overlong_penalty over the last N allowed tokens
  overlong_penalty: float = 1.0
  mask_truncated: bool = False  # completions that hit max_new_tokens without stopping are left out of the loss
  # groups
  dynamic_sampling: bool = False  # drop groups whose rewards are all equal, refill from more prompts
  max_sampling_rounds: int = 4
  # advantages and loss
  advantage: str = ""  # grpo | rloo | reinforce++ (GRPO; default grpo) | gae (PPO's only)
  # divide by the std (of the group; REINFORCE++: of the batch). None: the estimator's own default
  # (`SCALE_REWARDS`: GRPO and REINFORCE++ scale, RLOO does not; Dr.GRPO: False)
  scale_rewards: bool | None = None
  policy_loss: str = "ppo_clip"  # ppo_clip | gspo
  loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
  # the importance ratio's clip range [1 - clip_low, 1 + clip_high]. None: the policy loss's own (`CLIP_RANGES`:
  # ppo_clip's token ratio 0.2 / 0.2, DAPO's clip-higher 0.28 above; GSPO's sequence ratio 3e-4 / 4e-4)
  clip_low: float | None = None
  clip_high: float | None = None
  dual_clip: float = 0.0  # > 1: dual-clip PPO's c (e.g. 3); 0: off
  entropy_coef: float = 0.0
  # KL to the reference (the stage's starting params unless `reference` names a model); β = 0: no reference at all
  kl_coef: float = 0.0
  kl_placement: str = "loss"  # loss | reward
  kl_estimator: str = "k3"  # k1 | k2 | k3 | k3+ (k3's value with k2's gradient)
  kl_target: float = 0.0  # > 0 (reward placement): adaptive β toward this KL per sequence (Ziegler et al. 2019)
  kl_horizon: int = 10_000  # the adaptive controller's horizon, in sequences
  reference: str = ""
  # the updates
  epochs: int = 1  # passes over each rollout
  minibatches: int = 1  # optimizer updates per pass
  # old log-probs from a trainer forward instead of the sampler's; required with top_k / top_p, whose sampler
  # log-probs are of the truncated distribution, not of the policy the trainer's log-probs are of
  recompute_old_logprobs: bool = False
  tis: str = "none"  # truncated importance sampling of trainer/sampler mismatch: none | token | sequence
  tis_cap: float = 2.0
  # PPO
  gamma: float = 1.0
  lam: float = 0.95
  value_coef: float = 0.5
  value_clip: float = 0.2  # 0: no value clipping
  whiten_advantages: bool = True
  critic: str = "separate"  # separate (its own trunk, from the policy's starting params) | shared (a head on the
  # policy's trunk)
  # held-out evaluation (greedy, strict) at every eval_every and at the end; 0: none
  eval_problems: int = 0
  # the KL of the policy from its starting params on this many held-out prompts (one sample each, max_new_tokens) at
  # every evaluation (`evaluation.kl_drift_fn`, as DPO's `dpo.drift_prompts`); 0: none
  drift_prompts: int = 0
  seed: int = 0

  def __post_init__(self):
    for key, allowed in (("reward", REWARDS), ("kl_placement", KL_PLACEMENTS), ("tis", TIS_LEVELS),
                         ("critic", CRITICS), ("policy_loss", POLICY_LOSSES), ("loss_agg", AGGREGATIONS),
                         ("kl_estimator", KL_ESTIMATORS), ("advantage", ("", *ADVANTAGES, "gae"))):
      check_keys([getattr(self, key)], allowed, f"rl {key}")
    if self.group_size < 1 or self.max_new_tokens < 1 or self.epochs < 1 or self.minibatches < 1:
      raise ConfigError("group_size, max_new_tokens, epochs and minibatches must be >= 1")
    if self.advantage in ("grpo", "rloo") and self.group_size < 2:
      raise ConfigError(f"advantage {self.advantage!r} compares samples of a group: group_size must be >= 2")
    if self.tis != "none" and not self.recompute_old_logprobs:
      raise ConfigError("tis corrects the sampler's log-probs toward the trainer's: set recompute_old_logprobs")
    if self.kl_target and self.kl_placement != "reward":
      raise ConfigError("an adaptive KL coefficient (kl_target) applies to kl_placement='reward'")
    if self.dual_clip and self.dual_clip <= 1:
      raise ConfigError(f"dual_clip must be > 1 (or 0 to switch it off), got {self.dual_clip}")
    if self.rollout_dtype and self.rollout_dtype not in ("bfloat16", "float16", "float32"):
      raise ConfigError(f"rollout_dtype {self.rollout_dtype!r} is not one of bfloat16, float16, float32")
    if (self.top_k or self.top_p < 1) and not self.recompute_old_logprobs:
      raise ConfigError(
          f"top_k={self.top_k} / top_p={self.top_p} sample from a truncated distribution, so the sampler's log-probs "
          "are not the policy's the trainer computes and the importance ratio would be biased at the first update; "
          "set recompute_old_logprobs=True (and tis='token' to correct for the truncation), or sample untruncated")
    low, high = self.clip_range
    if self.policy_loss == "gspo" and max(low, high) >= GSPO_MAX_CLIP:
      raise ConfigError(
          f"policy_loss 'gspo' clips one ratio per sequence, the geometric mean of its token ratios, which stays "
          f"within ~1e-3 of 1: clip_low={low} / clip_high={high} (a token-level range) would never clip it. Use "
          f"GSPO's own range (~3e-4 / 4e-4, the default when unset), below {GSPO_MAX_CLIP}")

  @property
  def clip_range(self) -> tuple[float, float]:
    """(low, high): the configured clip range, or the policy loss's own where unset."""
    low, high = CLIP_RANGES[self.policy_loss]
    return (low if self.clip_low is None else self.clip_low, high if self.clip_high is None else self.clip_high)

  @property
  def scale_std(self) -> bool:
    """Whether the advantage estimator divides by the std: as configured, or the estimator's own default."""
    return SCALE_REWARDS.get(self.advantage or "grpo", True) if self.scale_rewards is None else self.scale_rewards

  def policy_loss_config(self, with_kl: bool = True) -> PolicyLossConfig:
    return PolicyLossConfig(
        policy_loss=self.policy_loss, clip=Clip(*self.clip_range, self.dual_clip),
        loss_agg=self.loss_agg, norm_length=float(self.max_new_tokens), temperature=self.temperature,
        kl_coef=self.kl_coef if with_kl and self.kl_placement == "loss" else 0.0, kl_estimator=self.kl_estimator,
        entropy_coef=self.entropy_coef, tis=self.tis, tis_cap=self.tis_cap)


def rl_config(block: Mapping, kind: str) -> RLConfig:
  """The stage's RL block, with the kind's default advantage (`grpo`, or `gae` for PPO)."""
  values = dict(block or {})
  if not values.get("advantage"):
    values["advantage"] = "gae" if kind == "ppo" else "grpo"
  cfg = from_config(RLConfig, values, where=f"{kind} config")
  if (cfg.advantage == "gae") != (kind == "ppo"):
    raise ConfigError(f"advantage {cfg.advantage!r} does not fit stage kind {kind!r}: GAE needs PPO's critic, and "
                      "PPO's advantages are GAE")
  return cfg


# -- rewards ---------------------------------------------------------------------------------------------------------


def completion_reward(verdict: Verdict, text: str, length: int, truncated: bool, cfg: RLConfig) -> float:
  """The scalar reward of one completion (`length` generated tokens)."""
  base = {"outcome": float(verdict.outcome_correct), "process": verdict.process_score,
          "strict": float(verdict.strict_correct),
          "mixed": mixed_reward(verdict, cfg.process_alpha)}[cfg.reward]
  if cfg.format_weight:
    base += cfg.format_weight * float(format_ok(text))
  if cfg.overlong_buffer:
    # DAPO: 0 up to max_new - buffer tokens, then linearly down to -penalty at max_new (and past it: truncated)
    start = cfg.max_new_tokens - cfg.overlong_buffer
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


# -- the objective ---------------------------------------------------------------------------------------------------


def planned_rl_flops(model_cfg, data, cfg: RLConfig, kind: str) -> dict:
  """An RL step's FLOPs from the config: one prefill per prompt, decoding every sample to the token limit (an upper
  bound: `prepare` counts the decode steps the loop ran, which stops when a round's longest sample stops), the extra
  forward passes (recomputed old log-probs, the reference, the critic) and `epochs` training passes over prompt +
  completion (twice for a separate critic). Also the parts a measured step is made of: `prefill_flops` (one sampling
  round), `decode_flops_per_token`, `logprobs_flops`, `update_flops`; and `flops_per_step_min`, a step whose samples
  all stop after one token."""
  b, width, n_new = data.batch_size, data.prompt_len, cfg.max_new_tokens
  rows, seq = b * cfg.group_size, data.prompt_len + cfg.max_new_tokens - 1
  critic = 2.0 if kind == "ppo" and cfg.critic == "separate" else 1.0
  passes = int(cfg.recompute_old_logprobs) + int(cfg.kl_coef > 0) + int(kind == "ppo")
  parts = {"prefill_flops": forward_flops_per_token(model_cfg, width) * width * b,
           "decode_flops_per_token": forward_flops_per_token(model_cfg, seq),
           "logprobs_flops": passes * forward_flops_per_token(model_cfg, seq) * seq * rows,
           "update_flops": critic * cfg.epochs * train_flops_per_token(model_cfg, seq) * seq * rows}
  fixed = parts["prefill_flops"] + parts["logprobs_flops"] + parts["update_flops"]
  return {"tokens_per_step": rows * seq, "flops_per_step": fixed + parts["decode_flops_per_token"] * n_new * rows,
          "flops_per_step_min": fixed + parts["decode_flops_per_token"] * rows, **parts}


def policy_of(model: nnx.Module) -> nnx.Module:
  """The policy inside a stage's model (PPO's model also holds a critic)."""
  return getattr(model, "policy", model)


def policy_logprobs_fn(width: int, temperature: float) -> Callable:
  """`(model, rows) -> [rows, width]` float32 log-probs of the completion tokens under the (tempered) policy."""

  def fn(model, batch):
    logits, _ = policy_of(model)(batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = completion_logits(logits, width).astype(jnp.float32) / temperature
    return token_log_probs(logits, batch["targets"][:, -width:])

  return fn


ROW_KEYS = ("tokens", "positions", "segment_ids", "targets")  # a rollout's rows of prompt + completion


def update_keys(cfg: RLConfig, kind: str) -> list[str]:
  """The `[rows, max_new_tokens]` float32 entries the rollout's post-processing adds to `ROW_KEYS` for the update."""
  keys = ["mask", "old_logprobs", "advantages"] + (["sampler_logprobs"] if cfg.tis != "none" else [])
  keys += ["ref_logprobs"] if cfg.kl_coef > 0 and cfg.kl_placement == "loss" else []
  return keys + (["returns", "old_values"] if kind == "ppo" else [])


@jax.jit
def _round_params(params, like):
  return jax.tree.map(lambda x: x.astype(like.dtype).astype(x.dtype), params)


def rl_objective(ctx, block: Mapping, kind: str):
  """GRPO (`kind="grpo"`) or PPO (`kind="ppo"`) as an `Objective` of the shared train loop."""
  cfg = rl_config(block, kind)
  d = ctx.data
  tok = ctx.tokenizer
  b, g, n_new, width = d.batch_size, cfg.group_size, cfg.max_new_tokens, d.prompt_len
  check_positions(ctx.model_cfg, {"data.prompt_len": width, f"{kind}.max_new_tokens": n_new})
  rows_per_step = b * g
  plan = planned_rl_flops(ctx.model_cfg, d, cfg, kind)
  stops = stop_ids(tok, chat=d.prompt == "chat")
  scfg = SamplingConfig(max_new_tokens=n_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=g,
                        stop_tokens=stops, pad_id=tok.pad_id, prompt_buckets=(width,))
  params_sharding = ctx.params_sharding
  logprobs = make_apply(ctx.graphdef, policy_logprobs_fn(n_new, cfg.temperature), ctx.mesh, params_sharding,
                        ctx.rules, out_batch_sharded=True)
  critic_values = (make_apply(ctx.graphdef, values_fn(n_new), ctx.mesh, params_sharding, ctx.rules,
                              out_batch_sharded=True) if kind == "ppo" else None)

  # the reference: loaded (or copied from the starting params) only when β > 0
  reference = None
  if cfg.kl_coef > 0:
    ref_model = (load_model(cfg.reference, ctx.mesh, ctx.rules) if cfg.reference else
                 policy_of(nnx.merge(ctx.graphdef, jax.tree.map(jnp.copy, ctx.initial_params))))
    ref_graphdef, ref_params = nnx.split(ref_model)
    ref_fn = make_apply(ref_graphdef, policy_logprobs_fn(n_new, cfg.temperature), ctx.mesh,
                        jax.tree.map(lambda x: x.sharding, ref_params), ctx.rules, out_batch_sharded=True)
    reference = (ref_fn, ref_params)
  kl_control = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
  counters = {"reference_forwards": 0}
  last: dict[str, float] = {}
  clock: dict[str, float] = {}
  spent = {"flops": 0.0}  # FLOPs of the steps taken: sampling as executed, the passes and the updates

  def set_state(state: Mapping) -> None:
    kl_control.coef = float(state["kl_coef"])
    spent["flops"] = float(state.get("flops_spent", 0.0))
  sources = d.source_configs

  def problems_of(host: Mapping[str, np.ndarray]) -> list[tasks.Problem]:
    """The verifier's problems of a batch: (source, index) -> the problem the pipeline generated."""
    out = []
    for s, i in zip(host["source"], host["index"]):
      src = sources[int(s)]
      out.append(tasks.generate(src.task, src.seed, d.split, int(i)))
    return out

  def roll_out(params, batch, seed: int) -> dict:
    """One round: G samples of each of this process's prompts of `batch` (its rows of the global batch), decoded and
    verified here; returned as global `[B * G, ...]` arrays to which every process contributed its own rows."""
    host = {k: local_rows(batch[k]) for k in ("prompt_tokens", "prompt_mask", "source", "index", "valid")}
    prompts = unpad_prompts(host["prompt_tokens"], host["prompt_mask"])
    samples = sample(policy_of(nnx.merge(ctx.graphdef, params)), prompts, scfg, seed, ctx.mesh, ctx.rules).local()
    problems = problems_of(host)
    rewards, strict, outcome, truncated = [], [], [], []
    for r, tokens in enumerate(samples.completions()):
      body = strip_stop(tokens, stops)
      text = tok.decode(body)
      verdict = verify(problems[r // g], text)
      truncated.append(len(body) == len(tokens) >= n_new)  # hit the limit without a stop token
      rewards.append(completion_reward(verdict, text, len(tokens), truncated[-1], cfg))
      strict.append(verdict.strict_correct)
      outcome.append(verdict.outcome_correct)
    # rows of prompt + completion for the teacher-forced passes; [rows, T] arrays over the completion
    rows = completion_rows(prompts, samples, g, tok.pad_id, width=width)
    local = {**{k: rows[k] for k in ROW_KEYS}, "logprobs": samples.logprobs, "sample_mask": samples.mask,
             "forced": samples.forced, "lengths": samples.lengths, "reward": np.asarray(rewards, np.float32),
             "strict": np.asarray(strict, np.float32), "outcome": np.asarray(outcome, np.float32),
             "truncated": np.asarray(truncated, np.float32), "valid": np.repeat(host["valid"].astype(np.float32), g)}
    return global_batch_from_process_local(local, ctx.mesh, ctx.rules)

  batch_out_keys = update_keys(cfg, kind)

  def postprocess(ro, old_lp, ref_lp, values, kl_coef):
    """One jitted pass over the chosen rollout (global arrays): the trained-token mask, old / reference log-probs,
    KL, advantages (and PPO's values and returns), and the step's rollout metrics, reduced over every row."""
    valid = ro["valid"] > 0
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    pick = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n_valid  # mean over the valid rows
    mask = ro["sample_mask"] * (1.0 - ro["forced"]) * ro["valid"][:, None]
    if cfg.mask_truncated:
      mask = mask * (1.0 - ro["truncated"])[:, None]
    sampler_lp = ro["logprobs"]
    metrics = {}
    if old_lp is not None:
      old = old_lp * ro["sample_mask"]
      metrics["mismatch_abs_logprob"] = jnp.sum(jnp.abs(old - sampler_lp) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
      old = sampler_lp
    rewards = ro["reward"]
    out = {"mask": mask, "old_logprobs": old.astype(jnp.float32), "sampler_logprobs": sampler_lp.astype(jnp.float32)}
    token_rewards = jnp.zeros_like(mask)
    if ref_lp is not None:
      ref = ref_lp * ro["sample_mask"]
      kl_tokens = KL_ESTIMATORS[cfg.kl_estimator](old, ref) * mask
      kl_seq = kl_tokens.sum(-1)
      metrics["kl_ref_sequence"] = pick(kl_seq)
      if cfg.kl_placement == "loss":
        out["ref_logprobs"] = ref.astype(jnp.float32)
      else:
        token_rewards = token_rewards - kl_coef * kl_tokens
        rewards = rewards - kl_coef * kl_seq
    if kind == "ppo":
      values = values * mask
      adv, returns = ppo_postprocess(ro["reward"], token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                     whiten_advantages=cfg.whiten_advantages)
      out.update(advantages=adv, returns=returns, old_values=values)
      metrics["value_mean"] = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
      adv = ADVANTAGES[cfg.advantage](rewards.reshape(b, g), ro["valid"][::g], cfg.scale_std)
      out["advantages"] = jnp.repeat(adv.reshape(-1, 1), n_new, axis=1) * mask
    reward_mean = pick(ro["reward"])
    metrics.update(reward_mean=reward_mean, reward_std=jnp.sqrt(pick((ro["reward"] - reward_mean) ** 2)),
                   pass_rate=pick(ro["strict"]), outcome_rate=pick(ro["outcome"]),
                   hack_rate=pick(ro["outcome"] * (1 - ro["strict"])),
                   response_length=pick(ro["lengths"].astype(jnp.float32)), truncated_fraction=pick(ro["truncated"]))
    batch_sharded = lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(ctx.mesh, ctx.rules, x.ndim))
    replicated = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, PartitionSpec()))
    return ({k: batch_sharded(out[k].astype(jnp.float32)) for k in batch_out_keys},
            {k: replicated(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()})

  postprocess = jax.jit(postprocess)

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

  def prepare(state, batch, step: int, next_batch: Callable[[], dict]) -> dict:
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    # from the end of the previous step's rollout until its update has finished (dispatch may run it inline)
    t_update = t0 - clock.get("rollout_end", t0)
    params = state.params
    if cfg.rollout_dtype:
      params = _round_params(params, jnp.zeros((), cfg.rollout_dtype))
    rounds, flags, longest = [], [], []
    while True:
      seed = int(np.random.default_rng([cfg.seed, step, len(rounds), 0x524C]).integers(2**31))
      rounds.append(roll_out(params, batch, seed))
      ok, informative, most = replicate_to_host((*group_flags(rounds[-1]["reward"], rounds[-1]["valid"], g),
                                                 jnp.max(rounds[-1]["lengths"])), ctx.mesh)
      flags.append((ok, informative))
      longest.append(int(most))
      if not cfg.dynamic_sampling or len(rounds) >= cfg.max_sampling_rounds:
        break
      if sum(int(f.sum()) for _, f in flags) >= b:
        break
      batch = next_batch()
    chosen, kept, group_counts = select_groups(flags, b, cfg.dynamic_sampling)
    ro = rounds[0] if not cfg.dynamic_sampling else take_rows(rounds, chosen, kept)
    t_sample = time.perf_counter() - t0

    t1 = time.perf_counter()
    device_rows = {k: ro[k] for k in ROW_KEYS}
    old_lp = logprobs(state.params, device_rows) if cfg.recompute_old_logprobs else None
    ref_lp = None
    if reference is not None:
      ref_fn, ref_params = reference
      ref_lp = ref_fn(ref_params, device_rows)
      counters["reference_forwards"] += 1
    values = critic_values(state.params, device_rows) if kind == "ppo" else None
    kl_coef = kl_control.coef
    extra, rollout_metrics = postprocess(ro, old_lp, ref_lp, values, kl_coef)
    batch_out = {**device_rows, **extra}
    jax.block_until_ready(batch_out)
    host = {k: float(v) for k, v in rollout_metrics.items()}  # replicated: every process reads the same values
    if reference is not None and cfg.kl_placement == "reward":
      host["kl_coef"] = kl_coef
      kl_control.update(host["kl_ref_sequence"], rows_per_step)
    clock["rollout_end"] = time.perf_counter()
    t_logprobs = clock["rollout_end"] - t1

    # the decode loop runs every row until the round's longest sample stops: that is the compute spent
    decoded_tokens = sum(float(rows_per_step * most) for most in longest)
    last.clear()
    last.update(host, **group_counts, time_sampling_s=t_sample, time_logprobs_s=t_logprobs, time_update_s=t_update,
                reference_forwards=float(counters["reference_forwards"]),
                flops_sampling=plan["prefill_flops"] * len(rounds) + plan["decode_flops_per_token"] * decoded_tokens,
                flops_logprobs=plan["logprobs_flops"], flops_update=plan["update_flops"])
    spent["flops"] += last["flops_sampling"] + last["flops_logprobs"] + last["flops_update"]
    return batch_out

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
      flops_per_step=plan["flops_per_step"], host_metrics=lambda: dict(last),
      get_state=lambda: {"kl_coef": kl_control.coef, "flops_spent": spent["flops"]},
      set_state=set_state,
      minibatches=cfg.minibatches, epochs=cfg.epochs)
