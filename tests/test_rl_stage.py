"""The RL stage (GRPO / PPO) on the committed toy SFT model: the rollout's log-probs against the trainer's, the
REINFORCE gradient, the reference model only when β > 0, dynamic sampling, PPO's rollout, and the loss's invariance
to micro-batches and meshes for every aggregation mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstages.config import apply_overrides, load_config
from jaxstages.data.pipeline import make_pipeline
from jaxstages.model import create_model
from jaxstages.sharding import MeshConfig, global_batch_from_process_local, make_mesh, shard_batch
from jaxstages.stages.grpo import ADVANTAGES, AGGREGATIONS, Clip, PolicyLossConfig, policy_terms
from jaxstages.stages.rl import planned_rl_flops, policy_logprobs_fn, rl_config
from jaxstages.state import init_train_state
from jaxstages.train import build_stage, make_train_step

# 8 prompts x 4 samples of op-1 problems from the committed SFT model; no held-out evaluation
SMALL_RL = ["data.batch_size=8", "grpo.rollout.group_size=4", "grpo.rollout.max_new_tokens=32", "grpo.eval_problems=0"]


def _build(tmp_path, kind="grpo", *overrides):
  cfg = apply_overrides(load_config(f"configs/train.py:{kind}-toy"),
                        [o.replace("grpo.", f"{kind}.") for o in SMALL_RL] + list(overrides))
  return build_stage(cfg, tmp_path)


def _prepared(built, step=0):
  """The objective's rollout batch for `step`, and its host metrics."""
  it = make_pipeline(built.data, built.tokenizer)
  next_batch = lambda: global_batch_from_process_local(next(it), built.mesh, built.rules)
  batch = built.objective.prepare(built.state, next_batch(), step, next_batch)
  return batch, built.objective.host_metrics()


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
  built = _build(tmp_path_factory.mktemp("grpo"), "grpo", "grpo.minibatches=2")
  batch, metrics = _prepared(built)
  return built, batch, metrics


def test_sampler_log_probs_equal_the_trainers_and_the_gradient_is_reinforce(grpo):
  """Before any update the importance ratio is 1 to 1e-5 on every trained token (the sampler's KV-cached decode
  and the trainer's full forward agree), and the clipped loss's gradient is the REINFORCE gradient
  −Σ A ∇log π / tokens with the same advantages."""
  built, batch, metrics = grpo
  mask = np.asarray(batch["mask"])
  assert mask.sum() > 50 and metrics["reference_forwards"] == 0 and "ref_logprobs" not in batch
  width = mask.shape[1]
  logp_fn = jax.jit(lambda p, b: policy_logprobs_fn(width, 1.0)(nnx.merge(built.graphdef, p), b))
  logp = np.asarray(logp_fn(built.state.params, batch))
  ratio = np.exp(logp - np.asarray(batch["old_logprobs"]))
  assert np.abs(ratio - 1)[mask > 0].max() <= 1e-5

  adv = np.asarray(batch["advantages"])
  assert np.abs(adv).max() > 0.1  # some groups have both right and wrong samples
  # the FLOPs spent so far (saved with checkpoints) are this step's measured ones, within the config's plan; the
  # decode loop ran every row until the longest sample stopped
  plan = planned_rl_flops(built.model_cfg, built.data, rl_config(built.config["grpo"], "grpo"), "grpo")
  decoded = mask.shape[0] * mask.sum(1).max()
  assert metrics["flops_sampling"] == pytest.approx(plan["prefill_flops"] + plan["decode_flops_per_token"] * decoded)
  spent = built.objective.get_state()["flops_spent"]
  assert spent == metrics["flops_sampling"] + metrics["flops_logprobs"] + metrics["flops_update"]
  assert 0.5 * built.objective.flops_per_step < spent <= built.objective.flops_per_step

  def clipped(params):
    total, count, _ = built.objective.loss(nnx.merge(built.graphdef, params), batch)
    return total / count

  def reinforce(params):
    lp = policy_logprobs_fn(width, 1.0)(nnx.merge(built.graphdef, params), batch)
    return -jnp.sum(batch["advantages"] * lp * batch["mask"]) / jnp.sum(batch["mask"])

  g_loss, g_ref = jax.jit(jax.grad(clipped))(built.state.params), jax.jit(jax.grad(reinforce))(built.state.params)
  for a, b in zip(jax.tree.leaves(g_loss), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)

  # the train step's first of its two minibatch updates sees the sampling params too
  state, step_metrics = built.train_step()(jax.tree.map(jnp.copy, built.state), batch)
  assert float(step_metrics["abs_log_ratio_first"]) <= 1e-5 and abs(float(step_metrics["ratio_first"]) - 1) <= 1e-5
  assert float(step_metrics["abs_log_ratio"]) > float(step_metrics["abs_log_ratio_first"])  # the second one moved
  assert int(state.step) == 1


