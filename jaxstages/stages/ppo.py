"""PPO with a learned critic: the value model, GAE and the clipped value loss. The rollout is `rl.py`'s; the policy
loss is `grpo.policy_loss_terms` (the same clipped surrogate) with GAE advantages.

The stage trains one module, `ActorCritic`: the policy (the loaded model, unchanged) and either a separate critic
(its own trunk, started from the policy's starting params, plus a value head) or only a value head on the policy's
trunk (`critic="shared"`: one forward pass gives both). Its checkpoints hold both, the policy as its own subtree
(`policy`): `jaxstages.model.io.load_model` hands a later stage the policy alone, reading only that subtree.

A rollout's advantages and value targets come from one jitted function, `ppo_postprocess`: each completion's reward
at its last trained token, GAE over the critic's values, whitening. It is compiled once per rollout shape.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxstages.sharding import param_shardings
from jaxstages.stages.grpo import AGGREGATIONS, completion_log_probs, policy_loss_terms


class ValueHead(nnx.Module):
  """`[batch, seq, embed]` hidden states -> `[batch, seq]` float32 values; starts at zero (an uninformed baseline)."""

  def __init__(self, hidden_size: int, dtype):
    self.w = nnx.Param(jnp.zeros((hidden_size,), dtype), logical_axes=("embed",))
    self.b = nnx.Param(jnp.zeros((), dtype), logical_axes=())

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return (jnp.einsum("bte,e->bt", hidden.astype(jnp.float32), self.w[...].astype(jnp.float32))
            + self.b[...].astype(jnp.float32))


class ActorCritic(nnx.Module):
  """The policy and its critic. `critic_trunk` None: the value head reads the policy's own hidden states."""

  def __init__(self, policy: nnx.Module, critic_trunk: nnx.Module | None, head: ValueHead):
    self.policy = policy
    self.critic_trunk = critic_trunk
    self.value_head = head

  def hidden_and_values(self, tokens, positions, segment_ids) -> tuple[jax.Array, jax.Array]:
    """The policy's final hidden states `[batch, seq, embed]` (its log-probs come from them in chunks,
    `grpo.completion_log_probs`) and values `[batch, seq]` (the value of the state after each token)."""
    hidden, _ = self.policy.hidden_states(tokens, positions, segment_ids)
    critic_hidden = hidden
    if self.critic_trunk is not None:
      critic_hidden, _ = self.critic_trunk.hidden_states(tokens, positions, segment_ids)
    return hidden, self.value_head(critic_hidden)

  def values(self, tokens, positions, segment_ids) -> jax.Array:
    """Values `[batch, seq]` alone (a separate critic runs only its own trunk)."""
    trunk = self.critic_trunk if self.critic_trunk is not None else self.policy
    hidden, _ = trunk.hidden_states(tokens, positions, segment_ids)
    return self.value_head(hidden)


def actor_critic(policy: nnx.Module, cfg, mesh, rules) -> ActorCritic:
  """Wraps the stage's starting policy with a critic per `cfg.critic`; on `mesh`, the new params are laid out by
  the rules (`mesh=None`: abstract use under `nnx.eval_shape`)."""
  dtype = policy.embed[...].dtype
  trunk = None
  if cfg.critic == "separate":
    graphdef, state = nnx.split(policy)
    trunk = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # a copy keeps each parameter's sharding
  make_head = lambda: ValueHead(policy.cfg.hidden_size, dtype)
  if mesh is None:
    return ActorCritic(policy, trunk, make_head())
  # the new head is created by jit straight into its sharding (on several processes a host array cannot be placed)
  graphdef, abstract = nnx.split(nnx.eval_shape(make_head))
  head = jax.jit(lambda: nnx.state(make_head()), out_shardings=param_shardings(abstract, mesh, rules))()
  return ActorCritic(policy, trunk, nnx.merge(graphdef, head))


