"""What every experiment shares: its scale (model, base, RL and evaluation settings), the command line, running one
arm x seed as a pipeline, evaluating a start model, summaries over seeds and the results folder.

An experiment is a few *arms*, each a pipeline of stages after a start model (the shared base of
`experiments/base.py`, or a base of its own), run once per seed. Every run folder is a `jaxstages run` folder named by
the hash of its config, `--workdir/<scale>/runs/<hash>`: re-running the command skips finished runs and resumes an
interrupted one, and experiments that need the same run share it. Results go to `experiments/results/<experiment>/`:
`results.json` (every number, per seed, with the command), `results.md` (the tables: mean ± spread over seeds, spread
= the sample standard deviation) and `<experiment>.png`.

Each experiment records what its numbers come from in an `Evidence`: every evaluation per problem and every run. From
it `write_results` adds the provenance (git commit, package versions, the base's and every run's config hash and
command), the experiment's claims (`Claim`: arm A − arm B on some ops, the expected sign) with their 95% paired
bootstrap intervals and verdicts (`experiments/stats.py`), and per-cell intervals for the plots' error bars; `check`
(`--check`) re-evaluates one recorded model and compares. The op ranges come from the shared base's measured
competence (`competence_bands`) where the scale allows, else from the scale's fixed `ranges`.

Scales: `cpu` is the toy world measured here (a 2-layer 0.49M-parameter model on a 2-core CPU), `minimal` the same
code at a size that runs in seconds (for the tests; its numbers mean nothing), `accelerator` the interplay study's
own sizes (a ~100M model on the story surface; shared REFERENCES) for a TPU or GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import stats
from jaxstages.config import apply_overrides, config_hash, load_config
from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.data.tokenizer import load_tokenizer
from jaxstages.evaluation import EvalConfig, evaluate
from jaxstages.metrics import read_metrics
from jaxstages.model.config import ModelConfig, param_count
from jaxstages.model.io import export_stage
from jaxstages.schedule import run_pipeline
from jaxstages.sharding import make_mesh
from jaxstages.train import load_model, run_stage

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
ARTIFACTS = REPO / "experiments" / "artifacts"


@dataclasses.dataclass(frozen=True)
class Scale:
  """One size of every experiment. Op ranges are (lo, hi) inclusive."""

  name: str
  model: dict  # model overrides for every stage (the base's shape)
  base: dict  # the base's pre-training: `config` (a training config) and `overrides` (dotted keys)
  midtrain: dict  # mid-training after the base: `config` and `overrides`
  rl: dict  # RL after the base: `config` and `overrides`
  rl_steps: int  # RL steps of an arm whose length is given in steps
  ranges: dict  # the op ranges: too-easy, in-distribution, edge, too-hard
  eval_ops: tuple  # the ops every experiment evaluates
  eval: dict  # evaluation.EvalConfig keys shared by every evaluation (problems, n, ks, temperature)
  contexts: tuple = ("p", "q")  # the main context and the second one (context seeding)
  budget_flops: float = 0.0  # compute_allocation: mid-training + RL budget after the base
  light_eval: dict = dataclasses.field(default_factory=dict)  # fewer samples (n, ks) for the many-arm experiments
  sizes: dict = dataclasses.field(default_factory=dict)  # rl_scaling: model overrides of each size, smallest first
  sft: dict = dataclasses.field(default_factory=dict)  # online_vs_offline's start: SFT of the base (chat)
  dpo: dict = dataclasses.field(default_factory=dict)  # online_vs_offline: DPO after that SFT
  distill: dict = dataclasses.field(default_factory=dict)  # distill_vs_rl: distillation on document prompts
  measured_bands: bool = True  # take `ranges` from the base's measured competence when it shows every band


# The base's pre-training mixture: context p, with the second context q seeded at 1% at op 1 only (context_seeding
# varies the share). The minimal scale's; the cpu base has its own (below).
SEEDED_Q = (("p", 0.99), ("q", 0.01, (1, 1)))

# The cpu world's task format, every stage alike: operands' values written inline where a step uses them, constants
# only a few lines before their use (docs/learnability.md: the format and the drills below are what the toy learns)
_CPU_TASK = {"data.task.reach": "near", "data.task.solution_format": "inline"}
# The cpu base (docs/learnability.md, "a rare tail"): 16,000 steps on ops 1-4 of context p (the trained depth, 4), half
# the documents look-up drills, the loss on the solution only, and a rare tail of deeper problems (ops 5-6 at 0.2% of
# the documents) so that the base reaches a little beyond its trained depth: the edge
CPU_BASE_MIXTURE = (("p", 0.998, (1, 4)), ("p", 0.002, (5, 6)))
_CPU_BASE = dict(_CPU_TASK, **{"stage.steps": 16000, "stage.checkpoint_every": 4000, "stage.keep_checkpoints": 1000,
                               "stage.async_checkpoints": False, "data.loss_on": "solution",
                               "data.task.recall_drills": 0.5, "data.task.contexts": CPU_BASE_MIXTURE})

# Settings measured on the toy world (experiments/README.md): RL with the strict reward on document prompts straight
# from the base, 32 prompts x 8 samples a step, lr 1.5e-4 constant (the quickstart's RL lr), no KL term.
_CPU_RL = {"data.prompt": "document", "data.batch_size": 32, "optim.lr": 1.5e-4, "grpo.reward.score": "strict",
           "grpo.eval_problems": 0, "stage.eval_every": 0, "stage.checkpoint_every": 20, "stage.log_every": 5}

# online_vs_offline's shared start: chat SFT of the base on context p, ops 1-3, plain answers (no think flag)
_CPU_SFT = {"data.task.reach": "near", "data.task.contexts": "p", "data.task.op_range": (1, 3), "stage.steps": 300,
            "stage.eval_every": 0, "stage.checkpoint_every": 300, "data.think_mix": (0.0, 0.0, 1.0),
            "data.seq_len": 256}
# DPO from that start: 32 pairs a step, β 0.1, lr 1e-4 constant (dpo-toy's), the KL drift on 32 held-out prompts
_CPU_DPO = {"data.task.reach": "near", "data.task.contexts": "p", "data.batch_size": 32, "stage.eval_every": 10,
            "stage.eval_batches": 2, "stage.checkpoint_every": 20, "stage.log_every": 5, "dpo.drift_prompts": 32,
            "dpo.drift_max_new_tokens": 64, "dpo.pair_samples": 8, "dpo.pair_max_new_tokens": 64}
# distillation on the RL stages' document prompts: 32 prompts a step, one completion each, lr 3e-4 constant
_CPU_DISTILL = {"data.kind": "rl", "data.sources": (), "data.prompt": "document", "data.task.reach": "near",
                "data.task.contexts": "p", "data.prompt_len": 48, "data.batch_size": 32, "stage.eval_every": 0,
                "stage.checkpoint_every": 50, "stage.log_every": 5, "optim.lr": 3e-4, "optim.schedule": "constant",
                "optim.warmup_fraction": 0.0, "optim.weight_decay": 0.0}
# the accelerator scale's chat / distillation stages on the interplay study's story surface (not run here)
_STORY_CHAT = {"data.task.surface": "story", "data.task.contexts": "zoo", "data.eval_contexts": ("zoo",),
               "data.task.op_range": (7, 14),
               "data.seq_len": 2048, "data.batch_size": 256}
_MINIMAL_STAGE = {"stage.log_every": 1, "stage.checkpoint_every": 100, "stage.async_checkpoints": False,
                  "stage.eval_every": 0, "data.seq_len": 128}

SCALES: dict[str, Scale] = {
    "cpu": Scale(
        name="cpu",
        model=dict(num_layers=2),
        base=dict(config="train.py:pretrain-toy", overrides=_CPU_BASE),
        # mid-training continues the base's documents (loss on the solution) on the ops an experiment names
        midtrain=dict(config="train.py:midtrain-toy",
                      overrides=dict(_CPU_TASK, **{"stage.eval_every": 0, "stage.checkpoint_every": 50,
                                                   "data.batch_size": 16, "data.loss_on": "solution",
                                                   "data.task.contexts": "p"})),
        rl=dict(config="train.py:grpo-toy", overrides=dict(_CPU_RL, **_CPU_TASK)),
        rl_steps=200,
        # when the base's evaluation misses a band (the bands are measured: `competence_bands`): the trained depth is 4,
        # the rare tail reaches ops 5-6
        ranges={"too-easy": (1, 1), "in-distribution": (2, 4), "edge": (5, 6), "too-hard": (8, 8)},
        eval_ops=(1, 2, 3, 4, 5, 6, 7, 8),
        eval=dict(problems=256, n=64, ks=(1, 4, 16, 64), temperature=1.0),
        # all-RL on the edge band (ops 5-6: 96-token prompts, 112 new tokens) spends ~2.2e11 FLOPs a step (an update of
        # 256 x 208 tokens and the sampling; edge_of_competence's edge runs spent 4.39-4.43e13 in 200 steps, its
        # in-distribution ones 2.83e13), so the budget gives all-RL >= 200 steps
        budget_flops=4.6e13,
        light_eval=dict(n=16, ks=(1, 4, 16)),
        sizes={"1 layer": dict(num_layers=1), "2 layers": dict(num_layers=2), "4 layers": dict(num_layers=4)},
        sft=dict(config="train.py:sft-toy", overrides=dict(_CPU_SFT, **_CPU_TASK)),
        dpo=dict(config="train.py:dpo-toy", overrides=dict(_CPU_DPO, **_CPU_TASK)),
        distill=dict(config="train.py:distill-toy", overrides=dict(_CPU_DISTILL, **_CPU_TASK)),
    ),
    "minimal": Scale(
        name="minimal",
        # batches of 8: one row per device of the test mesh
        model=dict(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
        base=dict(config="train.py:pretrain-toy",
                  overrides={"stage.steps": 6, "stage.eval_every": 0, "stage.checkpoint_every": 6,
                             "stage.log_every": 3, "stage.async_checkpoints": False, "data.task.reach": "near",
                             "data.task.contexts": SEEDED_Q, "data.task.op_range": (1, 2), "data.seq_len": 128}),
        midtrain=dict(config="train.py:midtrain-toy",
                      overrides={"stage.eval_every": 0, "stage.checkpoint_every": 100, "stage.log_every": 1,
                                 "stage.async_checkpoints": False, "data.batch_size": 8, "data.seq_len": 128,
                                 "data.task.reach": "near", "data.task.contexts": SEEDED_Q,
                                 "data.task.op_range": (1, 2)}),
        rl=dict(config="train.py:grpo-toy",
                overrides=dict(_CPU_RL, **{"data.task.reach": "near",
                                           "data.batch_size": 8, "grpo.rollout.group_size": 2,
                                           "grpo.rollout.max_new_tokens": 24, "stage.log_every": 1,
                                           "stage.checkpoint_every": 100, "stage.async_checkpoints": False})),
        rl_steps=1,
        ranges={"too-easy": (1, 1), "in-distribution": (1, 1), "edge": (2, 2), "too-hard": (2, 2)},
        measured_bands=False,  # a few steps of a tiny model: its measured competence means nothing
        eval_ops=(1, 2),
        eval=dict(problems=2, n=2, ks=(1, 2), temperature=1.0, max_new_tokens=24),
        budget_flops=2e9,
        light_eval=dict(n=2, ks=(1, 2)),
        sizes={"1 layer": dict(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
               "2 layers": dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)},
        sft=dict(config="train.py:sft-toy", overrides=dict(_CPU_SFT, **_MINIMAL_STAGE, **{"stage.steps": 2})),
        dpo=dict(config="train.py:dpo-toy", overrides=dict(_CPU_DPO, **_MINIMAL_STAGE, **{
            "data.batch_size": 8, "dpo.drift_prompts": 2, "dpo.pair_samples": 2, "dpo.pair_max_new_tokens": 24,
            "dpo.drift_max_new_tokens": 24})),
        distill=dict(config="train.py:distill-toy", overrides=dict(_CPU_DISTILL, **_MINIMAL_STAGE, **{
            "data.batch_size": 8, "distill.max_new_tokens": 24})),
    ),
    # the interplay study (shared REFERENCES): ~100M Qwen2-shape model, story surface, pre-training on op 2-10, RL sets
    # op 7-10 / 11-14 / 17-20, 128 samples at temperature 0.7
    "accelerator": Scale(
        name="accelerator",
        # interplay-100m's shape (configs/models.py) for every stage, including those whose configs are the toy ones
        # (whose compute dtype, float32, they keep)
        model=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=2, intermediate_size=3072,
                   rope_theta=1_000_000.0, max_position_embeddings=2048),
        base=dict(config="train.py:pretrain-interplay", overrides={}),
        midtrain=dict(config="train.py:midtrain-interplay", overrides={}),
        rl=dict(config="train.py:grpo-interplay", overrides={"data.prompt": "document", "grpo.reward.score": "strict"}),
        rl_steps=200,
        ranges={"too-easy": (2, 6), "in-distribution": (7, 10), "edge": (11, 14), "too-hard": (17, 20)},
        eval_ops=(5, 8, 10, 12, 14, 16, 18, 20),
        eval=dict(problems=128, n=128, ks=(1, 8, 32, 128), temperature=0.7),
        contexts=("zoo", "school"),
        budget_flops=2e19,
        light_eval=dict(n=32, ks=(1, 8, 32)),
        # the RL scaling study's ladder (0.5B-72B) at 4x steps of width: the interplay model's shape at 1/4, 1/2, 1x
        sizes={"25m": dict(hidden_size=384, num_layers=8), "50m": dict(hidden_size=512, num_layers=12),
               "100m": {}},
        sft=dict(config="train.py:sft-toy", overrides=_STORY_CHAT),
        dpo=dict(config="train.py:dpo-toy",
                 overrides=dict(_STORY_CHAT, **{"dpo.drift_prompts": 128, "stage.eval_every": 20})),
        distill=dict(config="train.py:distill-toy", overrides=dict(_STORY_CHAT, **{
            "data.kind": "rl", "data.sources": (), "data.prompt": "document", "data.prompt_len": 1024,
            "distill.max_new_tokens": 1024})),
    ),
}


# -- command line ------------------------------------------------------------------------------------------------------

def parse_args(experiment: str, doc: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
  """The command line of `python -m experiments.<experiment>`: `--seeds N` (seeds 0..N-1), `--scale`, `--workdir`
  (run folders), `--out` (results folder), `--arms` (a subset, comma-separated), `--check` (re-evaluate one
  recorded model and compare with `results.json`: `check`)."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
  parser.add_argument("--workdir", default=str(REPO / "runs" / "experiments"))
  parser.add_argument("--out", default=None, help="default: experiments/results/<experiment> (cpu), else "
                                                  "<workdir>/results/<experiment>")
  parser.add_argument("--arms", default=None, help="run only these arms (comma-separated)")
  parser.add_argument("--check", action="store_true", help="re-evaluate the model results.json names for checking "
                                                           "(its run folder in --workdir) and compare; runs nothing")
  if extra:
    extra(parser)
  args = parser.parse_args(argv)
  given = list(sys.argv[1:] if argv is None else argv)
  kept = []  # the command without --workdir / --out: where runs and results go does not change them
  while given:
    a = given.pop(0)
    if a in ("--workdir", "--out"):
      given.pop(0)
    elif not a.startswith(("--workdir=", "--out=")):
      kept.append(a)
  args.command = " ".join(["python -m", f"experiments.{experiment}", *map(shlex.quote, kept)])
  return args


