"""Every experiment script runs end to end at its minimal scale, so none can rot: one arm each here, every arm in the
slow test. The numbers of a minimal run mean nothing; what is checked is the machinery: the results folder (JSON,
table with the command, plot), probabilities in range, runs shared by config hash between experiments, and the FLOPs
split of compute_allocation against its budget."""

import json

import pytest

from experiments import base, compute_allocation, context_seeding, edge_of_competence, process_reward
from experiments.common import SCALES

MINIMAL = SCALES["minimal"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments")


def run_experiment(module, workdir, *extra) -> dict:
  out = workdir / "results" / module.__name__.rsplit(".", 1)[1]
  module.main(["--scale", "minimal", "--seeds", "1", "--workdir", str(workdir), "--out", str(out), *extra])
  results = json.loads((out / "results.json").read_text())
  assert results["scale"] == "minimal" and results["seeds"] == 1 and "--scale minimal" in results["command"]
  assert (out / "results.md").read_text().count(results["command"]) == 1
  assert results["experiment"] == "base" or (out / f"{results['experiment']}.png").stat().st_size > 1000
  return results


def probabilities(tree) -> list[float]:
  """Every mean of a `summary` in a results tree."""
  if isinstance(tree, dict):
    if "mean" in tree and "values" in tree:
      return [tree["mean"], *tree["values"]]
    return [v for x in tree.values() for v in probabilities(x)]
  return []


def test_base_is_cached_by_config_hash(workdir):
  results = run_experiment(base, workdir)
  folder = base.ensure_base(MINIMAL, workdir)
  assert results["base"] == str(folder.relative_to(workdir)) and folder.name == f"base-{folder.name.split('-')[1]}"
  summary = (folder / "summary.json").stat().st_mtime_ns
  assert base.ensure_base(MINIMAL, workdir) == folder and (folder / "summary.json").stat().st_mtime_ns == summary
  # another mixture is another base
  assert base.ensure_base(MINIMAL, workdir, **{"data.task.contexts": "p"}) != folder
  cells = results["bases"][str(folder)]["eval"]["cells"]
  assert {(c["context"], c["op"]) for c in cells} == {("p", op) for op in MINIMAL.eval_ops}


def test_edge_of_competence_and_process_reward_share_the_strict_run(workdir):
  edge = run_experiment(edge_of_competence, workdir, "--arms", "edge")
  assert list(edge["arms"]) == ["edge"] and len(edge["reward_curves"]["edge"]) == 1
  values = probabilities(edge["arms"]) + probabilities(edge["base"])
  assert values and all(0.0 <= v <= 1.0 for v in values)
  runs = sorted((workdir / "minimal" / "runs").iterdir())
  reward = run_experiment(process_reward, workdir, "--arms", "strict")
  # the strict arm is edge_of_competence's edge run: same config, same folder, nothing new trained
  assert sorted((workdir / "minimal" / "runs").iterdir()) == runs
  for op, cell in edge["arms"]["edge"].items():
    for metric in ("pass@1", "answer@1"):
      assert reward["arms"]["strict"][op][metric] == cell[metric]
  with pytest.raises(SystemExit, match="unknown arm"):
    run_experiment(process_reward, workdir, "--arms", "nope")


def test_compute_allocation_spends_its_budget_in_both_stages(workdir):
  results = run_experiment(compute_allocation, workdir, "--arms", "mid50")
  (flops,) = results["arms"]["mid50"]["flops"]
  assert set(flops) == {"midtrain", "rl"}
  for stage, (planned, spent) in flops.items():
    # a few steps at this size: a step is ~10% of a share
    assert planned == pytest.approx(MINIMAL.budget_flops / 2, rel=0.15)
    assert spent == pytest.approx(planned, rel=0.15)


def test_context_seeding_reuses_the_shared_base_for_one_percent(workdir):
  results = run_experiment(context_seeding, workdir, "--arms", "1%")
  assert results["arms"]["1%"]["base_folder"] == str(base.ensure_base(MINIMAL, workdir).relative_to(workdir))
  assert context_seeding.mixture(MINIMAL, 0.0) == (("p", 1.0),)
  arm = results["arms"]["1%"]
  assert set(arm["after_rl"]) == set(arm["before_rl"]) == {"1", "2", "3"}  # the RL ops and one beyond


@pytest.mark.slow
@pytest.mark.parametrize("module", [edge_of_competence, process_reward, compute_allocation, context_seeding])
def test_every_arm_at_minimal_scale(module, tmp_path):
  results = run_experiment(module, tmp_path)
  assert all(0.0 <= v <= 1.0 for v in probabilities(results["arms"]) if v == v)
