#!/usr/bin/env python
"""Export a stage's checkpoint as a small, self-contained params folder that later stages can start from.

  python tools/export_params.py RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]

OUT_DIR gets `params/` + `model_config.json` (jaxstages.model.io.save_params), the stage's `tokenizer/`, and
`source.json`: the stage's config, its hash, the step and its summary, so whoever uses the folder can re-make it.
`stage.init_from=OUT_DIR` (or `distill.teacher=OUT_DIR`) loads it.
"""

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx


def config_hash(config: dict) -> str:
  """sha256 of the config's canonical JSON (sorted keys), first 12 hex digits."""
  return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> Path:
  from jaxstages.evaluation import load_stage
  from jaxstages.model.io import save_params

  run, out = Path(run_dir), Path(out_dir)
  model, tokenizer, config = load_stage(run, step)
  if dtype:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), state))
  if out.exists():
    shutil.rmtree(out)
  save_params(model, out)
  tokenizer.save(out / "tokenizer")
  summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
  (out / "source.json").write_text(json.dumps(
      {"run": run.name, "step": step or (summary or {}).get("step"), "config_hash": config_hash(config),
       "param_dtype": dtype or "as trained", "summary": summary, "config": config}, indent=2))
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("out_dir")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="store params in this dtype (e.g. bfloat16: half the size)")
  args = parser.parse_args(argv)
  print(export(args.run_dir, args.out_dir, args.step, args.dtype))


if __name__ == "__main__":
  main(sys.argv[1:])
