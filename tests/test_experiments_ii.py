"""The second set of experiment scripts at their minimal scale (one arm each here, every arm in the slow test), and
the statistics they report checked against their formulas: the reward entropy and expected zero-variance groups of
rl_efficiency, rl_scaling's power-law fit, the KL drift of online_vs_offline's arms and distill_vs_rl's equal-FLOPs
budget."""

import math

import pytest

from experiments import distill_vs_rl, online_vs_offline, rl_efficiency, rl_scaling
from experiments.common import SCALES
from tests.test_experiments import probabilities, run_experiment

MINIMAL = SCALES["minimal"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments_ii")


def test_reward_entropy_and_zero_variance_groups_follow_their_formulas():
  assert rl_efficiency.entropy_bits(0.5) == 1.0 and rl_efficiency.entropy_bits(0.0) == 0.0
  assert rl_efficiency.entropy_bits(0.11) == pytest.approx(0.4999, abs=1e-3)
  cells = {("p", 1): {"samples": 4, "correct": [0, 2, 4, 1]}, ("p", 2): {"samples": 4, "correct": [0, 0, 0, 0]}}
  stats = rl_efficiency.base_statistics(cells, [1, 2], group=2)
  ps = [0, 0.5, 1, 0.25, 0, 0, 0, 0]
  assert stats["pass_rate"] == pytest.approx(sum(ps) / 8)
  assert stats["entropy_bits"] == pytest.approx((1.0 + rl_efficiency.entropy_bits(0.25)) / 8)
  assert stats["zero_variance_expected"] == pytest.approx(sum(p ** 2 + (1 - p) ** 2 for p in ps) / 8)


def test_power_law_fit_recovers_its_exponent():
  xs = [1e9 * 2 ** i for i in range(6)]
  fit = rl_scaling.power_law(xs, [3.0 * x ** -0.25 for x in xs])
  assert fit["b"] == pytest.approx(0.25) and fit["a"] == pytest.approx(3.0) and fit["r2"] == pytest.approx(1.0)
  assert math.isnan(rl_scaling.power_law([1.0], [0.5])["b"])


def test_rl_efficiency_at_minimal_scale(workdir):
  results = run_experiment(rl_efficiency, workdir, "--arms", "edge")
  arm = results["buckets"]["edge"]
  assert set(arm) >= {"rl", "sft", "base"} and arm["ops"] == [2]
  assert 0.0 <= arm["base"]["zero_variance_expected"] <= 1.0 and 0.0 <= arm["base"]["entropy_bits"] <= 1.0
  assert arm["rl"]["flops"]["mean"] > 0 and arm["sft"]["flops"]["mean"] > 0


def test_online_vs_offline_measures_every_arms_drift(workdir):
  results = run_experiment(online_vs_offline, workdir, "--arms", "grpo,dpo-online")
  for arm in ("grpo", "dpo-online"):
    (drift,) = results["arms"][arm]["drift"]
    assert drift and all(r["kl_from_reference"] >= -1e-6 and r["drift_length"] > 0 for r in drift)
  values = probabilities(results["arms"]["grpo"]["eval"]) + probabilities(results["start"])
  assert values and all(0.0 <= v <= 1.0 for v in values)


def test_rl_scaling_and_distill_vs_rl_share_the_small_model_rl_runs(workdir):
  scaling = run_experiment(rl_scaling, workdir, "--arms", "1 layer")
  runs = sorted(p.name for p in (workdir / "minimal" / "runs").iterdir())
  distill = run_experiment(distill_vs_rl, workdir, "--arms", "rl,on-policy")
  new = sorted(p.name for p in (workdir / "minimal" / "runs").iterdir())
  assert len(new) == len(runs) + 1  # only the distillation run is new: the RL arm is rl_scaling's run
  assert distill["arms"]["rl"]["eval"]["1"]["pass@1"]["mean"] == pytest.approx(
      1 - scaling["sizes"]["1 layer"]["error_after"]["mean"])
  # the budget is the RL run's FLOPs; the stage rounds it up to whole steps of its planned (upper-bound) cost
  budget, spent = distill["arms"]["rl"]["flops"]["mean"], distill["arms"]["on-policy"]["flops"]["mean"]
  assert 0.5 * budget < spent < 2 * budget
  assert distill["teacher_params"] > distill["student_params"]


@pytest.mark.slow
@pytest.mark.parametrize("module", [rl_efficiency, online_vs_offline, rl_scaling, distill_vs_rl])
def test_every_arm_at_minimal_scale(module, tmp_path):
  results = run_experiment(module, tmp_path)
  assert all(0.0 <= v <= 1.0 for v in probabilities(results.get("arms", results.get("buckets", {}))) if v == v)
