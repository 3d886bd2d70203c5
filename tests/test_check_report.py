"""The main job's claims (`tools/check_report.py`, run by `.ci/run` on the quickstart's report): on a report card of
the quickstart's shape it passes, and it names each broken claim: a missing stage, spent FLOPs away from the plan,
RL below SFT on its op range (even when RL is ahead off its range), a wrong total, no report at all."""

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from check_report import check_report, main  # noqa: E402

from jaxstages.schedule import load_pipeline, stage_configs  # noqa: E402

CONFIG = "configs/pipelines/quickstart.py"
# strict pass@1 after each stage at (context, op): seed 0 of the README's table at p op 1, made-up values elsewhere
PASS = {"pretrain": (0.402, 0.03, 0.0, 0.0), "midtrain": (0.393, 0.03, 0.0, 0.0), "sft": (0.379, 0.027, 0.0, 0.0),
        "rl": (0.409, 0.012, 0.0, 0.0)}
CELLS = (("p", 1), ("p", 2), ("q", 1), ("q", 2))


@pytest.fixture(scope="module")
def pipeline():
  return load_pipeline(CONFIG)


@pytest.fixture(scope="module")
def report(pipeline):
  """A report card of the quickstart's shape: spent = planned, except RL, which overshoots by a third of a step."""
  rows = []
  for entry, cfg in stage_configs(pipeline, "runs/quickstart"):
    steps = 98 if entry["name"] == "rl" else cfg["stage"]["steps"]
    planned = entry["planned_flops"]
    spent = planned * (1 + 1 / 3 / steps) if entry["name"] == "rl" else planned
    rows.append(dict(stage=entry["name"], kind=cfg["stage"]["kind"], steps=steps, tokens=1000 * steps, flops=spent,
                     planned_flops=planned, wall_s=1.0, mfu=None, cost=0.0, eval_prompt="chat",
                     eval=[dict(context=c, op=o, **{"pass@1": v, "pass@8": v, "answer@1": v})
                           for (c, o), v in zip(CELLS, PASS[entry["name"]])]))
  return dict(name="quickstart", stages=rows, total_flops=sum(r["flops"] for r in rows), total_wall_s=4.0)


def _broken(report, pipeline, change) -> list[str]:
  bad = copy.deepcopy(report)
  change(bad)
  return check_report(bad, pipeline)


def _cell(report, stage, context, op):
  row = next(r for r in report["stages"] if r["stage"] == stage)
  return next(c for c in row["eval"] if (c["context"], c["op"]) == (context, op))


def test_a_report_that_keeps_the_claims_passes(report, pipeline):
  assert [r["stage"] for r in report["stages"]] == ["pretrain", "midtrain", "sft", "rl"]
  assert check_report(report, pipeline) == []


def test_each_broken_claim_is_named(report, pipeline):
  def drop_midtrain(r):
    del r["stages"][1]
    r["total_flops"] = sum(s["flops"] for s in r["stages"])
  assert "not the pipeline's" in _broken(report, pipeline, drop_midtrain)[0]

  def off_plan(r):  # a non-RL stage 1% off its plan
    r["stages"][0]["flops"] *= 1.01
    r["total_flops"] = sum(s["flops"] for s in r["stages"])
  assert [p for p in _broken(report, pipeline, off_plan) if p.startswith("pretrain: spent")]

  def rl_overshoots(r):  # RL two steps past its budget
    r["stages"][3]["flops"] = r["stages"][3]["planned_flops"] * (1 + 2 / 98)
    r["total_flops"] = sum(s["flops"] for s in r["stages"])
  assert [p for p in _broken(report, pipeline, rl_overshoots) if p.startswith("rl: spent")]

  def rl_below_sft(r):
    _cell(r, "rl", "p", 1)["pass@1"] = 0.378
  assert [p for p in _broken(report, pipeline, rl_below_sft) if "below SFT's 37.9%" in p]

  def rl_ahead_off_its_range(r):  # RL's op range is op 1 of context p: a gain at op 2 or context q does not count
    _cell(r, "rl", "p", 1)["pass@1"] = 0.37
    _cell(r, "rl", "p", 2)["pass@1"] = 0.30
    _cell(r, "rl", "q", 1)["pass@1"] = 0.30
  assert [p for p in _broken(report, pipeline, rl_ahead_off_its_range) if "ops 1-1, contexts ['p']" in p]

  def wrong_total(r):
    r["total_flops"] *= 2
  assert [p for p in _broken(report, pipeline, wrong_total) if p.startswith("total_flops")]

  def not_a_rate(r):
    _cell(r, "sft", "q", 2)["pass@1"] = 1.5
  assert [p for p in _broken(report, pipeline, not_a_rate) if "is not a rate" in p]


def test_command_line(report, tmp_path, capsys):
  """Exit 0 on a good report, 1 on a bad one or none, naming the file and the broken claim."""
  assert main([str(tmp_path), "--config", CONFIG]) == 1
  assert "no report" in capsys.readouterr().err
  (tmp_path / "report.json").write_text(json.dumps(report))
  assert main([str(tmp_path), "--config", CONFIG]) == 0
  bad = copy.deepcopy(report)
  _cell(bad, "rl", "p", 1)["pass@1"] = 0.2
  (tmp_path / "report.json").write_text(json.dumps(bad))
  assert main([str(tmp_path), "--config", CONFIG]) == 1
  assert "below SFT's" in capsys.readouterr().err
