"""The stage schedule: stages chained by their checkpoints, a FLOP budget split into steps, the report card, and a
re-run that skips what is done."""

import json

import pytest

from jaxstages.config import ConfigError
from jaxstages.schedule import report_markdown, run_pipeline, stage_configs

TINY = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.intermediate_size": 128, "data.batch_size": 8, "data.seq_len": 128, "stage.eval_every": 0,
        "stage.log_every": 2, "stage.checkpoint_every": 4, "stage.eval_batches": 1}


def _pipeline(**compute):
  return dict(
      name="two-stage",
      stages=[dict(name="pre", config="train.py:pretrain-toy", steps=6, overrides=dict(TINY)),
              dict(name="sft", config="train.py:sft-toy", steps=4, overrides=dict(TINY))],
      eval=dict(ops=(1,), contexts=("p",), problems=4, max_new_tokens=24), compute=compute)


def test_two_stage_pipeline_runs_chains_reports_and_skips_on_rerun(tmp_path):
  report = run_pipeline(_pipeline(), tmp_path)
  pre, sft = report["stages"]
  assert (pre["stage"], pre["steps"], sft["stage"], sft["steps"]) == ("pre", 6, "sft", 4)
  # the SFT stage started from the pre-training stage's final checkpoint, with the run's one tokenizer
  config = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert config["stage"]["init_from"] == str(tmp_path / "pre")
  assert config["stage"]["tokenizer"] == str(tmp_path / "tokenizer")
  for r in report["stages"]:  # packed stages: the plan is exact
    assert r["flops"] == pytest.approx(r["planned_flops"], rel=1e-9) and r["flops"] > 0
    assert len(r["eval"]) == 1 and 0.0 <= r["eval"][0]["pass@1"] <= 1.0
  assert pre["eval_prompt"] == "document" and sft["eval_prompt"] == "chat"
  md = (tmp_path / "report.md").read_text()
  assert md == report_markdown(report) and "| pre | pretrain | 6 |" in md and "p op 1" in md
  assert (tmp_path / "report.png").stat().st_size > 1000
  walls = json.loads((tmp_path / "pre" / "wall_seconds.json").read_text())
  again = run_pipeline(_pipeline(), tmp_path)  # everything is done: nothing runs again
  assert json.loads((tmp_path / "pre" / "wall_seconds.json").read_text()) == walls
  assert [r["eval"] for r in again["stages"]] == [r["eval"] for r in report["stages"]]


def test_flop_budget_split_gives_each_stage_its_share(tmp_path):
  """50/50 of a budget between a pre-training and an RL stage: planned FLOPs within 5% of each other (RL's
  sampling and log-prob passes counted), and within 5% of the budget in total."""
  pipeline = dict(name="split", stages=[
      dict(name="pre", config="train.py:pretrain-toy", overrides=dict(TINY)),
      dict(name="rl", config="train.py:grpo-toy", overrides={"grpo.kl_coef": 0.001})],
      compute=dict(total_flops=4e13, split={"pre": 0.5, "rl": 0.5}))
  (pre, _), (rl, rl_cfg) = stage_configs(pipeline, tmp_path)
  assert rl_cfg["stage"]["init_from"] == str(tmp_path / "pre")
  assert pre["planned_flops"] == pytest.approx(rl["planned_flops"], rel=0.05)
  assert pre["planned_flops"] + rl["planned_flops"] == pytest.approx(4e13, rel=0.05)
  with pytest.raises(ConfigError, match="'rll'.*'rl'"):
    stage_configs({**pipeline, "compute": dict(total_flops=1e12, split={"rll": 1.0})}, tmp_path)
  with pytest.raises(ConfigError, match="one length"):
    stage_configs({**pipeline, "stages": [dict(pipeline["stages"][0], steps=3)],
                   "compute": dict(total_flops=1e12, split={"pre": 1.0})}, tmp_path)


def test_pipeline_presets_resolve(tmp_path):
  """The quickstart and the interplay study's accelerator-scale schedule resolve to chained stages; the study's
  pre-training is ~10B tokens in 512k-token steps and its RL runs on the edge range op 11-14."""
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