def values_fn(width: int):
  """`(model, rows) -> [rows, width]` values at the positions that predict the completion tokens: entry t is the
  value of the state before completion token t."""

  def fn(model: ActorCritic, batch):
    values = model.values(batch["tokens"], batch["positions"], batch["segment_ids"])
    return values[:, values.shape[1] - width:]

  return fn


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over completion tokens (Schulman et al. 2016), `[rows, T]` each:
  `δ_t = r_t + γ V_{t+1} − V_t` (V after the last token is 0), `A_t = δ_t + γλ A_{t+1}`, returns `A + V`.
  Positions where `mask` is 0 are skipped (they carry no reward and pass nothing back)."""
  chex.assert_equal_shape([rewards, values, mask])
  rewards, values, mask = (x.astype(jnp.float32) for x in (rewards, values, mask))

  def back(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    # a masked position hands its successor's values back unchanged
    return (jnp.where(m > 0, v, next_value), jnp.where(m > 0, adv, next_adv)), adv * m

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def terminal_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """Each completion's reward `[rows]` placed on its last trained token `[rows, T]` (the last position where `mask`
  is 1; a row's mask may have gaps, e.g. tokens forced by a thinking budget, so this is not `mask.sum() - 1`). Rows
  with nothing to train get nothing."""
  chex.assert_rank([rewards, mask], [1, 2])
  t = mask.shape[1]
  trained = mask > 0
  last = t - 1 - jnp.argmax(trained[:, ::-1], axis=1)  # argmax finds the first trained position from the end
  at_last = jnp.arange(t)[None, :] == last[:, None]
  return jnp.where(at_last & jnp.any(trained, axis=1, keepdims=True), rewards.astype(jnp.float32)[:, None], 0.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """`(x − mean) / std` over the masked entries (population std), 0 elsewhere."""
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(x * mask) / n
  std = jnp.sqrt(jnp.sum((x - mean) ** 2 * mask) / n)
  return (x - mean) / (std + eps) * mask


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten_advantages"))
def ppo_postprocess(rewards: jax.Array, token_rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                    lam: float, whiten_advantages: bool) -> tuple[jax.Array, jax.Array]:
  """A PPO rollout's (advantages, returns), `[rows, T]` each, in one jitted call: the completions' rewards `[rows]`
  on their last trained tokens added to the per-token rewards (e.g. −β·KL) `[rows, T]`, GAE over the critic's
  `values [rows, T]`, advantages optionally whitened over the trained tokens and zero elsewhere."""
  mask = mask.astype(jnp.float32)
  per_token = token_rewards.astype(jnp.float32) + terminal_rewards(rewards, mask)
  adv, returns = gae(per_token, values, mask, gamma, lam)
  if whiten_advantages:
    adv = whiten(adv, mask)
  return adv * mask, returns


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float) -> jax.Array:
  """`½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)` per token (`clip=0`: the plain squared error)."""
  loss = (values - returns) ** 2
  if clip:
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = jnp.maximum(loss, (clipped - returns) ** 2)
  return 0.5 * loss


def ppo_loss_fn(cfg):
  """PPO's loss `(ActorCritic, batch) -> (sum, count, aux)` (`cfg`: `rl.RLConfig`): the clipped surrogate of
  `grpo.policy_loss_terms` (log-probs in chunks from the policy's hidden states) plus
  `value_coef` times the clipped value loss, aggregated the same way. batch adds `returns` and `old_values`
  `[rows, T]` to the GRPO rollout arrays."""
  policy_cfg, ppo = cfg.policy_loss_config(), cfg.ppo

  def loss(model: ActorCritic, batch):
    hidden, values = model.hidden_and_values(batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["mask"].astype(jnp.float32)
    width = mask.shape[1]
    values = values[:, values.shape[1] - width:]
    v_loss = clipped_value_loss(values, batch["old_values"], batch["returns"], ppo.value_clip)
    stats = completion_log_probs(model.policy, hidden, batch["targets"], width, policy_cfg.temperature,
                                 policy_cfg.uses_entropy)
    logp, ent = stats if policy_cfg.uses_entropy else (stats, None)
    total, count, aux = policy_loss_terms(logp, ent, batch, policy_cfg)
    v_total, _ = AGGREGATIONS[policy_cfg.loss_agg](ppo.value_coef * v_loss, mask, policy_cfg.norm_length)
    tokens = jnp.sum(mask)
    aux["value_loss"] = (jnp.sum(jax.lax.stop_gradient(v_loss) * mask), tokens)
    if ppo.value_clip:
      aux["value_clip_fraction"] = (jnp.sum((jnp.abs(values - batch["old_values"]) > ppo.value_clip) * mask), tokens)
    return total + v_total, count, aux

  return loss

