"""The stage schedule: one config composes stages (pretrain → mid-train → SFT → RL, or any subset and order, DPO and
distillation included), each starting from the previous one's final checkpoint, and writes a report card.

  jaxstages run --config configs/pipelines/quickstart.py --workdir runs/quickstart

A pipeline config holds `name`, `stages` (a list; each has a `name`, the training `config` it starts from, e.g.
`"train.py:sft-toy"`, `overrides` with dotted or nested keys, and a length: `steps`, `tokens` or `flops`),
`overrides` for every stage (applied before each stage's own: a model shape or a seed the whole run shares), `eval`
(the keys of `evaluation.EvalConfig` for the table written after every stage) and `price_per_chip_hour`. With
`compute.total_flops` and `compute.split = {stage: fraction}` each listed stage's length is its share of the budget,
turned into steps by the stage's FLOPs per step. An RL stage's FLOPs per step are known only once it has sampled
(generation stops when the longest sample does), so an RL stage given FLOPs runs until its measured FLOPs (sampling,
extra forward passes and updates) are within half a step of its budget (`stage.flops_budget`).

A stage starts from the previous stage's folder unless its overrides set `stage.init_from`; any string value
`"stage:NAME"` in a stage's config is replaced by that stage's folder (a distillation teacher, a DPO reference).
All stages share one tokenizer (`RUN/tokenizer`). Re-running the same command resumes: finished stages (and their
evaluations) are skipped, an interrupted one resumes from its last checkpoint. A stage whose config changed since
it ran (`stage_hashes.json`) is refused, never mixed into the report; `--force` re-runs it and the stages after it.

The run folder: `config.json`, one folder per stage (the stage's own files, `eval.json`), `report.json` (per stage:
steps, tokens, planned and spent FLOPs, wall time summed over every attempt at the stage, killed ones included, MFU
where the chip's peak is known, estimated cost, and the evaluation cells), `report.md` rendered from it, and
`report.png`: the evaluation against cumulative FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxstages.config import ConfigError, apply_overrides, check_keys, config_hash, load_config, to_dict
from jaxstages.data.pipeline import data_config
from jaxstages.data.tokenizer import load_tokenizer, task_tokenizer
from jaxstages.evaluation import EvalConfig, evaluate, prompt_for
from jaxstages.metrics import write_atomic
from jaxstages.model.config import ModelConfig, model_config, vocab_size_for
from jaxstages.model.io import load_model
from jaxstages.runfolder import RunFolderError, check_name, local, locked, start_or_restore
from jaxstages.sharding import initialize_distributed, make_mesh, sync_processes
from jaxstages.stages import objective_block, planned_step
from jaxstages.train import peak_flops_per_device, plan_stage, run_stage

PIPELINE_KEYS = ("name", "stages", "overrides", "eval", "compute", "price_per_chip_hour")
STAGE_KEYS = ("name", "config", "overrides", "steps", "tokens", "flops", "eval_prompt")


def _stage_entries(config: Mapping) -> list[dict]:
  entries = [dict(e) for e in config.get("stages") or ()]
  if not entries:
    raise ConfigError("a pipeline needs at least one stage in `stages`")
  for e in entries:
    check_keys(e, STAGE_KEYS, f"pipeline stage {e.get('name', '?')!r}")
    if not e.get("name") or not e.get("config"):
      raise ConfigError(f"every pipeline stage needs a name and a config; got {e}")
  names = [check_name(e["name"], "pipeline stage") for e in entries]
  if len(set(names)) != len(names):
    raise ConfigError(f"pipeline stage names must be unique: {names}")
  return entries


def _replace_stage_refs(value: Any, run_dir: Path) -> Any:
  if isinstance(value, str) and value.startswith("stage:"):
    return str(run_dir / value.removeprefix("stage:"))
  if isinstance(value, Mapping):
    return {k: _replace_stage_refs(v, run_dir) for k, v in value.items()}
  return value


def _dotted(overrides: Mapping, prefix: str = "") -> dict:
  """`{"model": {"num_layers": 2}}` and `{"model.num_layers": 2}` alike as `{"model.num_layers": 2}` (a ConfigDict
  holds no dotted keys, so a config file nests them)."""
  out = {}
  for k, v in dict(overrides).items():
    if isinstance(v, Mapping) and v:
      out.update(_dotted(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def stage_configs(config: Mapping, run_dir: str | Path, tokenizer_vocab: int | None = None
                  ) -> list[tuple[dict, dict]]:
  """The pipeline's stages as (entry, full training config dict), in order, with `init_from` chained, `stage:`
  references resolved and lengths in steps (a FLOP budget split turned into steps; `tokenizer_vocab` sizes the
  embedding where a model's `vocab_size` is 0, as the stage will)."""
  config = to_dict(config)
  check_keys(config, PIPELINE_KEYS, "pipeline config")
  run_dir = Path(run_dir)
  entries = _stage_entries(config)
  compute = dict(config.get("compute") or {})
  split = dict(compute.get("split") or {})
  check_keys(split, [e["name"] for e in entries], "compute.split (stage names)")
  if split and not compute.get("total_flops"):
    raise ConfigError("compute.split needs compute.total_flops")
  out, previous, shapes = [], None, {}
  shared = _dotted(config.get("overrides") or {})
  for e in entries:
    overrides = [f"{k}={v!r}" for k, v in {**shared, **_dotted(e.get("overrides") or {})}.items()]
    cfg = to_dict(apply_overrides(load_config(e["config"]), overrides))
    cfg["stage"]["name"] = e["name"]
    if previous is not None and "stage.init_from" not in _dotted(e.get("overrides") or {}):
      cfg["stage"]["init_from"] = str(previous)
    cfg["stage"]["tokenizer"] = str(run_dir / "tokenizer")
    cfg = _replace_stage_refs(cfg, run_dir)
    lengths = [k for k in ("steps", "tokens", "flops") if e.get(k) is not None]
    for k in lengths:  # a length of 0 is a mistake, never "the preset's"
      if not isinstance(e[k], (int, float)) or isinstance(e[k], bool) or e[k] < 1:
        raise ConfigError(f"pipeline stage {e['name']!r}: {k}={e[k]!r} must be a number >= 1")
    if e["name"] in split:
      lengths.append("split")
    if len(lengths) > 1:
      raise ConfigError(f"stage {e['name']!r}: give one length (steps, tokens, flops or a compute split), "
                        f"not {lengths}")
    teacher = shapes.get(str(dict(cfg.get("distill") or {}).get("teacher")))  # a teacher trained earlier in the run
    plan = stage_plan(cfg, tokenizer_vocab, teacher)
    if "steps" in lengths:
      steps = int(e["steps"])
    elif "tokens" in lengths:
      steps = math.ceil(float(e["tokens"]) / plan["tokens_per_step"])
    elif "flops" in lengths or e["name"] in split:
      budget = float(e.get("flops") or compute["total_flops"] * float(split[e["name"]]))
      steps = max(1, round(budget / plan["flops_per_step"]))
      if "flops_per_step_min" in plan:  # RL: a step's FLOPs are known once sampled; run until the budget is spent
        cfg["stage"]["flops_budget"] = budget
        steps = math.ceil(budget / plan["flops_per_step_min"])
    else:
      steps = int(cfg["stage"]["steps"])
    cfg["stage"]["steps"] = steps
    e["planned_flops"] = cfg["stage"].get("flops_budget") or steps * plan["flops_per_step"]
    out.append((e, cfg))
    previous = run_dir / e["name"]
    shapes[str(previous)] = _model_shape(cfg, tokenizer_vocab)
  return out


def plan_pipeline(config: Mapping | ml_collections.ConfigDict, run_dir: str | Path) -> list[dict]:
  """`train.plan_stage` of every stage of a pipeline, as the run would configure it (lengths, chained starts); nothing
  is written and no earlier stage needs to exist."""
  return [plan_stage(cfg) for _, cfg in stage_configs(to_dict(config), Path(run_dir))]


def _model_shape(cfg: Mapping, tokenizer_vocab: int | None) -> ModelConfig:
  return model_config({**cfg["model"], "vocab_size": cfg["model"].get("vocab_size")
                       or vocab_size_for(tokenizer_vocab or 512)})


def stage_plan(cfg: Mapping, tokenizer_vocab: int | None = None, teacher_model=None) -> dict:
  """Tokens and FLOPs per step of a training config, from the config alone (no model is built): what a compute
  budget is divided by. RL counts its sampling (at the token limit) and extra forward passes; distillation the
  teacher's forwards and any sampling (the teacher's shape: `teacher_model`, else read from `distill.teacher`)."""
  kind = cfg["stage"]["kind"]
  return planned_step(kind, objective_block(kind, cfg), _model_shape(cfg, tokenizer_vocab), data_config(cfg["data"]),
                      teacher_model)


def _eval_config(pipeline: Mapping, entry: Mapping, config: Mapping | None = None) -> EvalConfig:
  values = dict(pipeline.get("eval") or {})
  values["prompt"] = entry.get("eval_prompt") or values.get("prompt") or prompt_for(config)
  return EvalConfig.from_config(values)


STAGE_HASHES = "stage_hashes.json"  # in a run folder: {stage: the hash of the config it was run with}


def stage_hash(cfg: Mapping, previous: str | None, run_dir: Path) -> str:
  """The hash of a stage's full training config and of the stage before it (so a change reaches every later stage),
  with the run folder's own path left out (a run folder may be moved)."""
  text = json.dumps({"config": cfg, "previous": previous}, sort_keys=True, default=str)
  return config_hash(json.loads(text.replace(str(run_dir), "RUN")))


def run_pipeline(config: Mapping | ml_collections.ConfigDict, run_dir: str | Path, force: bool = False) -> dict:
  """Runs (or resumes) every stage of the pipeline in order, evaluates each, and writes `report.json` and
  `report.md`. Returns the report.

  Each stage's config hash (`stage_hash`) is recorded in `stage_hashes.json` when it starts; a stage that was run
  with another config (and so every stage after it) is refused with a `RunFolderError` naming it, or, with `force`,
  its folder is moved to `RUN/replaced/NAME-HASH` and the stage re-run. An evaluation made with another protocol
  (`eval`) is made again. One writer at a time (`runfolder.locked`)."""
  initialize_distributed()  # several processes: each runs this same function; process 0 writes the shared files
  config = to_dict(config)
  run_dir = local(run_dir, "workdir")
  with locked(run_dir):
    return _run_pipeline(config, run_dir, force)


def _run_pipeline(config: dict, run_dir: Path, force: bool) -> dict:
  with start_or_restore(run_dir):
    first = stage_configs(config, run_dir)[0][1]
    have_tokenizer = (run_dir / "tokenizer").exists()
    sync_processes("jaxstages: run folder looked at")  # every process decided before process 0 writes
    if not have_tokenizer:  # one tokenizer for every stage: the first stage's start's, or trained (alike everywhere)
      start = first["stage"].get("init_from")
      found = next((p for p in ([Path(start) / "tokenizer", Path(start).parent / "tokenizer"] if start else [])
                    if p.exists()), None)
      tokenizer = load_tokenizer(found) if found else task_tokenizer(data_config(first["data"]).task)
      if jax.process_index() == 0:
        tokenizer.save(run_dir / "tokenizer")
      sync_processes("jaxstages: run tokenizer saved")
    stages = stage_configs(config, run_dir, load_tokenizer(run_dir / "tokenizer").vocab_size)
    hashes_path = run_dir / STAGE_HASHES
    hashes = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
    previous, replace = None, []
    for entry, cfg in stages:
      name, stage_dir = entry["name"], run_dir / entry["name"]
      entry["hash"] = previous = stage_hash(cfg, previous, run_dir)
      recorded = hashes.get(name, entry["hash"])  # a stage run before hashes were recorded is taken as it is
      if (stage_dir / "config.json").exists() and recorded != entry["hash"]:
        if not force:
          raise RunFolderError(
              f"stage {name!r} in {run_dir} was run with another config (hash {recorded}, now {entry['hash']}; "
              "its own or an earlier stage's changed); run with --force to re-run it and the stages after it (the "
              f"old folders move to {run_dir / 'replaced'}), or use another --workdir")
        replace.append((stage_dir, f"{name}-{recorded}"))
  if jax.process_index() == 0:  # past the start: nothing here is undone (the replaced folders are kept)
    for stage_dir, aside in replace:
      (run_dir / "replaced").mkdir(exist_ok=True)
      target = run_dir / "replaced" / aside
      while target.exists():
        target = target.with_name(target.name + "-again")
      stage_dir.rename(target)
    write_atomic(run_dir / "config.json", json.dumps(config, indent=2, default=str))
  sync_processes("jaxstages: run folder set up")
  rows = []
  for entry, cfg in stages:
    stage_dir = run_dir / entry["name"]
    summary_path = stage_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    done = (summary.get("steps") == cfg["stage"]["steps"]
            and summary.get("finished", summary["step"] == summary["steps"]))
    eval_cfg = _eval_config(config, entry, cfg)
    eval_path = stage_dir / "eval.json"
    # an evaluation made with another protocol (problems, samples, prompt) is made again
    evaluated = eval_path.exists() and done and (
        json.loads(eval_path.read_text())["config"] == json.loads(json.dumps(dataclasses.asdict(eval_cfg))))
    sync_processes(f"jaxstages: stage {entry['name']} looked at")  # the same decisions on every process
    if not done:
      if jax.process_index() == 0:  # recorded before the stage writes anything: a killed one resumes under it
        hashes[entry["name"]] = entry["hash"]
        write_atomic(run_dir / STAGE_HASHES, json.dumps(hashes, indent=2))
      run_stage(cfg, stage_dir)  # records its wall time per attempt (killed ones too): the summary sums them
      summary = json.loads(summary_path.read_text())  # process 0 wrote it before every process left run_stage
    if evaluated:
      result = json.loads(eval_path.read_text())
    else:
      mesh = make_mesh()
      model = load_model(stage_dir, mesh)
      result = evaluate(model, load_tokenizer(run_dir / "tokenizer"), data_config(cfg["data"]).task, eval_cfg,
                        mesh=mesh, show_progress=False)
      del model
      if jax.process_index() == 0:
        write_atomic(eval_path, json.dumps(result, indent=2))
    rows.append(_report_row(entry, cfg, summary, _wall_seconds(summary, stage_dir), result, config))
  protocol = dataclasses.asdict(_eval_config(config, {}))  # the sampling protocol shared by every stage
  report = {"name": config.get("name", run_dir.name), "run_dir": str(run_dir), "stages": rows,
            "eval": {k: protocol[k] for k in ("problems", "n", "ks", "temperature")},
            "total_flops": sum(r["flops"] for r in rows), "total_wall_s": sum(r["wall_s"] for r in rows)}
  if jax.process_index() == 0:
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2))
    write_atomic(run_dir / "report.md", report_markdown(report))
    plot_report(report, run_dir / "report.png")
  return report


