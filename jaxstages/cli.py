"""`jaxstages` command line.

  jaxstages smoke                                  the model's end-to-end smoke run (CPU-sized)
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
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main(sys.argv[1:])