def out_dir(args: argparse.Namespace, experiment: str) -> Path:
  if args.out:
    return Path(args.out)
  return RESULTS / experiment if args.scale == "cpu" else Path(args.workdir) / args.scale / "results" / experiment


def chosen(arms: Sequence[str], args: argparse.Namespace) -> list[str]:
  if not args.arms:
    return list(arms)
  picked = args.arms.split(",")
  unknown = [a for a in picked if a not in arms]
  if unknown:
    raise SystemExit(f"unknown arm(s) {unknown}; this experiment's arms: {list(arms)}")
  return [a for a in arms if a in picked]


# -- runs --------------------------------------------------------------------------------------------------------------

def stage(config: Mapping, name: str, start: str | Path | None = None, steps: int | None = None,
          flops: float | None = None, **overrides: Any) -> dict:
  """A pipeline stage entry from a scale's `base` / `midtrain` / `rl` block, starting from `start` (default: the
  previous stage), with extra dotted-key overrides."""
  entry = {"name": name, "config": config["config"], "overrides": dict(config["overrides"], **overrides)}
  if start is not None:
    entry["overrides"]["stage.init_from"] = str(start)
  if steps is not None:
    entry["steps"] = steps
  if flops is not None:
    entry["flops"] = flops
  return entry


def eval_protocol(scale: Scale, eval_ops: Sequence[int] | None = None, contexts: Sequence[str] | None = None,
                  problems: int | None = None, samples: Mapping | None = None) -> dict:
  """The scale's evaluation (EvalConfig keys) on `eval_ops` x `contexts` (default: the scale's ops, its main
  context), with `problems` per cell when given and `samples` (e.g. `scale.light_eval`: n and ks) replacing the
  scale's."""
  protocol = dict(scale.eval, ops=tuple(eval_ops or scale.eval_ops), contexts=tuple(contexts or scale.contexts[:1]),
                  **(samples or {}))
  if problems:
    protocol["problems"] = problems
  return protocol


