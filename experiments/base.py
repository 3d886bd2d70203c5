"""The shared base: the model pre-trained once on the in-distribution op range of the task world, which every
experiment's RL and mid-training start from. Cached by the hash of its full stage config.

  python -m experiments.base [--scale cpu] [--workdir runs/experiments] [--export]

`ensure_base(scale)` returns the base's folder: the committed `experiments/artifacts/base-<scale>` when its
`source.json` holds the same config hash, else `<workdir>/<scale>/base-<hash>`, pre-trained there first if it is not
finished. The command also evaluates the base against its gate (below) and writes `experiments/results/base/`;
`--export` copies a freshly trained base into `experiments/artifacts/base-<scale>` (`jaxstages.model.io.export_stage`).
The results also hold the bands of the base's measured competence (`common.competence_bands`) every experiment takes
its op ranges from; `--check` re-evaluates the base (the committed params when it is the artifact) and compares.

The gate (cpu scale; experiments/README.md), on strict (process-verified) pass@k from 64 samples per problem at
temperature 1 with document prompts: op 1 solved often (pass@1) and nearly always within 64 samples, op 2 (the edge)
rarely at pass@1 but often within 64 samples, op 4 never. `GATES` holds the thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from experiments.common import ARTIFACTS, REPO, SCALES, Evidence, Scale, block_config, bands_markdown, cells, \
    competence_bands, finished, markdown_table, parse_args, recorded_path, write_results
from experiments.common import check as check_results
from jaxstages.config import config_hash
from jaxstages.model.io import export_stage
from jaxstages.train import run_stage

# (context, op, metric, lowest, highest): what the cpu base must show (its measured values sit inside, with room for
# the spread between re-made bases): op 1 solved often and nearly always within 64 samples, op 2 (the edge) rarely
# at pass@1 but often within 64 samples, op 4 never
GATES = {
    "cpu": [("p", 1, "pass@1", 0.25, 1.0), ("p", 1, "pass@64", 0.8, 1.0), ("p", 2, "pass@1", 0.0, 0.15),
            ("p", 2, "pass@64", 0.2, 1.0), ("p", 4, "pass@64", 0.0, 0.05)],
}


def base_config(scale: Scale, **overrides) -> ml_collections.ConfigDict:
  """The base's full stage config: the scale's pre-training config, its model shape and overrides, then `overrides`
  (dotted keys)."""
  return block_config(scale, scale.base, **overrides)


def ensure_base(scale: Scale, workdir: str | Path, use_artifact: bool = True, **overrides) -> Path:
  """The base of `scale` (with extra dotted-key `overrides`: another base, e.g. another size or context mixture):
  a finished run folder `<workdir>/<scale>/base-<hash>` if there is one (so the runs made from it stay cached), else
  the committed artifact whose `source.json` holds the same config hash (`artifact_folder`; when `use_artifact`),
  else a freshly pre-trained run folder."""
  cfg = base_config(scale, **overrides)
  digest = config_hash(cfg)
  run_dir = Path(workdir) / scale.name / f"base-{digest}"
  if finished(run_dir):
    return run_dir
  artifact = artifact_folder(scale, digest)
  if use_artifact and (artifact / "source.json").exists():
    if json.loads((artifact / "source.json").read_text())["config_hash"] == digest:
      return artifact
  print(f"-- pre-training the base {run_dir}", flush=True)
  run_stage(cfg, run_dir)
  return run_dir


def artifact_folder(scale: Scale, digest: str) -> Path:
  """Where a base is committed: `experiments/artifacts/base-<scale>` for the scale's own base, else
  `base-<scale>-<config hash>` (e.g. rl_scaling's other sizes)."""
  default = ARTIFACTS / f"base-{scale.name}"
  if (default / "source.json").exists() and json.loads((default / "source.json").read_text())["config_hash"] == digest:
    return default
  return ARTIFACTS / f"base-{scale.name}-{digest}"


def check_gate(scale: Scale, result: dict) -> list[str]:
  """The gate's failures (empty: the base passes)."""
  by_cell = cells(result)
  failures = []
  for context, op, metric, lo, hi in GATES.get(scale.name, []):
    value = by_cell[(context, op)][metric]
    if not lo <= value <= hi:
      failures.append(f"{metric} at {context} op {op} = {value:.3f}, outside [{lo}, {hi}]")
  return failures


def describe(scale: Scale, base: Path, result: dict, gate: bool = True) -> tuple[str, list[str]]:
  """The base's size, cost, gate verdict (`gate`: the scale's own base; other sizes have none) and evaluation table
  (Markdown), and its gate failures."""
  failures = check_gate(scale, result) if gate else []
  ks = [k for k in result["cells"][0] if k.startswith("pass@")]
  rows = [[c["op"], *[f"{100 * c[k]:.1f}" for k in ks], f"{100 * c['answer@1']:.1f}"] for c in result["cells"]]
  table = markdown_table(["op", *[f"strict {k} (%)" for k in ks], "answer@1 (%)"], rows)
  verdict = ("passes" if not failures else "FAILS: " + "; ".join(failures)) if gate else \
      "none (the gate is the scale's own base's)"
  summary = json.loads((base / "source.json").read_text())["summary"] if (base / "source.json").exists() else \
      json.loads((base / "summary.json").read_text())
  return (f"The base `{base.relative_to(REPO) if base.is_relative_to(REPO) else base.name}`: "
          f"{summary['steps']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3g} FLOPs, "
          f"{summary.get('wall_s_this_run', 0) / 60:.1f} min.\n\nGate: {verdict}.\n\n{table}"), failures


def main(argv=None) -> None:
  def extra(parser):
    parser.add_argument("--export", action="store_true", help="copy a freshly trained base into experiments/artifacts")
    parser.add_argument("--remake", action="store_true", help="also pre-train the base again (in --workdir) and "
                                                              "evaluate it next to the committed one")
    parser.add_argument("--size", default=None, help="another of the scale's model sizes (rl_scaling's), e.g. "
                                                     "'4 layers'")
  args = parse_args("base", __doc__, argv, extra=extra)
  if args.check:
    return check_results(args, "base")
  scale, evidence = SCALES[args.scale], Evidence(args, SCALES[args.scale])
  if args.size and args.size not in scale.sizes:
    raise SystemExit(f"unknown size {args.size!r}; the {scale.name} scale's sizes: {list(scale.sizes)}")
  overrides = {f"model.{k}": v for k, v in scale.sizes[args.size].items()} if args.size else {}
  bases = [ensure_base(scale, args.workdir, **overrides)]
  if args.export and not bases[0].is_relative_to(ARTIFACTS):
    digest = config_hash(base_config(scale, **overrides))
    bases = [export_stage(bases[0], ARTIFACTS / (f"base-{scale.name}-{digest}" if args.size else
                                                 f"base-{scale.name}"))]
  if args.remake:
    bases.append(ensure_base(scale, args.workdir, use_artifact=False, **overrides))
  results, sections = {}, []
  for base, label in zip(bases, ("base", "base, re-made")):
    result = evidence.start(label, base)
    md, failures = describe(scale, base, result, gate=not args.size)
    results[recorded_path(base, args.workdir)] = {"gate_failures": failures, "eval": result}
    sections.append(md)
  bands = competence_bands(scale, results[recorded_path(bases[0], args.workdir)]["eval"])
  md = "\n".join(sections) + "\n" + bands_markdown(bands)
  if args.size:  # another size: its own results folder unless --out
    args.out = args.out or str(Path(args.workdir) / scale.name / "results" / f"base-{args.size.replace(' ', '')}")
  write_results(args, "base", {"base": recorded_path(bases[0], args.workdir), "bases": results, "bands": bands}, md,
                evidence=evidence)
  print(md)


if __name__ == "__main__":
  main()
