"""The stage schedule: stages chained by their checkpoints, a FLOP budget split into steps, the report card, and a
re-run that skips what is done."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxstages.config import ConfigError
from jaxstages.data.pipeline import data_config
from jaxstages.data.tokenizer import task_tokenizer
from jaxstages.schedule import report_markdown, run_pipeline, stage_configs, stage_plan
from tests.stage_runs import ENV, REPO

TINY = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.intermediate_size": 128, "data.batch_size": 8, "data.seq_len": 128, "stage.eval_every": 0,
        "stage.log_every": 2, "stage.checkpoint_every": 4, "stage.eval_batches": 1}


# a tiny GRPO stage: 8 prompts x 2 samples of at most 16 tokens
TINY_RL = {**TINY, "grpo.rollout.group_size": 2, "grpo.rollout.max_new_tokens": 16, "grpo.eval_problems": 0}


def _pipeline(total_flops: float):
  """Pre-training -> GRPO, the budget split 50 / 50."""
  return dict(
      name="two-stage",
      stages=[dict(name="pre", config="train.py:pretrain-toy", overrides=dict(TINY)),
              dict(name="rl", config="train.py:grpo-toy", overrides=dict(TINY_RL))],
      eval=dict(ops=(1,), contexts=("p",), problems=4, max_new_tokens=24),
      compute=dict(total_flops=total_flops, split={"pre": 0.5, "rl": 0.5}))


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
  """The two-stage pipeline, run once uninterrupted with a budget of ~12 pre-training steps per stage: (run folder,
  pipeline config, report)."""
  run_dir = tmp_path_factory.mktemp("two-stage")
  pre_cfg = stage_configs(_pipeline(1e12), run_dir)[0][1]
  vocab = task_tokenizer(data_config(pre_cfg["data"]).task).vocab_size  # the run's tokenizer sizes the embedding
  pipeline = _pipeline(2 * 12 * stage_plan(pre_cfg, vocab)["flops_per_step"])
  return run_dir, pipeline, run_pipeline(pipeline, run_dir)


def _final_params(stage_dir) -> list[np.ndarray]:
  from jaxstages.sharding import make_mesh
  from jaxstages.train import load_model

  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_model(stage_dir, make_mesh()), nnx.Param))]


def test_two_stage_pipeline_chains_splits_the_budget_reports_and_skips_on_rerun(two_stage):
  """Pre-training then GRPO with a 50 / 50 budget split: the RL stage starts from the pre-training checkpoint with
  the run's tokenizer, runs until its measured FLOPs (sampling as executed) reach its half, and the two stages'
  spent FLOPs agree within 5%, each within 5% of its plan. A re-run skips everything."""
  tmp_path, pipeline, report = two_stage
  pre, rl = report["stages"]
  assert (pre["stage"], pre["steps"], rl["stage"]) == ("pre", 12, "rl") and rl["steps"] >= 8
  config = json.loads((tmp_path / "rl" / "config.json").read_text())
  assert config["stage"]["init_from"] == str(tmp_path / "pre")
  assert config["stage"]["tokenizer"] == str(tmp_path / "tokenizer")
  assert pre["flops"] == pytest.approx(pre["planned_flops"], rel=1e-9)  # a packed stage: the plan is exact
  assert rl["flops"] == pytest.approx(rl["planned_flops"], rel=0.05)
  assert rl["flops"] == pytest.approx(pre["flops"], rel=0.05)
  assert rl["steps"] < config["stage"]["steps"]  # it stopped on the budget, not on the step cap
  for r in report["stages"]:
    assert len(r["eval"]) == 1 and 0.0 <= r["eval"][0]["pass@1"] <= 1.0
  assert pre["eval_prompt"] == "document" and rl["eval_prompt"] == "chat"
  md = (tmp_path / "report.md").read_text()
  assert md == report_markdown(report) and "| pre | pretrain | 12 |" in md and "p op 1" in md
  assert (tmp_path / "report.png").stat().st_size > 1000
  walls = [json.loads((tmp_path / s / "attempts.json").read_text()) for s in ("pre", "rl")]
  assert [len(w) for w in walls] == [1, 1] and [r["wall_s"] for r in report["stages"]] == [w[0]["wall_s"]
                                                                                        for w in walls]
  again = run_pipeline(pipeline, tmp_path)  # everything is done: nothing runs again
  assert [json.loads((tmp_path / s / "attempts.json").read_text()) for s in ("pre", "rl")] == walls
  assert [r["eval"] for r in again["stages"]] == [r["eval"] for r in report["stages"]]


class Killed(Exception):
  """Stands for a SIGKILL in the middle of a stage: nothing after it runs."""


def test_a_stage_killed_and_resumed_reports_the_wall_time_of_both_attempts(tmp_path, monkeypatch):
  """A stage whose first process dies at step 4 (after logging step 3) and is resumed by re-running the pipeline:
  the report's wall time is the two attempts' together, the killed one's up to its last record, not the last
  process's alone (which made a stage killed four times show 74 s for ~7 minutes of work)."""
  import jaxstages.train

  pipeline = dict(name="one", stages=[dict(name="pre", config="train.py:pretrain-toy", steps=6, overrides={
      **TINY, "stage.log_every": 1, "stage.checkpoint_every": 2, "stage.async_checkpoints": False})],
      eval=dict(ops=(1,), contexts=("p",), problems=2, max_new_tokens=8))
  checks = []
  real = jaxstages.train.preempt_requested

  def killed_at_the_fourth_step(flag):
    checks.append(flag)
    if len(checks) == 4:
      raise Killed
    return real(flag)

  monkeypatch.setattr(jaxstages.train, "preempt_requested", killed_at_the_fourth_step)
  with pytest.raises(Killed):
    run_pipeline(pipeline, tmp_path)
  first = json.loads((tmp_path / "pre" / "attempts.json").read_text())
  monkeypatch.setattr(jaxstages.train, "preempt_requested", real)
  report = run_pipeline(pipeline, tmp_path)
  attempts = json.loads((tmp_path / "pre" / "attempts.json").read_text())
  assert len(first) == 1 and first[0]["to_step"] == 3 and first[0]["wall_s"] > 0
  assert attempts[0] == first[0] and attempts[1]["from_step"] == 2 and attempts[1]["to_step"] == 6
  row = report["stages"][0]
  assert row["steps"] == 6 and row["attempts"] == 2
  assert row["wall_s"] == pytest.approx(first[0]["wall_s"] + attempts[1]["wall_s"], rel=1e-9)


