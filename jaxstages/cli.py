"""`jaxstages` command line.

  jaxstages smoke                                  the model's end-to-end smoke run (CPU-sized)
  jaxstages train --config C --workdir D [--config.KEY=VALUE ...]   train one stage (resumable)
  jaxstages plan --config C                        parameters, FLOPs and compiled memory of a stage
  jaxstages eval RUN_DIR --ops 2,3,4               strict greedy accuracy by op
  jaxstages data show --config C --n 5             decoded examples of a data pipeline, loss mask visible
  jaxstages convert import HF_DIR OUT_DIR          HF safetensors checkpoint -> jaxstages params folder
  jaxstages convert export PARAMS_DIR HF_DIR       jaxstages params folder -> HF safetensors checkpoint
  jaxstages data show --config configs/data.py:sft-symbolic [--n 5] [--tokenizer DIR]   decoded examples of a pipeline
"""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
  from jaxstages.model import hf, io
  from jaxstages.sharding import initialize_distributed

  initialize_distributed()
  if args.direction == "import":
    overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
    model = hf.import_hf(args.src, **overrides)
    io.save_params(model, args.dst)
  else:
    model = io.load_params(args.src)
    hf.export_hf(model, args.dst, dtype=args.dtype)
  print(f"wrote {args.dst}")


def _smoke(args: argparse.Namespace) -> None:
  from jaxstages import smoke

  smoke.main(steps=args.steps, out_dir=args.out)


def _data(args: argparse.Namespace) -> None:
  from jaxstages.data import pipeline, tokenizer

  cfg = pipeline.data_config(args.config)
  if args.tokenizer:
    tok = tokenizer.load_tokenizer(args.tokenizer)
  else:  # a small task tokenizer is seconds to train and matches the config's surface
    tok = tokenizer.task_tokenizer(cfg.task, n_samples=args.tokenizer_samples)
  ansi = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
  sources = ", ".join(f"{s.name} ({s.format}, contexts {s.task.contexts!r}, weight {w:.3g} at step 0)"
                      for s, w in zip(cfg.source_configs, cfg.mixture.weights_at(cfg.step_offset)))
  print(f"{args.config}: kind {cfg.kind}, batch {cfg.batch_size}, seq_len {cfg.seq_len}, vocab {tok.vocab_size}"
        + (f"; sources: {sources}" if cfg.kind != "eval" else f"; eval grid {len(pipeline.eval_cells(cfg))} cells"))
  print("tokens outside the loss are " + ("dimmed" if ansi else "in [[...]]") + "\n")
  print(pipeline.show(cfg, tok, n=args.n, ansi=ansi))


def _stage_config(args: argparse.Namespace):
  from jaxstages.config import apply_overrides, load_config

  return apply_overrides(load_config(args.config), args.overrides)


def _train(args: argparse.Namespace) -> None:
  import json

  from jaxstages.train import run_stage

  print(json.dumps(run_stage(_stage_config(args), args.workdir), indent=2))


def _plan(args: argparse.Namespace) -> None:
  from jaxstages.train import plan_stage

  plan = plan_stage(_stage_config(args))
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  mem = plan["memory_per_device_bytes"]
  print(f"stage {plan['stage']} ({plan['kind']}) on mesh {plan['mesh']}")
  print(f"  parameters        {plan['params']:,}")
  print(f"  tokens per step   {plan['tokens_per_step']:,}  x {plan['steps']:,} steps")
  print(f"  FLOPs per step    {plan['flops_per_step']:.3e} (model), {plan['xla_flops_per_step_per_device']:.3e} "
        "(XLA, per device)")
  print(f"  total FLOPs       {plan['flops_per_step'] * plan['steps']:.3e}")
  print(f"  memory per device arguments {mib(mem['argument'])}, outputs {mib(mem['output'])} "
        f"(aliased {mib(mem['alias'])}), temporaries {mib(mem['temp'])}; peak ~{mib(mem['peak_estimate'])}")


def _eval(args: argparse.Namespace) -> None:
  import json

  from jaxstages.evaluation import evaluate_run

  print(json.dumps(evaluate_run(args.run, [int(o) for o in args.ops.split(",")], args.n, args.context), indent=2))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxstages", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("smoke", help="train the toy model briefly, check cached decoding and HF round trip")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--out", default="runs/smoke")
  p.set_defaults(func=_smoke)

  p = sub.add_parser("convert", help="convert between HF safetensors checkpoints and jaxstages params")
  p.add_argument("direction", choices=["import", "export"])
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="export: dtype of the written tensors")
  p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                 help="import: dtype to store the parameters in (default: float32)")
  p.set_defaults(func=_convert)

  p = sub.add_parser("data", help="inspect data pipelines")
  p.add_argument("action", choices=["show"])
  p.add_argument("--config", required=True, help="a data config, e.g. configs/data.py:sft-symbolic")
  p.add_argument("--n", type=int, default=5, help="examples (rows) to print")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder; default: train a task tokenizer on the fly")
  p.add_argument("--tokenizer-samples", type=int, default=300, help="problems to train the on-the-fly tokenizer on")
  p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                 help="dim the tokens outside the loss with ANSI codes (else mark them [[...]])")
  p.set_defaults(func=_data)

  for name, func, text in (("train", _train, "train one stage (resumes when its workdir has checkpoints)"),
                           ("plan", _plan, "size a stage without training: params, FLOPs, compiled memory")):
    p = sub.add_parser(name, help=text, description=text + ". Override any config key with --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="e.g. configs/train.py:pretrain-toy")
    if name == "train":
      p.add_argument("--workdir", required=True, help="the stage's folder: checkpoints, metrics, tokenizer")
    p.set_defaults(func=func)

  p = sub.add_parser("eval", help="strict greedy accuracy by op of a trained stage (minimal; pass@k comes later)")
  p.add_argument("run", help="a stage's workdir")
  p.add_argument("--ops", default="2,3,4,5,6")
  p.add_argument("--n", type=int, default=32, help="eval-split problems per op")
  p.add_argument("--context", default=None, help="default: the run's first context")
  p.set_defaults(func=_eval)
  return parser


def main(argv: list[str] | None = None) -> None:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a.removeprefix("--config.") for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command not in ("train", "plan")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
  args.overrides = overrides
  args.func(args)


if __name__ == "__main__":
  main(sys.argv[1:])