def plot_report(report: dict, path: str | Path) -> None:
  """Strict pass@1 of every evaluation cell after each stage against the cumulative FLOPs spent so far: one panel per
  context, one line per op, a linear FLOPs axis with each stage's end marked and named above the panels (matplotlib
  is imported here, only when a report is plotted: it is the one heavy dependency of this module)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  flops, total = [], 0.0
  for r in report["stages"]:
    total += r["flops"]
    flops.append(total)
  cells = [(c["context"], c["op"]) for c in report["stages"][0]["eval"]]
  contexts = list(dict.fromkeys(ctx for ctx, _ in cells))
  fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts) + 1, 4), sharey=True, squeeze=False)
  for ax, ctx in zip(axes[0], contexts):
    for op in [op for c, op in cells if c == ctx]:
      ys = [next((c["pass@1"] for c in r["eval"] if (c["context"], c["op"]) == (ctx, op)), float("nan"))
            for r in report["stages"]]
      ax.plot(flops, ys, marker="o", label=f"op {op}")
    for i, (x, r) in enumerate(zip(flops, report["stages"])):  # names staggered: close stages do not overlap
      ax.axvline(x, color="0.85", lw=0.8, zorder=0)
      ax.annotate(r["stage"], (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3 + 10 * (i % 2)),
                  textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=30)
    ax.set_xlim(0, total * 1.05 or 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("cumulative FLOPs")
    ax.set_title(f"context {ctx}", pad=32)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("strict pass@1" + (" (greedy)" if report.get("eval", {}).get("n", 1) == 1 else ""))
  fig.suptitle(report["name"])
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _wall_seconds(summary: Mapping, stage_dir: Path) -> float:
  """A stage's wall time summed over its attempts (`train.run_stage` records each, killed ones up to their last
  record); for a stage trained before attempts were recorded, the pipeline's own record of its completed runs, or
  the last run's time."""
  if "wall_s" in summary:
    return summary["wall_s"]
  legacy = stage_dir / "wall_seconds.json"
  return sum(json.loads(legacy.read_text())) if legacy.exists() else summary.get("wall_s_this_run", 0.0)