def _outcome(run_dir) -> list[dict]:
  """What must not depend on interruptions: per stage the steps, tokens, FLOPs and evaluation cells."""
  report = json.loads((run_dir / "report.json").read_text())
  keys = ("stage", "steps", "tokens", "flops", "planned_flops", "eval")
  return [{k: r[k] for k in keys} for r in report["stages"]]


def _newest_mtime(run_dir) -> float:
  return max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=0.0)


def _phase(run_dir, stages=("pre", "rl")) -> str:
  """Where an interrupted pipeline is: the first stage not trained or not evaluated yet."""
  for stage in stages:
    for file, doing in (("summary.json", "training"), ("eval.json", "evaluating")):
      if not (run_dir / stage / file).exists():
        return f"{stage} {doing}"
  return "report"


def _saves_under_way(run_dir) -> set:
  """Orbax's temporary step folders: a checkpoint save is being written."""
  return set(run_dir.glob("*/checkpoints/*.orbax-checkpoint-tmp*"))


@pytest.mark.parametrize("at_work,at_save", [(1, 2), pytest.param(6, 4, marks=pytest.mark.slow)])
def test_pipeline_killed_anywhere_finishes_with_the_uninterrupted_report(two_stage, tmp_path, at_work, at_save):
  """`jaxstages run` as a process, SIGKILLed and re-run until it finishes, writes the same report and final params
  as the uninterrupted library run: `at_work` kills at random moments once the process is at work (start-up,
  training, sampling, saving, evaluating, between stages: each re-run resumes, so the kills spread over the
  pipeline), then `at_save` while a checkpoint save is being written (the slow variant: 6 + 4)."""
  reference_dir, pipeline, _ = two_stage
  config = tmp_path / "pipeline.py"
  config.write_text(f"def get_config():\n  return {pipeline!r}\n")
  run_dir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "jaxstages.cli", "run", "--config", str(config), "--workdir", str(run_dir)]
  rng = np.random.default_rng(0)
  kills, during_saves, phases = 0, 0, []
  for attempt in range(40):
    started, stale = time.time(), _saves_under_way(run_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kills < at_work + at_save:
      saving, delay = kills >= at_work, rng.uniform(0.0, 3.0)
      while proc.poll() is None and time.time() < started + 120:
        if saving and _saves_under_way(run_dir) - stale:
          break
        if not saving and _newest_mtime(run_dir) > started and time.time() > started + delay:
          break  # the process has written something (it is at work) and the drawn delay has passed
        time.sleep(0.002 if saving else 0.02)
      if proc.poll() is None:
        during_saves += bool(saving and _saves_under_way(run_dir) - stale)
        os.kill(proc.pid, signal.SIGKILL)
        kills += 1
        phases.append(_phase(run_dir))
    _, err = proc.communicate()
    if proc.returncode == 0:
      break
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert proc.returncode == 0 and kills == at_work + at_save and during_saves >= at_save - 1, (kills, during_saves)
  if at_work + at_save >= 10:  # with ten kills they reach both stages (seed 0); four may all land in the first
    assert {p.split()[0] for p in phases} >= {"pre", "rl"}, phases
  assert _outcome(run_dir) == _outcome(reference_dir)
  for stage in ("pre", "rl"):
    for a, b in zip(_final_params(run_dir / stage), _final_params(reference_dir / stage), strict=True):
      np.testing.assert_array_equal(a, b)


def test_flop_budget_split_gives_each_stage_its_share(tmp_path):
  """50/50 of a budget between a pre-training and an RL stage: planned FLOPs within 5% of each other (RL's
  sampling and log-prob passes counted), and within 5% of the budget in total."""
  pipeline = dict(name="split", stages=[
      dict(name="pre", config="train.py:pretrain-toy", overrides=dict(TINY)),
      dict(name="rl", config="train.py:grpo-toy", overrides={"grpo.kl.coef": 0.001})],
      compute=dict(total_flops=4e13, split={"pre": 0.5, "rl": 0.5}))
  (pre, _), (rl, rl_cfg) = stage_configs(pipeline, tmp_path)
  assert rl_cfg["stage"]["init_from"] == str(tmp_path / "pre")
  assert pre["planned_flops"] == pytest.approx(rl["planned_flops"], rel=0.05)
  assert pre["planned_flops"] + rl["planned_flops"] == pytest.approx(4e13, rel=0.05)
  assert rl_cfg["stage"]["flops_budget"] == pytest.approx(2e13)  # RL runs until its measured FLOPs reach it
  # pipeline-wide overrides reach every stage; a stage's own override of the same key wins
  rl_lr = dict(pipeline["stages"][1], overrides={"optim.lr": 1e-5})
  shared = stage_configs({**pipeline, "stages": [pipeline["stages"][0], rl_lr],
                          "overrides": {"stage.seed": 7, "optim.lr": 0.5}}, tmp_path)
  assert [(c["stage"]["seed"], c["optim"]["lr"]) for _, c in shared] == [(7, 0.5), (7, 1e-5)]
  with pytest.raises(ConfigError, match="'rll'.*'rl'"):
    stage_configs({**pipeline, "compute": dict(total_flops=1e12, split={"rll": 1.0})}, tmp_path)
  with pytest.raises(ConfigError, match="one length"):
    stage_configs({**pipeline, "stages": [dict(pipeline["stages"][0], steps=3)],
                   "compute": dict(total_flops=1e12, split={"pre": 1.0})}, tmp_path)


def test_pipeline_presets_resolve(tmp_path):
  """The quickstart, the mid-size CPU pipeline and the interplay study's accelerator-scale schedule resolve to
  chained stages; the study's pre-training is ~10B tokens in 512k-token steps and its RL runs on the edge range op
  11-14; the mid-size pipeline splits its budget evenly between mid-training and RL."""
  from jaxstages.config import load_config

  quick = stage_configs(load_config("configs/pipelines/quickstart.py"), tmp_path / "q")
  assert [e["name"] for e, _ in quick] == ["pretrain", "midtrain", "sft", "rl"]
  assert [c["stage"]["kind"] for _, c in quick] == ["pretrain", "midtrain", "sft", "grpo"]
  study = stage_configs(load_config("configs/pipelines/interplay.py"), tmp_path / "i")
  (pre, pre_cfg), (mid, mid_cfg), (rl, rl_cfg) = study
  assert pre_cfg["data"]["seq_len"] * pre_cfg["data"]["batch_size"] == 2048 * 256
  assert pre_cfg["stage"]["steps"] * 2048 * 256 == pytest.approx(10e9, rel=1e-3)
  assert pre_cfg["model"]["hidden_size"] == 768 and tuple(rl_cfg["data"]["task"]["op_range"]) == (11, 14)
  assert rl_cfg["stage"]["init_from"] == str(tmp_path / "i" / "midtrain")
  assert rl["planned_flops"] > 0 and mid["planned_flops"] < pre["planned_flops"]
  medium = stage_configs(load_config("configs/pipelines/cpu-medium.py"), tmp_path / "m")
  (_, _), (mid, mid_cfg), (_, _), (rl, rl_cfg) = medium
  assert mid_cfg["model"]["hidden_size"] == rl_cfg["model"]["hidden_size"] == 256
  assert mid["planned_flops"] == pytest.approx(rl["planned_flops"], rel=0.05)  # the 50 / 50 split


def test_distillation_plan_counts_the_teacher_trained_earlier_in_the_run(tmp_path):
  """A distillation stage whose teacher is an earlier stage of the same run (`stage:NAME`, not trained yet) plans
  the student's training pass plus the teacher's forward on every token, with the teacher stage's shape."""
  from jaxstages.flops import forward_flops_per_token, train_flops_per_token
  from jaxstages.model import model_config

  pipeline = dict(name="distill", stages=[
      dict(name="teacher", config="train.py:sft-toy", steps=10, overrides={"model.num_layers": 6}),
      dict(name="student", config="train.py:distill-toy", steps=10,
           overrides={"distill.teacher": "stage:teacher", "stage.init_from": None})])
  (_, teacher_cfg), (student, student_cfg) = stage_configs(pipeline, tmp_path, tokenizer_vocab=500)
  assert student_cfg["distill"]["teacher"] == str(tmp_path / "teacher")
  teacher = model_config({**teacher_cfg["model"], "vocab_size": 512})
  small = model_config({**student_cfg["model"], "vocab_size": 512})
  seq, tokens = student_cfg["data"]["seq_len"], student_cfg["data"]["batch_size"] * student_cfg["data"]["seq_len"]
  expected = (train_flops_per_token(small, seq) + forward_flops_per_token(teacher, seq)) * tokens
  assert teacher.num_layers == 6 and student["planned_flops"] == pytest.approx(10 * expected, rel=1e-9)