def test_reference_model_only_when_kl_is_on(tmp_path, grpo):
  """β = 0 (the fixture): no reference forward ran and none is in the batch; β > 0: one reference forward per step,
  its log-probs equal the starting policy's (the reference is a copy of the start)."""
  built = _build(tmp_path, "grpo", "grpo.kl.coef=0.01")
  batch, metrics = _prepared(built)
  assert metrics["reference_forwards"] == 1
  np.testing.assert_allclose(np.asarray(batch["ref_logprobs"]) * np.asarray(batch["mask"]),
                             np.asarray(batch["old_logprobs"]) * np.asarray(batch["mask"]), atol=1e-5)


def test_dynamic_sampling_drops_all_equal_groups_and_fills_the_batch(tmp_path, grpo):
  """With the same first round as the plain rollout (same seed, same params), dynamic sampling drops exactly the
  groups whose rewards are all equal, samples more prompts, and fills the batch with informative groups only."""
  _, _, plain = grpo
  built = _build(tmp_path, "grpo", "grpo.minibatches=2", "grpo.rollout.dynamic_sampling=True",
                 "grpo.rollout.max_sampling_rounds=6")
  batch, metrics = _prepared(built)
  b, g = built.data.batch_size, 4
  assert plain["zero_variance_groups"] > 0  # the first round has all-equal groups to drop
  assert metrics["zero_variance_groups"] == plain["zero_variance_groups"]  # the same first round
  assert metrics["sampling_rounds"] >= 2 and metrics["groups_filled"] == 0
  assert metrics["groups_dropped"] >= plain["zero_variance_groups"] * b
  adv = np.asarray(batch["advantages"]).reshape(b, g, -1)
  assert (np.abs(adv).reshape(b, -1).max(axis=1) > 0).all()  # every kept group carries a learning signal


@pytest.fixture(scope="module")
def ppo(tmp_path_factory):
  """A PPO stage (shared critic, λ = 1) and its first rollout."""
  built = _build(tmp_path_factory.mktemp("ppo"), "ppo", "ppo.ppo.critic='shared'", "ppo.ppo.lam=1.0")
  batch, metrics = _prepared(built)
  return built, batch, metrics


def test_ppo_rollout_has_gae_advantages_and_value_targets(ppo):
  """PPO's rollout adds the critic's values and GAE returns; its first update's ratio is 1 and its loss includes
  the value loss (the critic starts at 0, so the returns are the rewards)."""
  built, batch, metrics = ppo
  mask = np.asarray(batch["mask"])
  np.testing.assert_array_equal(np.asarray(batch["old_values"]), 0.0)  # a zero-initialised value head
  returns = np.asarray(batch["returns"])
  # γ = λ = 1: with zero values every trained token's return is the completion's reward (per-token KL off)
  rows_reward = returns[:, 0]
  assert ((returns == rows_reward[:, None]) | (mask == 0)).all()
  assert set(np.unique(rows_reward[mask.sum(1) > 0])) <= {0.0, 1.0}
  _, step_metrics = built.train_step()(jax.tree.map(jnp.copy, built.state), batch)
  assert float(step_metrics["value_loss"]) > 0 and abs(float(step_metrics["ratio"]) - 1) <= 1e-5