def _report_row(entry, cfg, summary, wall: float, result: dict, pipeline: Mapping) -> dict:
  peak = peak_flops_per_device(cfg["stage"].get("peak_flops_per_device"))
  price = float(pipeline.get("price_per_chip_hour") or 0.0)
  flops = summary.get("flops_spent", summary["flops"])  # RL: measured, with sampling as executed
  device_s = summary.get("device_s", wall * jax.device_count())  # chip-seconds over every attempt
  return {"stage": entry["name"], "kind": cfg["stage"]["kind"], "steps": summary["step"],
          "tokens": summary["tokens"], "flops": flops, "planned_flops": entry["planned_flops"],
          "wall_s": wall, "attempts": summary.get("attempts", 1), "processes": summary.get("processes", 1),
          "mfu": flops / (peak * device_s) if peak and device_s else None,
          "cost": device_s / 3600 * price, "eval": result["cells"],
          "eval_prompt": result["config"]["prompt"]}


def report_markdown(report: dict) -> str:
  """The report card: the stages' compute, then the evaluation table after each stage (pass@1 by op and
  context)."""
  lines = [f"# {report['name']}", "",
           "| stage | kind | steps | tokens | FLOPs (planned) | FLOPs (spent) | wall s | MFU | cost |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in report["stages"]:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "—"
    lines.append(f"| {r['stage']} | {r['kind']} | {r['steps']:,} | {r['tokens']:,} | {r['planned_flops']:.3g} | "
                 f"{r['flops']:.3g} | {r['wall_s']:.0f} | {mfu} | {r['cost']:.2f} |")
  lines.append(f"| total | | | | | {report['total_flops']:.3g} | {report['total_wall_s']:.0f} | | |")
  cells = [(c["context"], c["op"]) for c in report["stages"][0]["eval"]]
  ev = report.get("eval") or {"n": 1, "temperature": 0.0, "ks": [1]}
  how = ("greedy" if ev["n"] == 1 else
         f"{ev['n']} samples per problem at temperature {ev['temperature']:g}; pass@1 is their mean")
  for k in ev["ks"]:
    lines += ["", f"Strict pass@{k} after each stage ({how}" + ("; `answer@1` in brackets: right answer, steps "
              "unchecked" if k == 1 else "") + "):", "",
              "| after | prompt | " + " | ".join(f"{ctx} op {op}" for ctx, op in cells) + " |",
              "| --- | --- |" + " ---: |" * len(cells)]
    for r in report["stages"]:
      by = {(c["context"], c["op"]): c for c in r["eval"]}
      lines.append(f"| {r['stage']} | {r['eval_prompt']} | " + " | ".join(
          (f"{by[c][f'pass@{k}']:.1%}" + (f" ({by[c]['answer@1']:.0%})" if k == 1 else "")) if c in by else "—"
          for c in cells) + " |")
  return "\n".join(lines) + "\n"


def load_pipeline(spec: str, overrides=()) -> dict:
  return to_dict(apply_overrides(load_config(spec), list(overrides)))

