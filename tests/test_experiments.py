"""Every experiment script runs end to end at its minimal scale, so none can rot: one arm each here, every arm in the
slow test, in one work folder so the minimal base and shared runs are made once. The numbers of a minimal run mean
nothing; what is checked is the machinery: the results folder (JSON, table with the command, plot), probabilities in
range, runs shared by config hash between experiments, the FLOPs split of compute_allocation against its budget, the
KL drift GRPO logs, distill_vs_rl's equal-FLOPs budget, and the statistics rl_efficiency and rl_scaling report (reward
entropy, expected zero-variance groups, the power-law fit) against their formulas. Every run is followed by its
`--check` (the recorded model re-evaluated, equal to results.json to the last problem), and every results.json carries
its provenance, claims with bootstrap intervals and the per-problem evaluations they come from; the allocation tool
runs a three-stage split (mid-training / SFT / RL) end to end."""

import json
import math
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import allocation, base, common, compute_allocation, context_seeding, distill_vs_rl, \
    edge_of_competence, online_vs_offline, process_reward, rl_efficiency, rl_scaling
from experiments.common import REPO, SCALES, cells, competence_bands
from jaxstages.config import config_hash
from jaxstages.model.io import load_model
from jaxstages.sharding import make_mesh

MINIMAL = SCALES["minimal"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments")


def run_experiment(module, workdir, *extra) -> dict:
  """Runs the experiment at minimal scale, checks its results folder and provenance, then `--check`s it."""
  out = workdir / "results" / module.__name__.rsplit(".", 1)[1]
  command = ["--scale", "minimal", "--seeds", "1", "--workdir", str(workdir), "--out", str(out), *extra]
  module.main(command)
  results = json.loads((out / "results.json").read_text())
  assert results["scale"] == "minimal" and results["seeds"] == 1 and "--scale minimal" in results["command"]
  assert (out / "results.md").read_text().count(results["command"]) == 1
  assert results["experiment"] == "base" or (out / f"{results['experiment']}.png").stat().st_size > 1000
  prov = results["provenance"]
  assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
  assert set(prov["packages"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}
  assert all(prov["packages"].values())
  for digest, run in prov["runs"].items():  # every run: its config hash names its folder, its command is the one here
    assert run["folder"].endswith(digest) and (workdir / run["folder"] / "report.json").exists()
    assert run["command"] == results["command"]
  for folder, start in prov["starts"].items():
    assert len(start["config_hash"]) == 12
  assert prov["base"]["folder"] == str(base.ensure_base(MINIMAL, workdir).relative_to(workdir))
  assert prov["base"]["config_hash"] == config_hash(base.base_config(MINIMAL))
  for claim in results.get("claims", []):
    assert claim["verdict"] in ("supported", "contradicted", "inconclusive", "not run", "not evaluated")
    if "low" in claim:
      assert claim["low"] <= claim["estimate"] <= claim["high"]
  # the per-problem evaluations behind every table: each cell's counts give its pass@1
  for label, seeds in results["evals"].items():
    for entry in seeds.values():
      for cell in entry["cells"].values():
        assert len(results["problem_ids"][cell["ids"]]) == len(cell["correct"])
        assert cell["pass@1"] == pytest.approx(sum(cell["correct"]) / (cell["n"] * len(cell["correct"])))
  assert module.main([*command, "--check"]).startswith("--check passed")
  return results


def probabilities(tree) -> list[float]:
  """Every mean of a `summary` in a results tree, but FLOPs and gains (differences of probabilities)."""
  if isinstance(tree, dict):
    if "mean" in tree and "values" in tree:
      return [tree["mean"], *tree["values"]]
    return [v for k, x in tree.items() if not str(k).startswith(("flops", "gain")) for v in probabilities(x)]
  return []


def test_base_is_cached_by_config_hash(workdir):
  results = run_experiment(base, workdir)
  folder = base.ensure_base(MINIMAL, workdir)
  assert results["base"] == str(folder.relative_to(workdir)) and folder.name == f"base-{folder.name.split('-')[1]}"
  summary = (folder / "summary.json").stat().st_mtime_ns
  assert base.ensure_base(MINIMAL, workdir) == folder and (folder / "summary.json").stat().st_mtime_ns == summary
  # another mixture is another base (another size is trained as one below: distill_vs_rl's teacher)
  assert config_hash(base.base_config(MINIMAL, **{"data.task.contexts": "p"})) != folder.name.split("-")[1]
  cells = results["bases"][str(folder.relative_to(workdir))]["eval"]["cells"]
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
  results = run_experiment(compute_allocation, workdir, "--arms", "midtrain50-rl50")
  (flops,) = results["arms"]["midtrain50-rl50"]["flops"]
  assert set(flops) == {"midtrain", "rl"}
  for stage, (planned, spent) in flops.items():
    # a few steps at this size: a step is ~10% of a share
    assert planned == pytest.approx(MINIMAL.budget_flops / 2, rel=0.15)
    assert spent == pytest.approx(planned, rel=0.15)


def test_allocation_runs_a_three_stage_split(workdir):
  budget = 1e9
  results = run_experiment(allocation, workdir, "--stages", "midtrain,sft,rl", "--budget", str(budget),
                           "--splits", "0.5/0.25/0.25")
  (arm,) = results["arms"].values()
  assert arm["shares"] == {"midtrain": 0.5, "sft": 0.25, "rl": 0.25}
  (flops,) = arm["flops"]
  assert list(flops) == ["midtrain", "sft", "rl"]
  (steps,) = arm["steps"]
  for stage, share in arm["shares"].items():  # each stage plans and spends its share to within a step (one at least)
    planned, spent = flops[stage]
    step = max(planned, spent) / steps[stage]
    assert abs(planned - share * budget) <= step and abs(spent - planned) <= step
  (run,) = results["provenance"]["runs"].values()
  rl = json.loads((workdir / run["folder"] / "rl" / "config.json").read_text())
  assert rl["data"]["prompt"] == "chat" and rl["stage"]["init_from"].endswith("sft")  # RL after SFT reads chats
  with pytest.raises(SystemExit, match="summing to 1"):
    allocation.main(["--scale", "minimal", "--stages", "midtrain,rl", "--splits", "0.5/0.4"])


def test_check_fails_in_one_line_when_a_number_differs(workdir, tmp_path):
  out = workdir / "results" / "edge_of_competence"
  if not (out / "results.json").exists():  # made by the edge test above unless this one runs alone
    run_experiment(edge_of_competence, workdir, "--arms", "edge")
  results = json.loads((out / "results.json").read_text())
  target = results["evals"][results["check"]["label"]][str(results["check"]["seed"])]
  cell = next(iter(target["cells"].values()))
  cell["pass@1"] += 0.25
  (tmp_path / "results.json").write_text(json.dumps(results))
  with pytest.raises(SystemExit, match=r"^--check failed: edge seed 0 .* pass@1 re-evaluated [\d.]+, results.json "
                                       r"says [\d.]+$"):
    edge_of_competence.main(["--scale", "minimal", "--workdir", str(workdir), "--out", str(tmp_path), "--check"])
  # without the run folders (a clean clone): the params committed beside results.json (the run's final params,
  # bit for bit), the same samples
  source = target["source"]
  committed = common.check_model_folder(out, source["run"])
  mesh = make_mesh()
  leaves = [jax.tree.leaves(nnx.state(load_model(folder, mesh)))
            for folder in (committed, workdir / source["run"] / source["stage"])]
  assert len(leaves[0]) == len(leaves[1]) and all(np.array_equal(a, b) for a, b in zip(*leaves))
  manifest = (committed / "jaxstages_manifest.json").read_text()
  run_experiment(edge_of_competence, workdir, "--arms", "edge")  # re-made from the finished runs
  assert (committed / "jaxstages_manifest.json").read_text() == manifest  # the same export kept, not churned
  empty = tmp_path / "empty"
  message = edge_of_competence.main(["--scale", "minimal", "--workdir", str(empty), "--out", str(out), "--check"])
  assert message.startswith("--check passed: edge seed 0 (edge_of_competence/check-")
  shutil.rmtree(committed)
  with pytest.raises(SystemExit, match="is not in --workdir"):
    edge_of_competence.main(["--scale", "minimal", "--workdir", str(empty), "--out", str(out), "--check"])


def test_bands_follow_the_base_measured_competence():
  cpu = SCALES["cpu"]
  measured = {1: (0.95, 1.0), 2: (0.5, 0.9), 3: (0.3, 0.8), 5: (0.05, 0.4), 6: (0.08, 0.35), 7: (0.0, 0.01)}
  evaluation = {"cells": [{"context": "p", "op": op, "pass@1": p1, "pass@64": p64} for op, (p1, p64) in
                          measured.items()]}
  bands = competence_bands(cpu, evaluation)  # the cpu base is trained to op 4
  assert bands["source"] == "measured" and bands["trained_depth"] == 4
  assert bands["ranges"] == {"too-easy": (1, 1), "in-distribution": (2, 3), "edge": (5, 6), "too-hard": (7, 7)}
  # too hard within the trained depth and beyond the edge: no one range for it
  evaluation["cells"].append({"context": "p", "op": 4, "pass@1": 0.0, "pass@64": 0.0})
  assert "too-hard are not contiguous" in competence_bands(cpu, evaluation)["reason"]
  evaluation["cells"].pop()
  # no op beyond the trained depth at the edge: the scale's fixed ranges, and why
  del measured[5], measured[6]
  evaluation["cells"] = [c for c in evaluation["cells"] if c["op"] in measured]
  fixed = competence_bands(cpu, evaluation)
  assert fixed["source"] == "fixed" and fixed["ranges"] == cpu.ranges and "edge" in fixed["reason"]
  assert competence_bands(MINIMAL, evaluation)["reason"].startswith("the minimal scale's fixed ranges")


def test_base_gate_holds_the_competent_base_figures():
  cpu = SCALES["cpu"]
  greedy = {"cells": [{"context": "p", "op": op, "pass@1": p1} for op, p1 in ((1, 0.95), (2, 0.85), (4, 0.62))]}
  measured = {1: (0.8, 1.0), 4: (0.3, 0.9), 5: (0.05, 0.4), 8: (0.0, 0.01)}
  evaluation = {"cells": [{"context": "p", "op": op, "pass@1": p1, "pass@64": p64} for op, (p1, p64) in
                          measured.items()]}
  assert base.check_gate(cpu, greedy, competence_bands(cpu, evaluation)) == []
  greedy["cells"][1]["pass@1"] = 0.79  # op 2 below 80%
  measured[5] = (0.12, 0.4)  # solved too often beyond the trained depth: no edge
  evaluation["cells"][2]["pass@1"] = 0.12
  assert base.check_gate(cpu, greedy, competence_bands(cpu, evaluation)) == [
      "greedy pass@1 at p op 2 = 0.790, outside [0.8, 1.0]",
      "no op in the edge band (op beyond the trained depth, pass@1 <= 10%, pass@K >= 30%) among ops 1, 4, 5, 8"]


def test_readme_base_table_is_the_committed_base_evaluation():
  """The README's table of the shared base is `experiments/results/base/results.json` (what `python -m
  experiments.base` wrote for the committed artifact), and the committed base passes its gate there."""
  results = json.loads((REPO / "experiments/results/base/results.json").read_text())
  entry = results["bases"][results["base"]]
  assert results["base"] == "experiments/artifacts/base-cpu" and entry["gate_failures"] == []
  sampled, greedy = cells(entry["eval"]), cells(entry["greedy"])
  readme = (REPO / "README.md").read_text()
  table = readme[readme.index("### Learnability of the task world"):].split("\n\n")[2].splitlines()
  rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[2:]}
  want = {"strict greedy pass@1": [greedy[("p", op)]["pass@1"] for op in range(1, 9)],
          "strict pass@1 (temperature 1)": [sampled[("p", op)]["pass@1"] for op in range(1, 9)],
          "strict pass@64": [sampled[("p", op)]["pass@64"] for op in range(1, 9)]}
  for name, values in want.items():
    assert [float(v.strip().rstrip("%")) for v in rows[name]] == [float(f"{100 * v:.1f}") for v in values], name
  bands = results["bands"]["per_op"]
  assert [c.strip().replace(" ", "-") for c in rows["band"]] == [bands[str(op)]["band"] for op in range(1, 9)]


def test_readme_claim_verdicts_are_the_committed_results():
  """Every verdict in a claims table of experiments/README.md is the one its section's committed results.json gives
  (the results beside the section's figure), with the same interval: a verdict is never written by hand."""
  readme = (REPO / "experiments/README.md").read_text()
  checked = 0
  for section in readme.split("\n## ")[1:]:
    figure = re.search(r"!\[[^]]*\]\(([^)]+\.png)\)", section)
    lines = section.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("| claim | difference |")]
    if not header:
      continue
    assert figure, f"section {lines[0]!r} has a claims table but no figure naming its results"
    results = json.loads(((REPO / "experiments" / figure.group(1)).parent / "results.json").read_text())
    by_text = {c["text"]: c for c in results["claims"]}
    for line in lines[header[0] + 2:]:
      if not line.startswith("|"):
        break
      cols = [c.strip() for c in line.split("|")[1:-1]]
      if cols[-1] not in ("supported", "contradicted", "inconclusive"):
        continue  # an arm still running
      claim = by_text[cols[0]]
      assert (cols[-2], cols[-1]) == (common.interval_text(claim), claim["verdict"]), cols[0]
      checked += 1
  assert checked >= 6