def pipeline(scale: Scale, name: str, stages: list[dict], seed: int, eval_ops: Sequence[int] | None = None,
             contexts: Sequence[str] | None = None, problems: int | None = None,
             samples: Mapping | None = None, model: Mapping | None = None) -> dict:
  """A pipeline config: `stages` with the scale's model (or `model`), `seed` for initialisation, sampling and the
  data order, and the scale's evaluation after every stage (`eval_protocol`)."""
  return {"name": name, "stages": stages,
          "overrides": {"model": dict(scale.model if model is None else model), "stage": {"seed": seed}},
          "eval": eval_protocol(scale, eval_ops, contexts, problems, samples),
          "compute": {"total_flops": 0.0, "split": {}}, "price_per_chip_hour": 0.0}


def rl_max_new_tokens(scale: Scale, hi: int) -> int:
  """Room for the gold solution of an op-`hi` problem with slack (as the evaluation's default)."""
  return max(scale.rl["overrides"].get("grpo.rollout.max_new_tokens", 0), 16 * hi + 16)


def block_config(scale: Scale, block: Mapping, model: Mapping | None = None, **overrides: Any):
  """The full stage config of a scale's block (`config` and `overrides`, e.g. `scale.rl`) with the scale's model shape
  (or `model`), then `overrides` (dotted keys)."""
  values = {**{f"model.{k}": v for k, v in (scale.model if model is None else model).items()}, **block["overrides"],
            **overrides}
  return apply_overrides(load_config(block["config"]), [f"{k}={v!r}" for k, v in values.items()])


