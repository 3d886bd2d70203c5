#!/usr/bin/env python
"""Check a pipeline's report card (`RUN_DIR/report.json`) against the claims the README makes for the main job.

  python tools/check_report.py RUN_DIR --config configs/pipelines/quickstart.py

- every stage of the pipeline config is in the report, in order, with steps taken and evaluation cells;
- planned and spent FLOPs agree: exactly (to 1e-6) for a stage sized from its config, within one mean step for an
  RL stage given a FLOP budget (it stops within half a step of the budget: README, "Pipelines");
- the total is the sum of the stages;
- RL's strict pass@1 on its own op range and contexts (the cells of the evaluation inside them) is at least the SFT
  stage's (README: "GRPO raises strict pass@1 on its op range above SFT's").

Exits 1 with one line per broken claim. `.ci/run` runs it on the quickstart's folder after the main job.
"""

import argparse
import json
import math
import sys
from pathlib import Path

RL_KINDS = ("grpo", "ppo")


def rl_cells(cfg: dict) -> tuple[range, set[str]]:
  """The op range and contexts an RL stage's config trains on."""
  from jaxstages.data.pipeline import data_config

  task = data_config(cfg["data"]).task
  lo, hi = task.op_range
  return range(lo, hi + 1), {m.context for m in task.mixture}


def mean_pass_at_1(row: dict, ops: range, contexts: set[str]) -> float:
  cells = [c["pass@1"] for c in row["eval"] if c["op"] in ops and c["context"] in contexts]
  return sum(cells) / len(cells) if cells else math.nan


def check_report(report: dict, pipeline: dict, run_dir: str | Path = "runs/check") -> list[str]:
  """The broken claims of `report` (a `report.json`) for `pipeline` (a loaded pipeline config); empty when all hold."""
  from jaxstages.schedule import stage_configs

  problems = []
  stages = stage_configs(pipeline, run_dir)
  rows = report.get("stages", [])
  want, got = [e["name"] for e, _ in stages], [r.get("stage") for r in rows]
  if got != want:
    return [f"stages in the report {got} are not the pipeline's {want}"]
  for (entry, cfg), row in zip(stages, rows):
    name = row["stage"]
    if row["steps"] < 1 or not row["eval"]:
      problems.append(f"{name}: {row['steps']} steps, {len(row['eval'])} evaluation cells")
    for c in row["eval"]:
      if not 0.0 <= c["pass@1"] <= 1.0:
        problems.append(f"{name}: pass@1 {c['pass@1']} at {c['context']} op {c['op']} is not a rate")
    planned, spent = row["planned_flops"], row["flops"]
    budgeted = row["kind"] in RL_KINDS and cfg["stage"].get("flops_budget")
    allowed = spent / max(row["steps"], 1) if budgeted else 1e-6 * planned
    if not abs(spent - planned) <= allowed:
      problems.append(f"{name}: spent {spent:.4g} FLOPs, planned {planned:.4g} (allowed difference {allowed:.3g})")
  total = sum(r["flops"] for r in rows)
  if not math.isclose(report.get("total_flops", math.nan), total, rel_tol=1e-9):
    problems.append(f"total_flops {report.get('total_flops')} is not the stages' sum {total:.6g}")
  rl = [(cfg, row) for (_, cfg), row in zip(stages, rows) if row["kind"] in RL_KINDS]
  sft = [row for row in rows if row["kind"].startswith("sft")]
  if not rl or not sft:
    problems.append(f"no RL stage and SFT stage to compare: kinds {[r['kind'] for r in rows]}")
  for cfg, row in rl:
    ops, contexts = rl_cells(cfg)
    after_rl, after_sft = mean_pass_at_1(row, ops, contexts), mean_pass_at_1(sft[-1], ops, contexts)
    where = f"ops {ops.start}-{ops.stop - 1}, contexts {sorted(contexts)}"
    if math.isnan(after_rl) or math.isnan(after_sft):
      problems.append(f"{row['stage']}: no evaluation cells on its op range ({where})")
    elif after_rl < after_sft:
      problems.append(f"{row['stage']}: strict pass@1 {after_rl:.1%} on its op range ({where}) is below SFT's "
                      f"{after_sft:.1%}")
  return problems


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("--config", default="configs/pipelines/quickstart.py")
  args = parser.parse_args(argv)
  from jaxstages.schedule import load_pipeline

  path = Path(args.run_dir) / "report.json"
  if not path.exists():
    print(f"{path}: no report (did the pipeline finish?)", file=sys.stderr)
    return 1
  problems = check_report(json.loads(path.read_text()), load_pipeline(args.config), args.run_dir)
  for p in problems:
    print(f"{path}: {p}", file=sys.stderr)
  if not problems:
    print(f"{path}: every stage present, planned and spent FLOPs agree, RL's pass@1 on its op range >= SFT's")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