def test_start_evaluation_cache_is_keyed_by_the_model_in_the_folder(tmp_path, monkeypatch):
  """A start model's evaluation is cached by folder name and the config hash of the model in it: a folder of the same
  name re-filled with another model (a re-made artifact) is evaluated again, not served the old numbers."""
  made = []
  monkeypatch.setattr(common, "load_model", lambda folder, mesh: folder)
  monkeypatch.setattr(common, "load_tokenizer", lambda folder: None)
  monkeypatch.setattr(common, "evaluate", lambda model, *a, **k: made.append(model) or {"cells": [{"correct": []}]})
  folder = tmp_path / "base-cpu"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"stage": {"steps": 3000}}))
  common.evaluate_start(MINIMAL, folder, tmp_path / "work")
  common.evaluate_start(MINIMAL, folder, tmp_path / "work")
  assert len(made) == 1
  (folder / "config.json").write_text(json.dumps({"stage": {"steps": 16000}}))
  common.evaluate_start(MINIMAL, folder, tmp_path / "work")
  assert len(made) == 2


def test_context_seeding_reuses_the_shared_base_for_one_percent(workdir):
  results = run_experiment(context_seeding, workdir, "--arms", "1%")
  assert results["arms"]["1%"]["base_folder"] == str(base.ensure_base(MINIMAL, workdir).relative_to(workdir))
  assert context_seeding.mixture(MINIMAL, 0.0) == (("p", 1.0),)
  # the cpu base's own mixture (no q) is its 0% arm; a seed of q keeps the rare tail of deeper p problems
  cpu = SCALES["cpu"]
  assert context_seeding.mixture(cpu, 0.0) == cpu.base["overrides"]["data.task.contexts"]
  assert context_seeding.mixture(cpu, 0.01) == (("p", 0.98802, (1, 4)), ("p", 0.00198, (5, 6)), ("q", 0.01, (1, 1)))
  arm = results["arms"]["1%"]
  assert set(arm["after_rl"]) == set(arm["before_rl"]) == {"1", "2", "3"}  # the RL ops and one beyond


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


