"""The train loop end to end: learning, stage hand-off, resume after SIGKILL onto another mesh (losses and params),
and planning without training. (One or eight devices give the same step: test_train_step.py; bit-exact resume on
the same mesh: the SIGTERM test here and test_posttrain_stages.py.)"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.config import apply_overrides, load_config
from jaxstages.data.pipeline import data_config, make_pipeline
from jaxstages.evaluation import load_stage
from jaxstages.losses import next_token_loss
from jaxstages.metrics import read_metrics
from jaxstages.model import model_config
from jaxstages.sharding import DEFAULT_RULES, make_mesh
from jaxstages.train import StageConfig, initial_model, plan_stage, run_stage
from tests.stage_runs import SMALL as TINY
from tests.stage_runs import kill_at, losses, run, train_cmd

SMALL = TINY + ["data.seq_len=128"]


def small_config(name="pretrain-toy", *overrides):
  return apply_overrides(load_config(f"configs/train.py:{name}"), SMALL + list(overrides))


def held_out(run_dir, contexts: str, batches: int = 4) -> tuple[float, float]:
  """(model loss, unigram entropy) in nats per token on eval-split documents of the given context mixture."""
  model, tokenizer, config = load_stage(run_dir)
  # plain documents of the eval split, whatever format the stage trained on, so stages compare on one measure
  cfg = data_config(dict(kind="pretrain", split="eval", seed=123, seq_len=config["data"]["seq_len"],
                         batch_size=config["data"]["batch_size"], task=dict(config["data"]["task"], contexts=contexts)))
  it = make_pipeline(cfg, tokenizer)
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda s, b: next_token_loss(nnx.merge(graphdef, s), b))
  total = count = 0.0
  counts = np.zeros(model.cfg.vocab_size)
  for _ in range(batches):
    batch = next(it)
    s, c = loss(state, {k: jnp.asarray(v) for k, v in batch.items() if k != "source"})
    total, count = total + float(s), count + float(c)
    np.add.at(counts, batch["targets"][batch["loss_mask"] > 0], 1)
  p = counts[counts > 0] / counts.sum()
  return total / count, float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  config = small_config("pretrain-toy", "stage.steps=150", "stage.log_every=10", "stage.checkpoint_every=150",
                        "optim.lr=3e-3")
  summary = run_stage(config, workdir)
  return workdir, summary


def test_pretraining_learns_well_below_the_unigram_baseline(pretrained):
  workdir, summary = pretrained
  loss, unigram = held_out(workdir, "p")
  assert summary["step"] == 150 and summary["eval_loss"] == pytest.approx(loss, rel=0.1)
  print(f"held-out loss {loss:.3f} nats/token, unigram baseline {unigram:.3f}")
  assert loss < unigram - 1.0, (loss, unigram)
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
  assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
  assert {"lr", "grad_norm", "tokens_per_s", "flops", "step_time_s"} <= set(rows[-1])
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_and_sample_commands_on_a_trained_stage(pretrained, capsys, devices):
  from jaxstages.cli import main

  workdir, _ = pretrained
  main(["eval", str(workdir), "--ops", "1,2", "--problems", "8", "--n", "2", "--k", "1,2", "--contexts", "p"])
  table = capsys.readouterr().out
  assert "| p | pass@2 |" in table and "| p | maj@2 |" in table
  result = json.loads((workdir / "eval" / "eval.json").read_text())
  assert [(c["op"], c["samples"], c["problems"]) for c in result["cells"]] == [(1, 2, 8), (2, 2, 8)]
  assert all(c["pass@1"] <= c["pass@2"] for c in result["cells"])
  main(["sample", "--checkpoint", str(workdir), "--op", "1", "--n", "2", "--temperature", "0.8"])
  out = capsys.readouterr().out
  assert "gold answer" in out and out.count("--- sample") == 2


def test_midtraining_hands_off_exact_params_learns_the_new_context_and_replay_holds(pretrained, tmp_path):
  pre_dir, _ = pretrained
  config = small_config("midtrain-toy", f"stage.init_from={pre_dir}", "stage.steps=80", "stage.log_every=10",
                        "stage.checkpoint_every=80", "data.schedule=((0, {'midtrain': 0.5, 'replay': 0.5}),)",
                        "data.schedule_interp='constant'")
  # the hand-off: the first step's params are exactly pre-training's final params
  pre_model, _, _ = load_stage(pre_dir)
  values = dict(config.model.to_dict(), vocab_size=pre_model.cfg.vocab_size)
  start = initial_model(StageConfig.from_config(config.stage), model_config(values), make_mesh(), DEFAULT_RULES)
  for a, b in zip(jax.tree.leaves(nnx.state(start)), jax.tree.leaves(nnx.state(pre_model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  q_before, _ = held_out(pre_dir, "q")
  p_before, _ = held_out(pre_dir, "p")
  run_stage(config, tmp_path)
  q_after, _ = held_out(tmp_path, "q")
  p_after, _ = held_out(tmp_path, "p")
  assert q_after < q_before - 0.2, (q_before, q_after)  # the new context is learned
  assert p_after < p_before + 0.1, (p_before, p_after)  # replay keeps the old one from getting worse


def _train_cmd(workdir, *overrides):
  return train_cmd("pretrain-toy", workdir, *SMALL, *overrides)


RESUME = ["stage.steps=24", "stage.log_every=1", "stage.checkpoint_every=8", "stage.eval_batches=1"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The folder of the uninterrupted 24-step run that the interrupted ones below must reproduce."""
  reference = tmp_path_factory.mktemp("reference")
  run(_train_cmd(reference, *RESUME))
  return reference


