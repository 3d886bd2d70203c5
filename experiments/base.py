"""The shared base: the model pre-trained once on the in-distribution op range of the task world, which every
experiment's RL and mid-training start from. Cached by the hash of its full stage config.

  python -m experiments.base [--scale cpu] [--workdir runs/experiments] [--export]

`ensure_base(scale)` returns the base's folder: the committed `experiments/artifacts/base-<scale>` when its
`source.json` holds the same config hash, else `<workdir>/<scale>/base-<hash>`, pre-trained there first if it is not
finished. The command also evaluates the base against its gate (below) and writes `experiments/results/base/`;
`--export` copies a freshly trained base into `experiments/artifacts/base-<scale>` (`jaxstages.model.io.export_stage`).
The results also hold the bands of the base's measured competence (`common.competence_bands`) every experiment takes
its op ranges from; `--check` re-evaluates the base (the committed params when it is the artifact) and compares.

The gate (cpu scale; the competent base's figures, experiments/README.md): strict greedy pass@1 >= 90% at op 1,
>= 80% at op 2 and >= 60% at the trained depth (op 4), and, in the scale's protocol (64 samples per problem at
temperature 1 with document prompts), an edge (an op beyond the trained depth with pass@1 <= 10% and pass@64 >= 30%)
and a too-hard op (pass@64 <= 2%). `GATES` holds the thresholds; the command exits non-zero when a base misses one.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from experiments.common import ARTIFACTS, BAND_RULES, REPO, SCALES, Evidence, Scale, bands_markdown, block_config, \
    cells, competence_bands, finished, markdown_table, parse_args, recorded_path, write_results
from experiments.common import check as check_results
from jaxstages.config import config_hash
from jaxstages.model.io import export_stage
from jaxstages.train import run_stage

# What the scale's base must show: (context, op, metric, lowest, highest) on greedy decoding, and the bands
# (`common.competence_bands`) its sampled evaluation must hold an op of
GATES = {
    "cpu": {"greedy": [("p", 1, "pass@1", 0.9, 1.0), ("p", 2, "pass@1", 0.8, 1.0), ("p", 4, "pass@1", 0.6, 1.0)],
            "bands": ("edge", "too-hard")},
}
GREEDY = {"n": 1, "ks": (1,), "temperature": 0.0}  # the greedy evaluation's samples (replacing the scale's)


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


def check_gate(scale: Scale, greedy: dict | None, bands: dict) -> list[str]:
  """The gate's failures (empty: the base passes): `greedy` is the base's greedy evaluation, `bands` its
  `competence_bands`."""
  gate = GATES.get(scale.name, {})
  by_cell = cells(greedy) if greedy else {}
  failures = []
  for context, op, metric, lo, hi in gate.get("greedy", []):
    value = by_cell[(context, op)][metric]
    if not lo <= value <= hi:
      failures.append(f"greedy {metric} at {context} op {op} = {value:.3f}, outside [{lo}, {hi}]")
  for band in gate.get("bands", ()):
    if not any(row["band"] == band for row in bands["per_op"].values()):
      failures.append(f"no op in the {band} band ({BAND_RULES[band]}) among ops {', '.join(bands['per_op'])}")
  return failures


def describe(base: Path, result: dict, greedy: dict | None, failures: list[str] | None) -> str:
  """The base's size, cost, gate verdict (None: no gate, another size's base) and evaluation table (Markdown:
  strict pass@k of the sampled evaluation, answer@1, and greedy pass@1 when evaluated)."""
  ks = [k for k in result["cells"][0] if k.startswith("pass@")]
  by_greedy = cells(greedy) if greedy else {}
  rows = [[c["op"], *[f"{100 * c[k]:.1f}" for k in ks], f"{100 * c['answer@1']:.1f}",
           *([f"{100 * by_greedy[(c['context'], c['op'])]['pass@1']:.1f}"] if greedy else [])]
          for c in result["cells"]]
  table = markdown_table(["op", *[f"strict {k} (%)" for k in ks], "answer@1 (%)",
                          *(["strict greedy pass@1 (%)"] if greedy else [])], rows)
  verdict = ("none (the gate is the scale's own base's)" if failures is None else
             "passes" if not failures else "FAILS: " + "; ".join(failures))
  summary = json.loads((base / "source.json").read_text())["summary"] if (base / "source.json").exists() else \
      json.loads((base / "summary.json").read_text())
  return (f"The base `{base.relative_to(REPO) if base.is_relative_to(REPO) else base.name}`: "
          f"{summary['steps']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3g} FLOPs, "
          f"{summary.get('wall_s_this_run', 0) / 60:.1f} min.\n\nGate: {verdict}.\n\n{table}")


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
  gated = args.scale in GATES and not args.size
  results, sections, failed = {}, [], []
  for base, label in zip(bases, ("base", "base, re-made")):
    result = evidence.start(label, base)
    greedy = evidence.start(f"{label}, greedy", base, samples=GREEDY) if gated else None
    failures = check_gate(scale, greedy, competence_bands(scale, result)) if gated else None
    sections.append(describe(base, result, greedy, failures))
    results[recorded_path(base, args.workdir)] = {"gate_failures": failures, "eval": result, "greedy": greedy}
    failed += [f"{label}: {f}" for f in failures or []]
  bands = competence_bands(scale, results[recorded_path(bases[0], args.workdir)]["eval"])
  md = "\n".join(sections) + "\n" + bands_markdown(bands)
  if args.size:  # another size: its own results folder unless --out
    args.out = args.out or str(Path(args.workdir) / scale.name / "results" / f"base-{args.size.replace(' ', '')}")
  write_results(args, "base", {"base": recorded_path(bases[0], args.workdir), "bases": results, "bands": bands}, md,
                evidence=evidence)
  print(md)
  if failed:
    raise SystemExit("the base misses its gate: " + "; ".join(failed))


if __name__ == "__main__":
  main()
