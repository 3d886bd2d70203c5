#!/usr/bin/env python
"""Train the task-world tokenizer of one surface and save it (`tokenizer.model` + `special_tokens.json`).

  python tools/train_tokenizer.py --surface symbolic --contexts pqr-uniform --vocab-size 1024 --samples 2000 \\
      --out runs/tokenizers/symbolic

The tokenizer depends only on the surface, vocab size, samples, seed and model type (every context of the surface is
covered whatever `--contexts` says); `--contexts` and `--ops` choose the problems of the printed report: the mean
tokens per pre-training document (problem + solution + answer) at each op, and the tokens per solution step.
"""

from __future__ import annotations

import argparse
import time

from jaxstages.data import tasks, tokenizer


def parse_ops(spec: str) -> list[int]:
  """`2-8` -> [2, ..., 8]; `2,4,6` -> [2, 4, 6]."""
  if "-" in spec:
    lo, hi = (int(x) for x in spec.split("-"))
    return list(range(lo, hi + 1))
  return [int(x) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--surface", choices=list(tasks.SURFACES), default="symbolic")
  parser.add_argument("--contexts", default=None, help="mixture preset for the report (default: all contexts)")
  parser.add_argument("--vocab-size", type=int, default=None,
                      help=f"upper bound on the vocabulary (default {tokenizer.DEFAULT_VOCAB_SIZES})")
  parser.add_argument("--samples", type=int, default=2000, help="problems in the training corpus (x5 formats)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model-type", choices=list(tokenizer.MODEL_TYPES), default="bpe")
  parser.add_argument("--ops", default="2-8", help="ops of the report: 2-8 or 2,4,6")
  parser.add_argument("--report-n", type=int, default=200, help="problems per op in the report")
  parser.add_argument("--out", required=True, help="folder to write the tokenizer into")
  args = parser.parse_args(argv)

  cfg = tokenizer.corpus_config(args.surface)
  if args.contexts:
    cfg = cfg.replace(contexts=args.contexts)
  start = time.time()
  tok = tokenizer.task_tokenizer(cfg, args.vocab_size, n_samples=args.samples, seed=args.seed,
                                 model_type=args.model_type)
  tok.save(args.out)
  print(f"trained in {time.time() - start:.1f}s; vocab size {tok.vocab_size}; wrote {args.out}\n")
  print(tokenizer.token_table(tok, cfg, parse_ops(args.ops), args.report_n))


if __name__ == "__main__":
  main()
