"""The RL losses and passes take their log-probs, entropy and KL from hidden states in chunks (the path the LM loss
takes, `losses.hidden_token_log_probs`): equal to the full-logits ones in value and gradient, and no compiled RL
program (the update, the post-processing with its old / reference / critic forwards) holds `[rows, seq, vocab]`
float32 logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.model import create_model
from jaxstages.stages.grpo import PolicyLossConfig, grpo_loss_fn, policy_terms
from jaxstages.stages.ppo import ActorCritic, ValueHead, ppo_loss_fn
from jaxstages.stages.rl import rl_config, training_batch_fn

ROWS, WIDTH, T = 4, 6, 10  # rows, prompt width, completion width
SEQ = WIDTH + T - 1


def _rl_batch(vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (ROWS, SEQ + 1)).astype(np.int32)
  seg = np.ones((ROWS, SEQ), np.int32)
  seg[1, :2] = 0  # a left-padded prompt
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0) * seg
  mask = np.ones((ROWS, T), np.float32)
  mask[2, 6:] = 0  # a completion that stopped early
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=pos.astype(np.int32), segment_ids=seg,
              mask=mask, old_logprobs=(-2.0 + 0.3 * rng.normal(size=(ROWS, T))).astype(np.float32),
              ref_logprobs=(-2.0 + 0.3 * rng.normal(size=(ROWS, T))).astype(np.float32),
              advantages=rng.normal(size=(ROWS, T)).astype(np.float32) * mask,
              returns=rng.normal(size=(ROWS, T)).astype(np.float32), old_values=np.zeros((ROWS, T), np.float32))


LOSS = PolicyLossConfig(temperature=0.7, kl_coef=0.1, kl_estimator="k3+", entropy_coef=0.01, loss_agg="token-mean")


def _full_logits_loss(model, batch):
  """The reference: the policy loss from the full `[rows, seq, vocab]` logits (`grpo.policy_terms`)."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  return policy_terms(logits, batch, LOSS)


def _value_and_grad(loss_fn, model, batch):
  graphdef, state = nnx.split(model)

  def mean(state):
    total, count, aux = loss_fn(nnx.merge(graphdef, state), batch)
    return total / count, {k: s / c for k, (s, c) in aux.items()}

  return jax.jit(jax.value_and_grad(mean, has_aux=True))(state)


@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_rl_log_probs_entropy_and_kl_in_chunks_equal_full_logits(tiny_cfg, chunk):
  """GRPO's loss (clipped surrogate + β·KL with k3's value and k2's gradient − entropy bonus, tempered) from hidden
  states in chunks of 3 / 4 / 64 positions equals the full-logits loss: value, every aux metric (entropy, KL to the
  reference and to the old policy) and the gradient of every parameter, float32
  (measured at chunk 3: loss equal, aux metrics within 2e-6, gradients within 2e-8 absolute, 5e-7 relative to each
  tensor's norm)."""
  batch = {k: jnp.asarray(v) for k, v in _rl_batch(tiny_cfg.vocab_size).items()}
  model = create_model(tiny_cfg.replace(logits_chunk=chunk), seed=3)
  (loss, aux), grads = _value_and_grad(grpo_loss_fn(LOSS), model, batch)
  (want_loss, want_aux), want_grads = _value_and_grad(_full_logits_loss, model, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
  assert set(aux) == set(want_aux) and {"entropy", "kl_ref", "kl_old"} <= set(aux)
  for k in aux:
    np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-6, atol=1e-6, err_msg=k)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_ppo_loss_in_chunks_equals_full_logits(tiny_cfg):
  """PPO's loss (shared critic) in chunks against the same loss with one chunk of the whole sequence."""
  cfg = rl_config({"ppo": {"critic": "shared"}, "rollout": {"max_new_tokens": T},
                   "policy_loss": {"entropy_coef": 0.01}}, "ppo")
  batch = {k: jnp.asarray(v) for k, v in _rl_batch(tiny_cfg.vocab_size, seed=1).items()}

  def actor_critic(chunk):
    policy = create_model(tiny_cfg.replace(logits_chunk=chunk), seed=3)
    head = ValueHead(tiny_cfg.hidden_size, jnp.float32)
    head.w[...] = 0.1 * jnp.ones((tiny_cfg.hidden_size,))
    return ActorCritic(policy, None, head)

  (loss, aux), grads = _value_and_grad(ppo_loss_fn(cfg), actor_critic(3), batch)
  (want_loss, want_aux), want_grads = _value_and_grad(ppo_loss_fn(cfg), actor_critic(0), batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
  for k in aux:
    np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-6, atol=1e-6, err_msg=k)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _full_logits_shapes(hlo: str, vocab: int) -> set[str]:
  """float32 buffers `[rows, L, vocab]` with L the whole sequence or the whole completion."""
  return {m for m in re.findall(rf"f32\[\d+,(\d+),{vocab}\]", hlo) if int(m) in (SEQ, T)}