def test_a_ppo_rollout_after_the_first_compiles_nothing(ppo):
  """The second step's rollout (sampling, the critic's values, GAE and whitening) runs on what the first one
  compiled: GAE outside jit used to be traced and compiled again at every step."""
  built, _, _ = ppo
  traces = []
  listener = lambda event, duration, **kw: traces.append(event) if event.endswith("jaxpr_trace_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    _prepared(built, step=1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert traces == []


def test_rloo_is_unscaled_by_default_in_the_rl_stage(tmp_path, monkeypatch):
  """Each advantage estimator's std scaling defaults to its own published form in the stage too: RLOO's
  leave-one-out baseline unscaled (as `rloo_advantages` defaults), GRPO's divided by the group std; an explicit
  `scale_rewards` wins."""
  import inspect

  from jaxstages.stages import rl

  for name, fn in ADVANTAGES.items():
    assert rl.SCALE_REWARDS[name] == inspect.signature(fn).parameters["scale_std"].default, name
  calls = []

  def spy(name):
    def estimator(rewards, valid, scale):
      calls.append((name, scale))
      return ADVANTAGES[name](rewards, valid, scale)
    return estimator

  monkeypatch.setattr(rl, "ADVANTAGES", {name: spy(name) for name in ADVANTAGES})
  for overrides in (["grpo.advantage.estimator='rloo'"], ["grpo.advantage.estimator='grpo'"],
                    ["grpo.advantage.estimator='rloo'", "grpo.advantage.scale_rewards=True"]):
    _prepared(_build(tmp_path / str(len(calls)), "grpo", "grpo.rollout.group_size=2", *overrides))
  assert calls == [("rloo", False), ("grpo", True), ("rloo", True)]


def test_the_lr_schedule_of_a_flop_budget_spans_the_steps_it_buys(tmp_path):
  """A stage that ends on a FLOP budget (RL in a pipeline: `stage.steps` is a cap, the most steps the budget could
  buy) sizes its learning-rate schedule by the steps the budget buys at the planned FLOPs per step: warm-up and
  cosine decay over those 10 steps, not over the cap's 100 (the decay reaches its end at step 10)."""
  from jaxstages.data.pipeline import data_config
  from jaxstages.data.tokenizer import load_tokenizer
  from jaxstages.model.config import stage_model_config
  from jaxstages.stages import planned_step

  cfg = apply_overrides(load_config("configs/train.py:grpo-toy"), SMALL_RL)
  model_cfg = stage_model_config(cfg.model, load_tokenizer("experiments/artifacts/toy-sft/tokenizer").vocab_size)
  per_step = planned_step("grpo", cfg.grpo, model_cfg, data_config(cfg.data))["flops_per_step"]
  built = _build(tmp_path, "grpo", f"stage.flops_budget={10 * per_step}", "stage.steps=100", "grpo.minibatches=2",
                 "optim.schedule='cosine'", "optim.warmup_fraction=0.1", "optim.lr=1e-3", "optim.end_lr_ratio=0.1")
  updates = 2  # per step
  assert float(built.schedule(2 * updates)) == pytest.approx(1e-3, rel=0.05)  # warm-up done after 1 step
  assert float(built.schedule(10 * updates)) == pytest.approx(1e-4, rel=1e-5)  # decayed by the 10th


def test_low_precision_rollouts_log_the_mismatch_and_recompute_old_log_probs(tmp_path):
  """Rollouts from bfloat16-rounded params with old log-probs recomputed by the trainer: the old log-probs are the
  trainer's (ratio exactly 1 at the first update), the sampler's are kept for truncated importance sampling, and
  their mismatch is logged (and is what bfloat16 rounding makes it: small but not zero)."""
  built = _build(tmp_path, "grpo", "grpo.rollout.dtype='bfloat16'", "grpo.policy_loss.recompute_old_logprobs=True",
                 "grpo.policy_loss.tis='token'", "grpo.policy_loss.tis_cap=2.0")
  batch, metrics = _prepared(built)
  mask = np.asarray(batch["mask"])
  width = mask.shape[1]
  logp = np.asarray(jax.jit(lambda p, b: policy_logprobs_fn(width, 1.0)(nnx.merge(built.graphdef, p), b))(
      built.state.params, batch))
  np.testing.assert_allclose((logp * mask), np.asarray(batch["old_logprobs"]) * mask, atol=1e-6)
  gap = np.abs(np.asarray(batch["old_logprobs"]) - np.asarray(batch["sampler_logprobs"]))[mask > 0]
  assert 1e-4 < metrics["mismatch_abs_logprob"] < 0.5
  np.testing.assert_allclose(metrics["mismatch_abs_logprob"], gap.mean(), rtol=1e-5)


# -- invariance of the loss to micro-batches and meshes ------------------------------------------------------------


def _unequal_rollout(cfg, rows=16, prompt=6, width=24, seed=0):
  """A synthetic rollout with very unequal completion lengths (1 to 24 tokens), ratios away from 1 and both signs
  of advantage."""
  rng = np.random.default_rng(seed)
  seq = prompt + width - 1
  lengths = np.asarray([1, 24, 3, 17, 2, 24, 9, 1, 5, 1, 24, 12, 1, 2, 20, 7])[:rows]
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
  return dict(tokens=rng.integers(1, cfg.vocab_size, (rows, seq)).astype(np.int32),
              targets=rng.integers(1, cfg.vocab_size, (rows, seq)).astype(np.int32),
              positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
              segment_ids=np.ones((rows, seq), np.int32), mask=mask,
              old_logprobs=(np.log(1.0 / cfg.vocab_size) + rng.normal(0, 0.3, (rows, width))).astype(np.float32),
              ref_logprobs=(np.log(1.0 / cfg.vocab_size) + rng.normal(0, 0.3, (rows, width))).astype(np.float32),
              advantages=np.repeat(rng.normal(0, 1, (rows, 1)), width, 1).astype(np.float32) * mask)


def test_rl_loss_is_identical_across_micro_batches_and_meshes(tiny_cfg, devices):
  """For every loss aggregation, the gradient (read from an SGD update with lr 1) and the loss are the same, to 1e-5
  relative, on one device without micro-batches as on 8-device meshes with 2 or 4 micro-batches, on a batch whose
  completions range from 1 to 24 tokens (KL in the loss, entropy bonus and dual clipping on). One compiled step per
  mesh serves all four modes: the batch's `mode` column picks the aggregation."""
  cfg = tiny_cfg.replace(init_std=0.2)
  host = _unequal_rollout(cfg)
  modes = [PolicyLossConfig(clip=Clip(0.2, 0.28, 3.0), loss_agg=agg, norm_length=24.0, kl_coef=0.1,
                            kl_estimator="k3", entropy_coef=0.01) for agg in AGGREGATIONS]

  def loss(model, batch):
    logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    outs = [policy_terms(logits, batch, m) for m in modes]
    k = batch["mode"][0]
    return jnp.stack([o[0] for o in outs])[k], jnp.stack([o[1] for o in outs])[k], {}

  results = {}
  for mesh_cfg, devs, micro in ((MeshConfig(1, 1, 1), devices[:1], 1), (MeshConfig(2, 2, 2), devices, 2),
                                (MeshConfig(2, 1, 4), devices, 4)):
    mesh = make_mesh(mesh_cfg, devs)
    graphdef, state, shardings = init_train_state(create_model(cfg, 0, mesh), optax.sgd(1.0), mesh)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = make_train_step(graphdef, optax.sgd(1.0), loss, mesh, shardings, micro_batches=micro)
    for k in range(len(modes)):
      batch = shard_batch({**host, "mode": np.full((len(host["mask"]),), k, np.int32)}, mesh)
      new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
      grads = [b - np.asarray(a) for a, b in zip(jax.tree.leaves(new_state.params), before)]
      results.setdefault(k, []).append((float(metrics["loss"]), grads))
  for k, ((loss0, grads0), *rest) in results.items():
    assert max(np.abs(g).max() for g in grads0) > 1e-3
    for loss_i, grads_i in rest:
      np.testing.assert_allclose(loss_i, loss0, rtol=1e-5, err_msg=modes[k].loss_agg)
      for a, b in zip(grads_i, grads0):  # relative to each gradient tensor's norm
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-9, modes[k].loss_agg


def test_rl_config_errors(tmp_path):
  from jaxstages.config import ConfigError
  from jaxstages.stages.rl import rl_config

  with pytest.raises(ConfigError, match="'tokn-mean'.*'token-mean'"):
    rl_config({"policy_loss": {"loss_agg": "tokn-mean"}}, "grpo")
  with pytest.raises(ConfigError, match="recompute_old_logprobs"):
    rl_config({"policy_loss": {"tis": "token"}}, "grpo")
  with pytest.raises(ConfigError, match="GAE"):
    rl_config({"advantage": {"estimator": "gae"}}, "grpo")
  assert rl_config({}, "ppo").advantage.estimator == "gae"
  assert dataclasses.asdict(rl_config({}, "grpo"))["advantage"]["estimator"] == "grpo"


def test_old_flat_rl_keys_name_their_new_place():
  """The RL block's keys from before its sub-blocks fail in one line that names the key's new place."""
  from jaxstages.config import ConfigError
  from jaxstages.stages.rl import MOVED_KEYS, rl_config

  for old, new in (("kl_coef", "kl.coef"), ("group_size", "rollout.group_size"), ("reward", "reward.score"),
                   ("advantage", "advantage.estimator"), ("critic", "ppo.critic"),
                   ("loss_agg", "policy_loss.loss_agg")):
    assert MOVED_KEYS[old] == new
    with pytest.raises(ConfigError, match=f"^grpo.{old} is now grpo.{new}$"):
      rl_config({old: 1}, "grpo")
    with pytest.raises(ConfigError, match=f"^ppo.{old} is now ppo.{new}$"):  # on the command line too
      apply_overrides(load_config("configs/train.py:ppo-toy"), [f"ppo.{old}=1"])


def test_truncated_sampling_needs_old_log_probs_from_the_trainer():
  """top-k / top-p sample from a truncated distribution: its log-probs (the sampler's) are not the policy's the
  trainer computes, so they would bias the importance ratio as old log-probs. The combination is refused; with
  recomputed old log-probs it is allowed."""
  from jaxstages.config import ConfigError
  from jaxstages.stages.rl import rl_config

  for truncation in (dict(top_k=5), dict(top_p=0.9)):
    with pytest.raises(ConfigError, match="recompute_old_logprobs=True"):
      rl_config({"rollout": truncation}, "grpo")
    rl_config({"rollout": truncation, "policy_loss": {"recompute_old_logprobs": True}}, "grpo")
  rl_config({"rollout": {"temperature": 0.7}}, "grpo")  # untruncated: the trainer divides by the same temperature


def test_gspo_has_its_own_clip_range_and_refuses_a_token_level_one():
  """GSPO's ratio is per sequence (the geometric mean of its token ratios), so its clip range is GSPO's own
  (3e-4 / 4e-4) unless set; a token-level range like 0.2 would never clip and is refused. PPO-clip keeps 0.2 / 0.2,
  and an explicit range is used as given."""
  from jaxstages.config import ConfigError
  from jaxstages.stages.rl import rl_config

  loss = lambda **block: rl_config({"policy_loss": block}, "grpo").policy_loss_config().clip
  assert loss(kind="gspo") == Clip(3e-4, 4e-4)
  assert loss() == Clip(0.2, 0.2)
  assert loss(clip_high=0.28, dual_clip=3.0) == Clip(0.2, 0.28, 3.0)
  assert loss(kind="gspo", clip_high=1e-3) == Clip(3e-4, 1e-3)
  with pytest.raises(ConfigError, match="gspo.*clip_low=0.2 / clip_high=0.2"):
    loss(kind="gspo", clip_low=0.2, clip_high=0.2)


def test_sampling_in_the_samplers_layout_draws_the_same_rollout(tmp_path):
  """On an fsdp mesh the rollout samples with the params resharded once to the sampler's own layout (weights whole
  over fsdp, `rollout.layout="sampler"`, the default) or as trained (`"trainer"`): the same completions, rewards and
  training batch either way."""
  mesh = ["mesh.data=2", "mesh.fsdp=4"]
  batches = [_prepared(_build(tmp_path / layout, "grpo", *mesh, f"grpo.rollout.layout='{layout}'"))[0]
             for layout in ("sampler", "trainer")]
  np.testing.assert_array_equal(np.asarray(batches[0]["tokens"]), np.asarray(batches[1]["tokens"]))
  for k in ("mask", "advantages", "old_logprobs"):
    np.testing.assert_allclose(np.asarray(batches[0][k]), np.asarray(batches[1][k]), atol=1e-5, err_msg=k)
