#!/usr/bin/env python
"""Export a stage's checkpoint as a small, self-contained params folder that later stages can start from.

  python tools/export_params.py RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]

OUT_DIR gets `params/` + `model_config.json` (jaxstages.model.io.save_params), the stage's `tokenizer/`, and
`source.json`: the stage's config, its hash, the step and its summary, so whoever uses the folder can re-make it
(`jaxstages.model.io.export_stage`). `stage.init_from=OUT_DIR` (or `distill.teacher=OUT_DIR`) loads it.
"""

import argparse
import sys

from jaxstages.model.io import export_stage


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("out_dir")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="store params in this dtype (e.g. bfloat16: half the size)")
  args = parser.parse_args(argv)
  print(export_stage(args.run_dir, args.out_dir, args.step, args.dtype))


if __name__ == "__main__":
  main(sys.argv[1:])