@pytest.mark.slow  # ~2-4 min each: the default run keeps one RL arm per experiment family
def test_online_vs_offline_measures_grpos_drift(workdir):
  results = run_experiment(online_vs_offline, workdir, "--arms", "grpo")
  (drift,) = results["arms"]["grpo"]["drift"]
  assert drift and all(r["kl_from_reference"] >= -1e-6 and r["drift_length"] > 0 for r in drift)
  values = probabilities(results["arms"]["grpo"]["eval"]) + probabilities(results["start"])
  assert values and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.slow  # ~2-4 min each: the default run keeps one RL arm per experiment family
def test_rl_scaling_and_distill_vs_rl_share_the_small_model_rl_runs(workdir):
  scaling = run_experiment(rl_scaling, workdir, "--arms", "1 layer")
  runs = sorted(p.name for p in (workdir / "minimal" / "runs").iterdir())
  distill = run_experiment(distill_vs_rl, workdir, "--arms", "rl,on-policy")
  assert distill["teacher_size"] != distill["student_size"]
  new = sorted(p.name for p in (workdir / "minimal" / "runs").iterdir())
  assert len(new) == len(runs) + 1  # only the distillation run is new: the RL arm is rl_scaling's run
  assert distill["arms"]["rl"]["eval"]["1"]["pass@1"]["mean"] == pytest.approx(
      1 - scaling["sizes"]["1 layer"]["error_after"]["mean"])
  # the budget is the RL run's FLOPs; the stage rounds it up to whole steps of its planned (upper-bound) cost
  budget, spent = distill["arms"]["rl"]["flops"]["mean"], distill["arms"]["on-policy"]["flops"]["mean"]
  assert 0.5 * budget < spent < 2 * budget
  assert distill["teacher_params"] > distill["student_params"]


@pytest.mark.slow
@pytest.mark.parametrize("module", [edge_of_competence, process_reward, compute_allocation, context_seeding,
                                    rl_efficiency, online_vs_offline, rl_scaling, distill_vs_rl])
def test_every_arm_at_minimal_scale(module, tmp_path):
  results = run_experiment(module, tmp_path)
  assert all(0.0 <= v <= 1.0 for v in probabilities(results.get("arms", results.get("buckets", {}))) if v == v)
