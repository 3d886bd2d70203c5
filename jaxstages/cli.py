"""`jaxstages` command line.

  jaxstages smoke                                  the model's end-to-end smoke run (CPU-sized)
  jaxstages convert import HF_DIR OUT_DIR          HF safetensors checkpoint -> jaxstages params folder
  jaxstages convert export PARAMS_DIR HF_DIR       jaxstages params folder -> HF safetensors checkpoint
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
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main(sys.argv[1:])
