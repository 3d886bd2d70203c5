#!/usr/bin/env python
"""Convert Hugging Face Qwen2/Qwen2.5/Llama safetensors checkpoints to and from jaxstages params.

  python tools/convert_hf.py import HF_DIR OUT_DIR [--param-dtype bfloat16]
  python tools/convert_hf.py export PARAMS_DIR HF_DIR [--dtype bfloat16]

Same as `jaxstages convert ...`.
"""

import sys

from jaxstages.cli import main


def convert(argv: list[str]) -> None:
  main(["convert", *argv])


if __name__ == "__main__":
  convert(sys.argv[1:])
