"""DPO and distillation as stages of the shared loop: their batch-level losses against references computed another
way (per-row unpadded forwards, NumPy KL), their values at equality, and their config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.config import ConfigError, apply_overrides, load_config
from jaxstages.data.pipeline import data_config, make_pipeline
from jaxstages.data.tokenizer import task_tokenizer
from jaxstages.metrics import read_metrics
from jaxstages.model import create_model
from jaxstages.stages import objective_block
from jaxstages.stages.distill import DistillConfig, check_same_tokenizer, distill_loss_fn, teacher_outputs
from jaxstages.stages.dpo import DPOConfig, dpo_loss_fn, pair_log_probs
from jaxstages.model.config import vocab_size_for
from jaxstages.train import run_stage
from tests.stage_runs import SMALL, finish, kill_all_at, loss_rows, spawn, train_cmd


@pytest.fixture(scope="module")
def tok():
  return task_tokenizer(data_config("preference-symbolic").task, n_samples=300)


@pytest.fixture(scope="module")
def cfg(tiny_cfg, tok):
  """The tiny model with the task tokenizer's vocabulary and spread-out logits."""
  return tiny_cfg.replace(vocab_size=vocab_size_for(tok.vocab_size), init_std=0.2)


@pytest.fixture(scope="module")
def model(cfg):
  return create_model(cfg, seed=0)


@pytest.fixture(scope="module")
def pairs(tok):
  batch = next(make_pipeline(dict(kind="preference", task=dict(surface="symbolic", op_range=(1, 3)), seq_len=128,
                                  prompt_len=80, batch_size=4, seed=3), tok, 0, 1))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _unpadded_response_log_prob(model, tokens, mask):
  """Sum of log p(token) over the response, from a forward over the row's real tokens alone (no padding)."""
  n = int(np.nonzero(np.asarray(tokens))[0].max()) + 1
  logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens[None, :n]))
  logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1), np.float64)
  return sum(logp[i - 1, int(tokens[i])] for i in range(1, n) if mask[i])


def test_pair_log_probs_equal_unpadded_forwards(model, pairs):
  chosen, rejected, chosen_len, rejected_len = pair_log_probs(model, pairs)
  for side, got, lengths in (("chosen", chosen, chosen_len), ("rejected", rejected, rejected_len)):
    tokens, mask = np.asarray(pairs[f"{side}_tokens"]), np.asarray(pairs[f"{side}_mask"])
    for r in range(2):  # each row its own length: one compile per row
      want = _unpadded_response_log_prob(model, tokens[r], mask[r])
      assert float(got[r]) == pytest.approx(want, rel=1e-5, abs=1e-4)
      assert float(lengths[r]) == mask[r, 1:].sum()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_stage_loss_at_the_reference(model, pairs, kind):
  """Policy = reference: sigmoid gives log 2, hinge 1, IPO (1/2β)², and every reward and margin is 0."""
  chosen, rejected, _, _ = pair_log_probs(model, pairs)
  cfg = DPOConfig(loss=kind, beta=0.2)
  total, count, sums = dpo_loss_fn(cfg)(model, {**pairs, "ref_chosen": chosen, "ref_rejected": rejected})
  expected = {"sigmoid": np.log(2.0), "hinge": 1.0, "ipo": (1 / (2 * 0.2)) ** 2}[kind]
  assert float(count) == float(pairs["valid"].sum())
  assert float(total / count) == pytest.approx(expected, rel=1e-6)
  for k in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
    assert abs(float(sums[k])) < 1e-6


def test_dpo_stage_ignores_padding_pairs(model, pairs):
  chosen, rejected, _, _ = pair_log_probs(model, pairs)
  batch = {**pairs, "ref_chosen": chosen - 1.0, "ref_rejected": rejected, "valid": pairs["valid"].at[1:].set(0)}
  total, count, _ = dpo_loss_fn(DPOConfig())(model, batch)
  assert float(count) == 1.0
  assert float(total) == pytest.approx(-np.log(1 / (1 + np.exp(-0.1 * 1.0))), rel=1e-5)  # pair 0 only


def _packed_batch(tok):
  batch = next(make_pipeline(dict(kind="sft", task=dict(surface="symbolic", op_range=(1, 2)), seq_len=96,
                                  batch_size=2, seed=2, think_mix=(0.5, 0.5, 0.0)), tok, 0, 1))
  return {k: jnp.asarray(v) for k, v in batch.items() if k != "source"}