def rl_data(scale: Scale):
  """The RL stages' data config (`DataConfig`) with the scale's `data.*` overrides: its task is the problem world every
  evaluation draws from."""
  return data_config(block_config(scale, scale.rl).data)


def rl_shape(scale: Scale) -> dict:
  """The RL stages' prompts a step (`batch`), samples a prompt (`group`) and logging interval (`log_every`), from the
  scale's RL config with its overrides."""
  cfg = block_config(scale, scale.rl)
  return {"batch": cfg.data.batch_size, "group": cfg.grpo.rollout.group_size, "log_every": cfg.stage.log_every}


def rl_prompt_len(scale: Scale, start: str | Path, op_range: tuple[int, int], chat: bool = False) -> dict:
  """`{"data.prompt_len": n}` when the RL config's prompt length is too short for the problems of `op_range` (the
  longest of 256 train problems at its top op, as documents or chat turns (`chat`), in the start's tokenizer,
  rounded up to 32), else nothing."""
  data = rl_data(scale)
  tokenizer = load_tokenizer(Path(start) / "tokenizer")
  problems = [tasks.generate(data.task, 0, "train", i, op=op_range[1]) for i in range(256)]
  longest = max(len(tokenizer.encode_chat(tasks.rl_prompt(p)["messages"], add_generation_prompt=True)[0] if chat
                    else tokenizer.encode(p.text() + "\n")) for p in problems)
  return {} if longest <= data.prompt_len else {"data.prompt_len": -(-(longest + 8) // 32) * 32}


def rl_pipeline(scale: Scale, name: str, start: str | Path, op_range: tuple[int, int], seed: int,
                steps: int | None = None, eval_ops: Sequence[int] | None = None,
                eval_contexts: Sequence[str] | None = None, eval_problems: int | None = None,
                model: Mapping | None = None, **overrides: Any) -> dict:
  """RL from `start` on `op_range` for `steps` (default the scale's `rl_steps`), prompts and sampling by `seed`,
  evaluated on `eval_ops` x `eval_contexts` (default: the scale's ops, its main context); `model`: another shape
  than the scale's (the start's)."""
  rl = stage(scale.rl, "rl", start=start, steps=steps or scale.rl_steps, **{
      "data.task.op_range": tuple(op_range), "data.seed": 100 + seed,
      "grpo.rollout.max_new_tokens": rl_max_new_tokens(scale, op_range[1]), **rl_prompt_len(scale, start, op_range),
      **overrides})
  return pipeline(scale, name, [rl], seed, eval_ops=eval_ops, contexts=eval_contexts, problems=eval_problems,
                  model=model)


def run(config: Mapping, workdir: str | Path, scale: Scale) -> tuple[dict, Path]:
  """Runs (or resumes, or only reads back) one pipeline in `<workdir>/<scale>/runs/<hash>`, the hash of its config
  without its name, so experiments that need the same run share it. Returns its report
  (`jaxstages.schedule.run_pipeline`) and its folder."""
  run_dir = Path(workdir) / scale.name / "runs" / config_hash({k: v for k, v in config.items() if k != "name"})
  print(f"-- {config['name']}: {run_dir}", flush=True)
  return run_pipeline(config, run_dir), run_dir


def recorded_path(path: str | Path, workdir: str | Path) -> str:
  """How a results file names a folder: relative to the repository (a committed artifact) or to `--workdir` (a
  run), so the file does not depend on where either lives."""
  path = Path(path).resolve()
  for root in (REPO, Path(workdir).resolve()):
    if path.is_relative_to(root):
      return str(path.relative_to(root))
  return str(path)


def found_path(recorded: str, workdir: str | Path) -> Path:
  """The folder a results file names (`recorded_path`): in the repository if it is there, else in `workdir`."""
  return REPO / recorded if (REPO / recorded).exists() else Path(workdir) / recorded


def model_params(folder: str | Path) -> int:
  """Parameters of a stage or params folder's model (embeddings included)."""
  folder = Path(folder)
  if (folder / "model_config.json").exists():
    return param_count(ModelConfig(**json.loads((folder / "model_config.json").read_text())))
  model = json.loads((folder / "config.json").read_text())["model"]
  model["vocab_size"] = model["vocab_size"] or load_tokenizer(folder / "tokenizer").vocab_size
  return param_count(ModelConfig(**model))


def finished(run_dir: Path) -> bool:
  """Whether a stage folder holds its last step."""
  path = run_dir / "summary.json"
  if not path.exists():
    return False
  summary = json.loads(path.read_text())
  return summary.get("step") == summary.get("steps")


def ensure_stage(scale: Scale, workdir: str | Path, name: str, block: Mapping, start: str | Path,
                 model: Mapping | None = None, **overrides: Any) -> Path:
  """A start model every arm shares (e.g. an SFT of the base): the scale's `block` (`config` and `overrides`) from
  `start` with `overrides`, trained once in `<workdir>/<scale>/<name>-<config hash>`; returns the folder."""
  cfg = block_config(scale, block, model, **{"stage.init_from": str(start), **overrides})
  run_dir = Path(workdir) / scale.name / f"{name}-{config_hash(cfg)}"
  if not finished(run_dir):
    print(f"-- training {run_dir}", flush=True)
    run_stage(cfg, run_dir)
  return run_dir


def evaluate_start(scale: Scale, source: str | Path, workdir: str | Path, eval_ops: Sequence[int] | None = None,
                   contexts: Sequence[str] | None = None, problems: int | None = None,
                   samples: Mapping | None = None, prompt: str = "document", cached: bool = True) -> dict:
  """The scale's evaluation of a start model (a stage or params folder) with document (or chat) prompts, cached in
  `<workdir>/<scale>/evals/` by the folder's name, the config hash of the model in it (`folder_hash`: a folder
  re-filled with another model is evaluated again) and the evaluation's config hash (`cached=False`: evaluated again,
  the cache left as it is)."""

  source = Path(source)
  cfg = EvalConfig.from_config(dict(eval_protocol(scale, eval_ops, contexts, problems, samples), prompt=prompt))
  task = rl_data(scale).task  # the problems the runs after the start are evaluated on (e.g. operands on one chain)
  key = config_hash({"eval": dataclasses.asdict(cfg), "task": dataclasses.asdict(task)})
  path = Path(workdir) / scale.name / "evals" / f"{source.name}-{folder_hash(source)}-{key}.json"
  if cached and path.exists() and "correct" in json.loads(path.read_text())["cells"][0]:  # older: no per-problem
    return json.loads(path.read_text())

  mesh = make_mesh()
  model = load_model(source, mesh)
  tokenizer = load_tokenizer(source / "tokenizer")
  print(f"-- evaluating {source}", flush=True)
  result = evaluate(model, tokenizer, task, cfg, mesh=mesh, show_progress=False)
  if cached:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
  return result


def cells(result: Mapping | Sequence[Mapping]) -> dict[tuple[str, int], dict]:
  """An evaluation's cells (or a report row's `eval` list) by (context, op)."""
  return {(c["context"], c["op"]): c for c in (result["cells"] if isinstance(result, Mapping) else result)}


def stage_metrics(run_dir: str | Path, stage_name: str, keys: Sequence[str]) -> list[dict]:
  """Rows of a stage's `metrics.jsonl` (training rows only, one per step as the run went on: `read_metrics`)
  holding `step` and `keys`."""
  rows = [r for r in read_metrics(Path(run_dir) / stage_name / "metrics.jsonl", as_run=True) if keys[0] in r]
  return [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in rows]


# -- bands from the base's measured competence -------------------------------------------------------------------------

BANDS = ("too-easy", "in-distribution", "edge", "too-hard")
# the rules, on strict pass@1 and pass@K (K: the largest evaluated k, at least 64) of the base per op: too hard when
# even K samples almost never solve it; the edge beyond the depth the base was trained on, rarely solved at pass@1 but
# often within K samples; too easy when one sample nearly always does; in-distribution the rest within the trained
# depth
BAND_RULES = {"too-hard": "pass@K <= 2%", "edge": "op beyond the trained depth, pass@1 <= 10%, pass@K >= 30%",
              "too-easy": "pass@1 >= 90%", "in-distribution": "op within the trained depth, none of the above"}


def band_of(op: int, pass1: float, pass_k: float, depth: int) -> str | None:
  """The band of one op by `BAND_RULES` (None: it fits none, e.g. beyond the trained depth but solved at pass@1)."""
  if pass_k <= 0.02:
    return "too-hard"
  if op > depth:
    return "edge" if pass1 <= 0.10 and pass_k >= 0.30 else None
  return "too-easy" if pass1 >= 0.90 else "in-distribution"


def competence_bands(scale: Scale, base_eval: Mapping, context: str = "p") -> dict:
  """The op ranges every experiment trains and evaluates on: from the shared base's evaluation (`base_eval`, at the
  scale's ops) by `BAND_RULES` when the scale measures its bands and every band holds an op (each band's range: its
  lowest to its highest op), else the scale's fixed `ranges`, with the reason. The trained depth is the top of the
  base's pre-training op range. Returns `{"source": "measured" | "fixed", "reason", "ranges", "rules",
  "trained_depth", "per_op": {op: {pass@1, pass@K, band}}}`."""
  depth = data_config(block_config(scale, scale.base).data).task.op_range_of(scale.contexts[0])[1]
  by_cell = cells(base_eval)
  ks = sorted(int(m.split("@")[1]) for m in next(iter(by_cell.values())) if m.startswith("pass@"))
  k = ks[-1]
  per_op = {}
  for (ctx, op), cell in sorted(by_cell.items()):
    if ctx == context:
      per_op[str(op)] = {"pass@1": cell["pass@1"], f"pass@{k}": cell[f"pass@{k}"],
                         "band": band_of(op, cell["pass@1"], cell[f"pass@{k}"], depth) if k >= 64 else None}
  found = {b: [int(op) for op, row in per_op.items() if row["band"] == b] for b in BANDS}
  if not scale.measured_bands:
    reason = f"the {scale.name} scale's fixed ranges: its base's measured competence means nothing"
  elif k < 64:
    reason = f"the base's evaluation holds pass@k only up to k = {k}; the bands need k >= 64"
  elif not all(found.values()):
    reason = (f"no op of the base's evaluation (ops {', '.join(per_op)}) is in band(s) "
              f"{', '.join(b for b in BANDS if not found[b])}; the scale's fixed ranges instead")
  elif mixed := [b for b, ops in found.items() if any(per_op[str(op)]["band"] != b for op in
                                                      range(min(ops), max(ops) + 1) if str(op) in per_op)]:
    reason = (f"the ops of band(s) {', '.join(mixed)} are not contiguous (another band lies between them); the "
              "scale's fixed ranges instead")
  else:
    reason = None
  ranges = ({b: (min(ops), max(ops)) for b, ops in found.items()} if reason is None
            else {b: tuple(r) for b, r in scale.ranges.items()})
  return {"source": "fixed" if reason else "measured", "reason": reason or f"measured on the base (K = {k})",
          "ranges": ranges, "rules": {b: r.replace("K", str(max(k, 64))) for b, r in BAND_RULES.items()},
          "trained_depth": depth, "per_op": per_op}


def bands_markdown(bands: Mapping) -> str:
  ranges = ", ".join(f"{b} {lo}-{hi}" for b, (lo, hi) in bands["ranges"].items())
  rules = "; ".join(f"{b}: {r}" for b, r in bands["rules"].items())
  return (f"Op ranges ({bands['source']}: {bands['reason']}): {ranges}. Rules: {rules}; "
          f"trained depth {bands['trained_depth']}.\n\n")


# -- evidence: every evaluation per problem, every run, the claims' intervals ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Claim:
  """A difference a claim rests on: label `a` minus label `b` on strict `metric`, averaged over `ops` (op numbers,
  or a band's name: its range's ops) in `context`; `sign` +1 (a above b), -1 (a below b) or 0 (no difference,
  within ±`margin`)."""

  text: str
  a: str
  b: str
  ops: tuple[int, ...] | str
  metric: str = "pass@1"
  sign: int = 1
  context: str = "p"
  margin: float = 0.02


class Evidence:
  """What an experiment's numbers come from: every evaluation per problem (label -> seed -> cells: the bootstrap's
  input), every run (config hash, folder, label, seed) and every start model (folder, config hash, protocol).
  `run` and `start` run or evaluate and record; `write_results` turns the record into provenance, intervals and
  claims."""

  def __init__(self, args: argparse.Namespace, scale: Scale):
    self.args, self.scale = args, scale
    self.evals: dict[str, dict[int, dict]] = {}  # label -> seed -> {"source", "cells": {(context, op): cell}}
    self.runs: dict[str, dict] = {}  # config hash -> what made it
    self.starts: dict[str, dict] = {}  # folder -> its config hash
    self.base: dict | None = None  # the shared base: folder and config hash

  def note_base(self, folder: str | Path) -> None:
    """Records the shared base every arm starts from (`start` does for the label "base")."""
    self.base = {"folder": recorded_path(folder, self.args.workdir), "config_hash": folder_hash(Path(folder))}

  def run(self, config: Mapping, label: str, seed: int) -> tuple[dict, Path]:
    """`run` (the shared pipeline machinery), recording the run and its final stage's evaluation as `label`, `seed`."""
    report, run_dir = run(config, self.args.workdir, self.scale)
    folder = recorded_path(run_dir, self.args.workdir)
    last = report["stages"][-1]["stage"]
    protocol = json.loads((run_dir / last / "eval.json").read_text())["config"]
    entry = self.runs.setdefault(run_dir.name, {"name": config["name"], "folder": folder, "command": self.args.command,
                                                "stages": [r["stage"] for r in report["stages"]], "labels": []})
    entry["labels"].append(f"{label}#{seed}")  # a run two labels share (e.g. rl_scaling's τ = 1 and its size)
    self._add(label, seed, {"run": folder, "stage": last, "eval": protocol}, report["stages"][-1]["eval"])
    return report, run_dir

  def start(self, label: str, folder: str | Path, **protocol: Any) -> dict:
    """`evaluate_start` of a start model (`protocol`: its keyword arguments), recorded as `label` (one "seed")."""
    result = evaluate_start(self.scale, folder, self.args.workdir, **protocol)
    where = recorded_path(folder, self.args.workdir)
    self.starts[where] = {"config_hash": folder_hash(Path(folder))}
    if label == "base":
      self.note_base(folder)
    self._add(label, 0, {"start": where, "protocol": protocol}, result["cells"])
    return result

  def _add(self, label: str, seed: int, source: dict, evaluated: Sequence[Mapping]) -> None:
    if seed in self.evals.setdefault(label, {}):
      raise ValueError(f"evaluation {label!r} seed {seed} recorded twice: give each arm x seed its own label")
    self.evals[label][seed] = {"source": source, "cells": cells(evaluated)}

  def stats_cells(self, label: str, context: str, ops: Sequence[int]) -> list[stats.Cell]:
    """`label`'s cells at `ops` for the bootstrap: every seed's counts, seeds in order."""
    runs = [self.evals[label][s]["cells"] for s in sorted(self.evals[label])]
    out = []
    for op in ops:
      per_seed = [r[(context, op)] for r in runs]
      ids = [tuple(problem_ids(c)) for c in per_seed]
      if len(set(ids)) > 1:
        raise ValueError(f"{label}'s seeds were evaluated on different problems at {context} op {op}")
      out.append(stats.Cell(n=per_seed[0]["samples"], correct=np.array([c["correct"] for c in per_seed]),
                            ids=ids[0]))
    return out

  def ops_of(self, label: str, context: str) -> list[int]:
    first = self.evals[label][min(self.evals[label])]["cells"]
    return sorted(op for ctx, op in first if ctx == context)

  def claim(self, claim: Claim, ranges: Mapping) -> dict:
    """One claim's difference, its interval and verdict (or why it was not measured)."""
    out = {**dataclasses.asdict(claim), "ops": claim.ops}
    if claim.a not in self.evals or claim.b not in self.evals:
      return {**out, "verdict": "not run", "note": f"{claim.a if claim.a not in self.evals else claim.b} not run"}
    wanted = range(ranges[claim.ops][0], ranges[claim.ops][1] + 1) if isinstance(claim.ops, str) else claim.ops
    ops = [op for op in wanted if op in self.ops_of(claim.a, claim.context) and op in
           self.ops_of(claim.b, claim.context)]
    if not ops:
      return {**out, "verdict": "not evaluated", "note": f"the two share no evaluated op among {list(wanted)}"}
    interval = stats.bootstrap(self.stats_cells(claim.a, claim.context, ops),
                               self.stats_cells(claim.b, claim.context, ops), claim.metric)
    return {**out, "ops": ops, **interval, "verdict": stats.verdict(interval, claim.sign, claim.margin)}

  def intervals(self) -> dict:
    """Every label's every cell and pass@k: the mean and its bootstrap interval, `{label: {"context/op": {metric:
    [mean, low, high]}}}` (the plots' error bars)."""
    out = {}
    for label, seeds in self.evals.items():
      first = seeds[min(seeds)]["cells"]
      for (ctx, op), cell in first.items():
        for metric in (m for m in cell if m.startswith("pass@")):
          b = stats.bootstrap(self.stats_cells(label, ctx, [op]), None, metric)
          out.setdefault(label, {}).setdefault(f"{ctx}/{op}", {})[metric] = [b["estimate"], b["low"], b["high"]]
    return out

  def record(self) -> dict:
    """The per-problem evaluations for results.json: `evals` (label -> seed -> source and cells: n, correct, the
    metrics and the problems' ids by digest) and `problem_ids` (digest -> ids)."""
    evals, id_lists = {}, {}
    for label, seeds in self.evals.items():
      for seed, entry in sorted(seeds.items()):
        out = {}
        for (ctx, op), cell in entry["cells"].items():
          ids = problem_ids(cell)
          digest = config_hash({"ids": ids})
          id_lists[digest] = ids
          out[f"{ctx}/{op}"] = {"n": cell["samples"], "ids": digest, "correct": cell["correct"],
                                "sample_hashes": cell.get("sample_hashes"),
                                **{m: v for m, v in cell.items() if m.startswith(RECORDED)}}
        evals.setdefault(label, {})[str(seed)] = {"source": entry["source"], "cells": out}
    return {"evals": evals, "problem_ids": id_lists}

  def check_target(self) -> dict:
    """What `--check` re-evaluates: the first run's (an arm, its first seed), else the first start model."""
    for label, seeds in self.evals.items():
      seed = min(seeds)
      if "run" in seeds[seed]["source"]:
        return {"label": label, "seed": seed}
    label = next(iter(self.evals))
    return {"label": label, "seed": min(self.evals[label])}


# a cell's numbers results.json records (and --check compares): the metrics, and what the samples look like (their
# mean length, the share with an answer line, in the expected form), which differ with any change of the samples even
# where nothing is solved
RECORDED = ("pass@", "maj@", "answer@", "mean_length", "answered", "format")


def problem_ids(cell: Mapping) -> list[str]:
  """A cell's problems' ids (`evaluation.problem_id`); evaluations made before ids were recorded name them by position
  (`#i`: the same eval seed and task give the same problems in the same order)."""
  return list(cell.get("problem_ids") or (f"#{i}" for i in range(len(cell["correct"]))))


def folder_hash(folder: Path) -> str:
  """The config hash of a start model's folder: a committed artifact's `source.json`, else its `config.json`."""
  if (folder / "source.json").exists():
    return json.loads((folder / "source.json").read_text())["config_hash"]
  return config_hash(json.loads((folder / "config.json").read_text()))


def provenance(evidence: Evidence | None) -> dict:
  """Where the numbers come from: the git commit (and whether tracked files differed from it), the package versions,
  the shared base (folder and config hash), every run (config hash -> name, folder, stages, the command that makes
  it) and every start model's config hash."""
  def git(*cmd):
    return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {"git_commit": git("rev-parse", "HEAD") or None,
          "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
          "packages": versions, "python": sys.version.split()[0],
          "base": evidence.base if evidence else None, "starts": evidence.starts if evidence else {},
          "runs": evidence.runs if evidence else {}}


def interval_text(c: Mapping) -> str:
  if "low" not in c:
    return f"{c['verdict']} ({c['note']})"
  return f"{100 * c['estimate']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"


def claims_markdown(claims: Sequence[Mapping]) -> str:
  """The claims' table: each difference in points with its 95% bootstrap interval and verdict."""
  rows = [[c["text"], f"{c['a']} − {c['b']}", c["metric"], ", ".join(map(str, c["ops"])) if not isinstance(
      c["ops"], str) else c["ops"], {1: "> 0", -1: "< 0", 0: f"within ±{100 * c['margin']:g}"}[c["sign"]],
           interval_text(c), c["verdict"]] for c in claims]
  return ("\nClaims: the difference (points, strict, mean over the ops) with its 95% paired bootstrap interval "
          "over problems and seeds (`experiments/stats.py`) and the verdict it supports:\n\n"
          + markdown_table(["claim", "difference", "metric", "ops", "expected", "difference [95% interval]",
                            "verdict"], rows))


# -- --check -----------------------------------------------------------------------------------------------------------

def check_model_folder(out: Path, run: str) -> Path:
  """Where `write_results` commits the `--check` target's final params: beside results.json, named by its run."""
  return out / f"check-{Path(run).name}"


def export_check_model(evidence: Evidence, target: Mapping, out: Path) -> None:
  """Exports the `--check` target's final stage (a run's; a start model is committed already) as a params folder
  beside results.json, so `--check` re-evaluates committed params from a clean clone. A run folder copied without its
  checkpoints (re-making results from finished runs) keeps the folder exported before, and so does a re-run whose
  folder already holds that stage's final step (orbax names its chunks at random: a new export would churn git)."""
  source = evidence.evals[target["label"]][target["seed"]]["source"]
  if "run" not in source:
    return
  stage_dir = found_path(source["run"], evidence.args.workdir) / source["stage"]
  folder = check_model_folder(out, source["run"])
  for old in out.glob("check-*"):
    if old != folder:
      shutil.rmtree(old)
  if (stage_dir / "checkpoints").exists() and not exported_already(stage_dir, folder):
    export_stage(stage_dir, folder)


def exported_already(stage_dir: Path, folder: Path) -> bool:
  """Whether `folder` is `export_stage` of the stage's final step: the same config hash and step."""
  if not (folder / "source.json").exists() or not (stage_dir / "summary.json").exists():
    return False
  source = json.loads((folder / "source.json").read_text())
  return (source.get("param_dtype") == "as trained"
          and source.get("step") == json.loads((stage_dir / "summary.json").read_text()).get("step")
          and source.get("config_hash") == config_hash(json.loads((stage_dir / "config.json").read_text())))


def check(args: argparse.Namespace, experiment: str) -> str:
  """`--check`: re-evaluates the model `results.json` names in `check` (a run's final stage in `--workdir`, or a
  start model) with the recorded protocol and compares every problem's samples (their hashes), counts and metrics
  with the recorded ones; raises SystemExit with one line on the first difference. Returns what it checked."""
  path = out_dir(args, experiment) / "results.json"
  if not path.exists():
    raise SystemExit(f"--check: no {path}; run the experiment first (the same --scale, --out and --workdir)")
  results = json.loads(path.read_text())
  if "check" not in results:
    raise SystemExit(f"--check: {path} names no model to check (made before --check existed); re-run the experiment")
  label, seed = results["check"]["label"], results["check"]["seed"]
  entry = results["evals"][label][str(seed)]
  source = entry["source"]
  if "run" in source:
    stage_dir = found_path(source["run"], args.workdir) / source["stage"]
    committed = check_model_folder(path.parent, source["run"])
    if (stage_dir / "checkpoints").exists():  # the run itself
      model_dir, config, tokenizer_dir = stage_dir, json.loads((stage_dir / "config.json").read_text()), \
          stage_dir.parent / "tokenizer"
      what = f"{label} seed {seed} (run {source['run']}, stage {source['stage']})"
    elif (committed / "source.json").exists():  # its params, committed beside results.json
      model_dir, config, tokenizer_dir = committed, json.loads((committed / "source.json").read_text())["config"], \
          committed / "tokenizer"
      what = f"{label} seed {seed} ({committed.relative_to(path.parent.parent)}: run {source['run']}'s params)"
    else:
      raise SystemExit(f"--check: the run {source['run']} is not in --workdir {args.workdir} and {committed} is "
                       f"missing; re-run the experiment there (it resumes by config hash) or point --workdir at its "
                       f"run folders")
    mesh = make_mesh()
    result = evaluate(load_model(model_dir, mesh), load_tokenizer(tokenizer_dir), data_config(config["data"]).task,
                      EvalConfig.from_config(source["eval"]), mesh=mesh, show_progress=False)
  else:
    folder = found_path(source["start"], args.workdir)
    result = evaluate_start(SCALES[results["scale"]], folder, args.workdir, cached=False, **source["protocol"])
    what = f"{label} ({source['start']})"
  now = cells(result)
  for key, want in entry["cells"].items():
    ctx, op = key.split("/")
    got = now.get((ctx, int(op)))
    if got is None:
      raise SystemExit(f"--check failed: {what} has no {key} cell on re-evaluation")
    for metric, value in want.items():
      if metric.startswith(RECORDED) and not math.isclose(got[metric], value, abs_tol=1e-9):
        raise SystemExit(f"--check failed: {what} {key} {metric} re-evaluated {got[metric]:.6f}, results.json says "
                         f"{value:.6f}")
    if got["correct"] != want["correct"]:
      raise SystemExit(f"--check failed: {what} {key}: the per-problem counts differ from results.json")
    if want["sample_hashes"] is not None and got["sample_hashes"] != want["sample_hashes"]:
      raise SystemExit(f"--check failed: {what} {key}: other samples than results.json records (sample hashes differ)")
  message = f"--check passed: {what}, {len(entry['cells'])} cell(s), the same samples, counts and metrics"
  print(message, flush=True)
  return message


# -- plots -------------------------------------------------------------------------------------------------------------

def colors(labels: Sequence[str]) -> dict[str, str]:
  """One colour per label, the same in every panel: matplotlib's cycle in the experiment's own order."""
  return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def error_bars(results: Mapping, label: str, points: Sequence[tuple[str, str]]) -> tuple[list[float], np.ndarray]:
  """The means of `label` at `points` ((cell "context/op", metric) pairs) and matplotlib's `yerr` for them: the
  distance from each mean to the ends of its 95% bootstrap interval (`results["intervals"]`)."""
  rows = [results["intervals"][label][cell][metric] for cell, metric in points]
  return [m for m, _, _ in rows], np.array([[m - lo for m, lo, _ in rows], [hi - m for m, _, hi in rows]]).clip(0)

# -- summaries and results ---------------------------------------------------------------------------------------------

def per_op_summary(per_seed: Sequence[Mapping], ops: Sequence[int], metrics: Sequence[str],
                   context: str = "p") -> dict:
  """`{op: {metric: summary over seeds}}` of one evaluation's `cells` per seed (a start model: one "seed")."""
  return {str(op): {m: summary([c[(context, op)][m] for c in per_seed]) for m in metrics} for op in ops}


def mean_over_ops(by_cell: Mapping, ops: Sequence[int], metric: str = "pass@1", context: str = "p") -> float:
  """A metric of one evaluation's `cells`, averaged over `ops`."""
  return sum(by_cell[(context, op)][metric] for op in ops) / len(ops)


def summary(values: Sequence[float]) -> dict:
  """Mean, spread (sample standard deviation; 0 for one value) and the values themselves."""
  values = [float(v) for v in values]
  mean = sum(values) / len(values)
  spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  return {"mean": mean, "spread": spread, "n": len(values), "values": values}


def fmt(s: Mapping, scale: float = 100.0, digits: int = 1) -> str:
  """`mean ± spread` (in percent by default)."""
  return f"{s['mean'] * scale:.{digits}f} ± {s['spread'] * scale:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
  out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(out) + "\n"


def write_results(args: argparse.Namespace, experiment: str, results: dict, markdown: str,
                  plot: Callable[[Path], None] | None = None, evidence: Evidence | None = None,
                  claims: Sequence[Claim] = (), bands: Mapping | None = None) -> Path:
  """Writes `results.json` (the command, scale, seeds, date, provenance, then `results`, the op ranges `bands`, the
  `claims` with their intervals and verdicts, the per-cell intervals and every evaluation per problem from
  `evidence`), `results.md` (the command, the bands, `markdown`, the claims' table) and the plot (`plot(path)`, which
  reads `results["intervals"]`) to the experiment's results folder; returns it."""
  out = out_dir(args, experiment)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"experiment": experiment, "command": args.command, "scale": args.scale, "seeds": args.seeds,
          "date": datetime.date.today().isoformat(), "provenance": provenance(evidence)}
  ranges = bands["ranges"] if bands else SCALES[args.scale].ranges
  if bands:
    results["bands"] = bands
  if evidence is not None:
    results["claims"] = [evidence.claim(c, ranges) for c in claims]
    results["intervals"] = evidence.intervals()
    results["check"] = evidence.check_target()
    results.update(evidence.record())
    export_check_model(evidence, results["check"], out)
  (out / "results.json").write_text(json.dumps(dict(meta, **results), indent=2, default=str))
  (out / "results.md").write_text(
      f"# {experiment}\n\nMade by `{args.command}` ({args.scale} scale, {args.seeds} seed(s), {meta['date']}, "
      f"commit {(meta['provenance']['git_commit'] or 'unknown')[:10]}"
      f"{' with local changes' if meta['provenance']['git_dirty'] else ''}).\n\n"
      + (bands_markdown(bands) if bands else "") + markdown
      + (claims_markdown(results["claims"]) if results.get("claims") else ""))
  if plot is not None:
    import matplotlib
    matplotlib.use("Agg")
    plot(out / f"{experiment}.png")
  print(f"results: {out}", flush=True)
  return out