def _final_params(workdir) -> list[np.ndarray]:
  from jaxstages.train import load_model
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_model(workdir, make_mesh()), nnx.Param))]


@pytest.fixture(scope="module")
def uninterrupted(reference_run) -> dict[int, float]:
  """step -> loss of the uninterrupted run."""
  expected = losses(reference_run)
  assert sorted(expected) == list(range(1, 25))
  return expected


def test_resume_after_sigkill_onto_another_mesh_gives_the_same_losses_and_params(uninterrupted, reference_run,
                                                                                  tmp_path):
  """Killed on the default 8-way data-parallel mesh, resumed on data x fsdp x tensor = 2 x 2 x 2: every loss and the
  final params equal the uninterrupted run's up to float32 reduction order (another mesh sums in another order, so
  not bit for bit; bit-exact resume on the same mesh: the SIGTERM test below and test_posttrain_stages.py)."""
  workdir = tmp_path / "mesh-change"
  killed_at = kill_at(_train_cmd(workdir, *RESUME), workdir, 11)
  assert 11 <= killed_at < 24
  expected = uninterrupted
  run(_train_cmd(workdir, *RESUME, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] is not None and 8 <= summary["resumed_from"] <= killed_at
  got = losses(workdir)
  assert sorted(got) == list(range(1, 25))
  # measured (2-core CPU): losses within 1.9e-7 relative, params within 9.2e-7 absolute (largest |param| ~1.0);
  # the bounds leave 10x
  for step in range(1, 25):
    assert abs(got[step] - expected[step]) <= 2e-6 * max(1.0, abs(expected[step])), step
  for a, b in zip(_final_params(workdir), _final_params(reference_run), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_sigterm_and_sigint_save_at_the_step_boundary_and_the_resumed_run_is_exact(uninterrupted, reference_run,
                                                                                   tmp_path):
  """SIGTERM mid-stage, then SIGINT in the re-run: each time the run finishes its step, saves a checkpoint at that
  step (not a multiple of checkpoint_every) and exits with PREEMPTED_EXIT_CODE; the final re-run resumes and its
  losses and final params equal the uninterrupted run's bit for bit."""
  import signal
  import subprocess

  from jaxstages.train import PREEMPTED_EXIT_CODE
  from tests.stage_runs import ENV, REPO, has_checkpoint, last_step

  workdir = tmp_path / "preempted"
  cmd = _train_cmd(workdir, *RESUME)
  for sig, at in ((signal.SIGTERM, 3), (signal.SIGINT, 10)):
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while last_step(workdir) < at and proc.poll() is None:
      time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert f"{sig.name} received; checkpoint saved at step {last_step(workdir)}" in err
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert has_checkpoint(workdir) and steps[-1] == last_step(workdir) and steps[-1] % 8 != 0, steps
  run(cmd)
  assert losses(workdir) == uninterrupted
  for a, b in zip(_final_params(workdir), _final_params(reference_run), strict=True):
    np.testing.assert_array_equal(a, b)


def test_plan_reports_params_flops_and_compiled_memory(devices):
  plan = plan_stage(small_config("pretrain-toy"))
  mem = plan["memory_per_device_bytes"]
  assert plan["params"] > 0 and plan["tokens_per_step"] == 8 * 128
  assert plan["xla_flops_per_step_per_device"] == pytest.approx(plan["flops_per_step"] / 8, rel=0.15)
  assert mem["argument"] > 0 and mem["temp"] > 0 and mem["peak_estimate"] >= mem["argument"]
  assert plan["compile_s"] > 0


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
  """From the third step on the loss is NaN: those updates are skipped (params and optimizer state unchanged, so the
  checkpoint saved meanwhile holds the last finite params), logged as `nonfinite`, and after `max_nonfinite` in a
  row the run stops with an error naming the stage and the steps."""
  import dataclasses

  from jaxstages import stages
  from jaxstages.train import NonFiniteError, load_model

  pretrain = stages.OBJECTIVES["pretrain"]

  def poisoned(ctx, block):
    objective = pretrain(ctx, block)

    def prepare(state, batch, step, next_batch=None):  # NaN enters through a batch entry set per step
      return {**batch, "poison": jnp.full(batch["targets"].shape, np.nan if step >= 2 else 0.0, jnp.float32)}

    def loss(model, batch):
      total, count, aux = objective.loss(model, {k: v for k, v in batch.items() if k != "poison"})
      return total + batch["poison"].sum(), count, aux

    return dataclasses.replace(objective, loss=loss, prepare=prepare)

  monkeypatch.setitem(stages.OBJECTIVES, "pretrain", poisoned)
  config = small_config("pretrain-toy", "stage.steps=20", "stage.log_every=1", "stage.checkpoint_every=2",
                        "stage.max_nonfinite=3", "stage.async_checkpoints=False")
  with pytest.raises(NonFiniteError, match=r"stage 'pretrain' \(pretrain\).*3 steps in a row \(steps 3-5\)"):
    run_stage(config, tmp_path)
  rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
  assert [rows[s]["nonfinite"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
  mesh = make_mesh()
  params = [jax.tree.leaves(nnx.state(load_model(tmp_path, mesh, step=step), nnx.Param)) for step in (2, 4)]
  for a, b in zip(*params, strict=True):  # steps 3 and 4 changed nothing
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(a)).all()


def test_logged_flops_and_mfu_are_the_measured_ones_when_the_objective_measures(tmp_path, monkeypatch):
  """An objective whose steps vary (RL: sampling stops when the longest sample does) measures its FLOPs
  (`flops_spent` in its state): the loop logs those as `flops` and its MFU from them, not from the planned FLOPs per
  step (for RL an upper bound: every sample to the token limit)."""
  import dataclasses

  from jaxstages import stages

  pretrain = stages.OBJECTIVES["pretrain"]

  def measured(ctx, block):
    spent = {"flops": 0.0}

    def prepare(state, batch, step, next_batch=None):
      spent["flops"] += 1000.0 * (step + 1)  # step s measures 1000 s FLOPs
      return batch

    return dataclasses.replace(pretrain(ctx, block), prepare=prepare, flops_per_step=1e15,
                               get_state=lambda: {"flops_spent": spent["flops"]},
                               set_state=lambda state: spent.update(flops=state["flops_spent"]))

  monkeypatch.setitem(stages.OBJECTIVES, "pretrain", measured)
  config = small_config("pretrain-toy", "stage.steps=4", "stage.log_every=2", "stage.checkpoint_every=4",
                        "stage.peak_flops_per_device=1.0", "stage.eval_batches=1")
  summary = run_stage(config, tmp_path)
  rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  assert [r["flops"] for r in rows] == [3000.0, 10000.0] and summary["flops_spent"] == 10000.0
  # steps 3 and 4: 7000 FLOPs in 2 x step_time_s seconds on 8 devices of peak 1 FLOP/s
  assert rows[1]["mfu"] == pytest.approx(7000.0 / (2 * rows[1]["step_time_s"]) / 8, rel=1e-6)