def test_distill_stage_loss_equals_numpy_kl_over_trained_tokens(cfg, tok):
  student = create_model(cfg, seed=1)
  teacher = create_model(cfg.replace(num_layers=3), seed=2)
  batch = _packed_batch(tok)
  cfg = DistillConfig(teacher="unused", divergence="forward_kl", temperature=2.0)
  full = {**batch, **teacher_outputs(cfg)(teacher, batch)}
  total, count, sums = distill_loss_fn(cfg)(student, full)

  def log_softmax(x):
    x = np.asarray(x, np.float64) / 2.0
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  log_t, log_s = log_softmax(teacher(*args)[0]), log_softmax(student(*args)[0])
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
  mask = np.asarray(batch["loss_mask"])
  assert float(count) == mask.sum()
  assert float(total) == pytest.approx((kl * mask).sum(), rel=1e-4)
  # the aux NLL is the student's data NLL at temperature 1
  logits = np.asarray(student(*args)[0], np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  assert float(sums["nll"]) == pytest.approx((nll * mask).sum(), rel=1e-4)


@pytest.mark.parametrize("extra", [dict(divergence="forward_kl"), dict(divergence="reverse_kl"),
                                   dict(divergence="jsd", beta=0.3), dict(divergence="forward_kl", top_k=8)])
def test_distilling_a_model_into_itself_costs_nothing(cfg, tok, extra):
  model = create_model(cfg, seed=1)
  batch = _packed_batch(tok)
  cfg = DistillConfig(teacher="unused", **extra)
  total, count, _ = distill_loss_fn(cfg)(model, {**batch, **teacher_outputs(cfg)(model, batch)})
  assert float(count) > 0 and abs(float(total / count)) < 1e-5


def test_config_errors_name_the_problem(tok):
  with pytest.raises(ConfigError, match="top_k"):
    DistillConfig(teacher="t", divergence="reverse_kl", top_k=8)
  with pytest.raises(ConfigError, match="on_policy_fraction=1"):
    DistillConfig(teacher="t", divergence="sampled_reverse_kl", on_policy_fraction=0.5)
  with pytest.raises(ConfigError, match="teacher is required"):
    DistillConfig()
  with pytest.raises(ConfigError, match="forwrd_kl.*forward_kl"):
    DistillConfig(teacher="t", divergence="forwrd_kl")
  with pytest.raises(ConfigError, match="'dpo' belongs to stage kind 'dpo'"):
    objective_block("distill", {"dpo": {"beta": 0.1}})
  from jaxstages.config import from_config
  with pytest.raises(ConfigError, match="'bta'.*'beta'"):
    from_config(DPOConfig, {"bta": 0.1}, where="dpo config")
  with pytest.raises(ConfigError, match="'sigmod'.*'sigmoid'"):
    DPOConfig(loss="sigmod")
  other = task_tokenizer(data_config("pretrain-story").task, n_samples=100)
  with pytest.raises(ConfigError, match="share one tokenizer"):
    check_same_tokenizer(tok, other, "distill.teacher T")
  check_same_tokenizer(tok, tok, "same")


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
  """A 2-step SFT stage of the tiny shape: the starting point of DPO and the teacher of distillation below."""
  workdir = tmp_path_factory.mktemp("sft")
  run_stage(apply_overrides(load_config("configs/train.py:sft-toy"), SMALL + [
      "stage.init_from=None", "stage.steps=2", "stage.log_every=1", "stage.checkpoint_every=2", "stage.eval_every=0",
      "data.seq_len=128"]), workdir)
  return workdir


RESUME = ["stage.steps=10", "stage.log_every=1", "stage.checkpoint_every=4", "stage.eval_every=0"]


RESUMED = {
    "dpo-toy": [*SMALL, "stage.init_from={sft}", "dpo.drift_prompts=0"],
    # on-policy distillation: each step samples from the student or the teacher (λ = 0.5), then the teacher scores
    "distill-toy": [*SMALL, "distill.teacher={sft}", "data.kind='rl'", "data.sources=()", "data.prompt_len=96",
                    "distill.on_policy_fraction=0.5", "distill.off_policy='teacher'", "distill.max_new_tokens=24"],
    # GRPO from the committed toy SFT model (real rewards), KL in the reward with an adaptive coefficient (restored
    # from the checkpoint) and dynamic sampling (refills drawn from the checkpointed data iterator)
    "grpo-toy": ["data.batch_size=8", "grpo.rollout.group_size=4", "grpo.rollout.max_new_tokens=24",
                 "grpo.eval_problems=0",
                 "grpo.kl.coef=0.05", "grpo.kl.placement='reward'", "grpo.kl.estimator='k1'", "grpo.kl.target=0.01",
                 "grpo.kl.horizon=64", "grpo.rollout.dynamic_sampling=True", "grpo.rollout.max_sampling_rounds=2"],
}


@pytest.mark.slow  # three stages run twice (~100 s of CPU); pre-training's bit-exact resume is in the default run
def test_post_training_stages_resume_exactly_after_sigkill(tiny_sft, tmp_path):
  """Killed mid-run, re-run: the steps after the last checkpoint are computed again and give the same losses bit
  for bit (params, optimizer, data position, reference / teacher outputs and samples all restored or re-derived),
  and for GRPO the same rewards and adaptive KL coefficient. The three stages run side by side."""
  cmds = {name: train_cmd(name, tmp_path / name, *RESUME, *(o.format(sft=tiny_sft) for o in overrides))
          for name, overrides in RESUMED.items()}
  killed = dict(zip(cmds, kill_all_at([(cmd, tmp_path / name, 6) for name, cmd in cmds.items()])))
  for proc in [spawn(cmd) for cmd in cmds.values()]:
    finish(proc)
  for name, killed_at in killed.items():
    workdir = tmp_path / name
    assert 6 <= killed_at < 10, name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 10 and summary["resumed_from"] in (4, 8) and summary["resumed_from"] < killed_at
    first, again = {}, {}
    for step, loss in loss_rows(workdir):
      (again if step in first else first)[step] = loss
    assert sorted(first) == list(range(1, 11)), name
    assert sorted(again) == list(range(summary["resumed_from"] + 1, killed_at + 1)), name
    for step, loss in again.items():
      assert loss == first[step], (name, step, loss, first[step])
  # RL: the same rollouts (rewards), the same adaptive KL coefficient, the same refills
  rows = [r for r in read_metrics(tmp_path / "grpo-toy" / "metrics.jsonl") if "reward_mean" in r]
  seen = {}
  for r in rows:
    keys = ("reward_mean", "kl_coef", "sampling_rounds", "groups_dropped", "loss")
    if r["step"] in seen:
      assert seen[r["step"]] == tuple(r[k] for k in keys), r["step"]
    seen[r["step"]] = tuple(r[k] for k in keys)
  assert len(rows) > 10 and len({v[1] for v in seen.values()}) > 1  # resumed steps were compared; β moved


def test_sampled_pairs_replace_sides_with_verified_samples(model, pairs, tok, devices, monkeypatch):
  """A sample judged correct becomes the chosen side, a wrong one the rejected side: prompt + completion, trained
  only on the completion; a side with no such sample keeps the pipeline's."""
  import types

  from jaxstages.sharding import DEFAULT_RULES, MeshConfig, make_mesh
  from jaxstages.stages import dpo
  from jaxstages.stages.dpo import sampled_pairs

  calls = []

  def scripted_verify(problem, text):  # the first sample of every prompt is "correct", the rest wrong
    calls.append(text)
    return types.SimpleNamespace(strict_correct=(len(calls) - 1) % 2 == 0)

  monkeypatch.setattr(dpo, "verify", scripted_verify)
  cfg = DPOConfig(pairs="reference", pair_samples=2, pair_max_new_tokens=8)
  data = data_config(dict(kind="preference", task=dict(surface="symbolic", op_range=(1, 3)), seq_len=128,
                          prompt_len=80, batch_size=4, seed=3))
  mesh = make_mesh(MeshConfig(1, 1, 1), devices[:1])
  out = {k: np.asarray(v) for k, v in sampled_pairs(model, pairs, cfg, data, tok, 0, mesh, DEFAULT_RULES).items()}
  assert len(calls) == 8 and (out["sampled_chosen"] == 1).all() and (out["sampled_rejected"] == 1).all()
  for side in ("chosen", "rejected"):
    for r in range(4):
      prompt = np.asarray(pairs["prompt_tokens"][r])[np.asarray(pairs["prompt_mask"][r]) == 1]
      n = len(prompt)
      assert (out[f"{side}_tokens"][r, :n] == prompt).all() and out[f"{side}_mask"][r, :n].sum() == 0
      completion = out[f"{side}_mask"][r].sum()
      assert 1 <= completion <= 8 and out[f"{side}_segment_ids"][r].sum() == n + completion
      assert not (out[f"{side}_tokens"][r] == np.asarray(pairs[f"{side}_tokens"][r])).all()