def test_compiled_rl_programs_hold_no_full_logits(tiny_cfg):
  """The update's gradient and the post-processing (old log-probs recomputed, the reference's, micro-batched) compile
  with at most `[rows, chunk, vocab]` float32 logits; the full-logits loss (the sanity check) has `[rows, seq,
  vocab]` ones."""
  vocab = 257  # no other dimension of the model is this size
  model = create_model(tiny_cfg.replace(vocab_size=vocab, logits_chunk=4), seed=3)
  graphdef, state = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in _rl_batch(vocab).items()}
  grad = lambda loss_fn: jax.jit(jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch)[0]))
  update = grad(grpo_loss_fn(LOSS)).lower(state).compile().as_text()
  assert not _full_logits_shapes(update, vocab)
  assert _full_logits_shapes(grad(_full_logits_loss).lower(state).compile().as_text(), vocab)  # the check works

  cfg = rl_config({"rollout": {"group_size": 2, "max_new_tokens": T}, "kl": {"coef": 0.1},
                   "policy_loss": {"recompute_old_logprobs": True}}, "grpo")
  post = training_batch_fn(cfg, "grpo", graphdef, graphdef, group=2, pad_id=0, micro_batches=2)
  rng = np.random.default_rng(0)
  rollout = dict(prompt_tokens=jnp.asarray(rng.integers(1, vocab, (ROWS, WIDTH)), jnp.int32),
                 prompt_mask=jnp.ones((ROWS, WIDTH), jnp.int32),
                 tokens=jnp.asarray(rng.integers(1, vocab, (ROWS, T)), jnp.int32),
                 logprobs=jnp.zeros((ROWS, T)), sample_mask=jnp.ones((ROWS, T)), forced=jnp.zeros((ROWS, T)),
                 lengths=jnp.full((ROWS,), T, jnp.int32),
                 **{k: jnp.ones((ROWS,)) for k in ("reward", "strict", "outcome", "valid")},
                 truncated=jnp.zeros((ROWS,)))
  compiled = jax.jit(post).lower(state, state, rollout, 0.0).compile()
  assert not _full_logits_shapes(compiled.as_text(), vocab)
  out, metrics = jax.jit(post)(state, state, rollout, 0.0)
  assert out["tokens"].shape == (ROWS, SEQ) and out["ref_logprobs"].shape == (ROWS, T)


def test_plan_sizes_a_grpo_stage_without_full_logits():
  """`jaxstages plan` on a GRPO stage compiles the update and the log-prob pass (here with a reference in the loss
  and recomputed old log-probs) on a simulated fsdp mesh: both have memory figures and their float32 vocabulary-wide
  buffers are chunks of positions, never a whole sequence or completion."""
  from jaxstages.config import apply_overrides, load_config
  from jaxstages.train import plan_stage

  cfg = apply_overrides(load_config("configs/train.py:grpo-toy"), [
      "data.batch_size=8", "grpo.rollout.group_size=2", "grpo.rollout.max_new_tokens=16", "grpo.kl.coef=0.01",
      "grpo.policy_loss.recompute_old_logprobs=True", "model.logits_chunk=8", "mesh.data=1", "mesh.fsdp=8",
      "stage.micro_batches=2"])
  plan = plan_stage(cfg)
  assert plan["memory_per_device_bytes"]["peak_estimate"] > 0
  assert plan["logprobs_memory_per_device_bytes"]["peak_estimate"] > 0
  seq = cfg.data.prompt_len + 16 - 1
  for key in ("update_vocab_buffers", "logprobs_vocab_buffers"):
    lengths = {int(s[4:-1].split(",")[1]) for s in plan[key] if s.count(",") == 2}
    assert lengths and lengths <= {8}, (key, plan[key], seq)
