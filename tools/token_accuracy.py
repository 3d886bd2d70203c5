#!/usr/bin/env python
"""Where a pre-trained model goes wrong on the task world: teacher-forced accuracy of each kind of solution token.

  python tools/token_accuracy.py RUN_DIR [--ops 1,2,4] [--n 64] [--step N]

Feeds the gold pre-training document of `--n` eval-split problems per op (the run's own task config, its first
context) and reports, per op, the share of solution tokens predicted right (argmax) by kind: the step's target name,
operand names, operator, operand values, result, and the answer. A low operand-value accuracy next to a high
result accuracy says the model computes but cannot look values up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.evaluation import load_stage


def _kinds(p: tasks.Problem, tokenizer) -> tuple[list[int], list[str]]:
  """The document's tokens and, per token, the kind of solution token it starts ('' elsewhere). Parts are added to
  the text one at a time and tokenised with everything before them, so the tokens are the whole document's."""
  text = p.text() + "\n"
  kinds = [""] * len(tokenizer.encode(text))
  ids = {name: i for i, name in enumerate(p.names)}
  for step in p.gold_steps():
    w = p.ctx.op_words[step.op]
    va, vb = (f"{k} value ({p.nodes[ids[n]].kind})" for k, n in (("first", step.a), ("second", step.b)))
    if p.solution_format == "inline":
      parts = [(step.target, "target"), ("=", ""), (step.a, "operand name"), (str(step.va), va),
               (w, "operator"), (step.b, "operand name"), (str(step.vb), vb), ("=", ""),
               (str(step.result), "result")]
    elif p.solution_format == "lookup":
      parts = [(step.target, "target"), ("=", ""), (step.a, "operand name"), (w, "operator"),
               (step.b, "operand name"), (";", ""), (step.a, ""), ("=", ""), (str(step.va), va), (";", ""),
               (step.b, ""), ("=", ""), (str(step.vb), vb), (";", ""), (step.target, ""), ("=", ""),
               (str(step.result), "result")]
    else:
      parts = [(step.target, "target"), ("=", ""), (step.a, "operand name"), (w, "operator"),
               (step.b, "operand name"), ("=", ""), (str(step.va), va), (w, ""),
               (str(step.vb), vb), ("=", ""), (str(step.result), "result")]
    parts = [(("" if i == 0 else " ") + t, k) for i, (t, k) in enumerate(parts)] + [("\n", "")]
    for part, kind in parts:
      text += part
      n = len(tokenizer.encode(text))
      kinds += [kind] + [""] * (n - len(kinds) - 1)
  for part, kind in ((tasks.ANSWER_PREFIX, ""), (f" {p.answer}", "answer")):
    text += part
    n = len(tokenizer.encode(text))
    kinds += [kind] + [""] * (n - len(kinds) - 1)
  tokens = tokenizer.encode(text)
  assert text == tasks.pretrain_document(p) and len(tokens) == len(kinds), (text, tasks.pretrain_document(p))
  return tokens, kinds


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("--ops", default="1,2,4")
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--step", type=int, default=None)
  args = parser.parse_args()
  model, tokenizer, config = load_stage(args.run_dir, args.step)
  task = data_config(config["data"]).task
  context = task.mixture[0].context
  out = {}
  for op in (int(o) for o in args.ops.split(",")):
    problems = tasks.eval_set(task, op, context, args.n)
    docs = [_kinds(p, tokenizer) for p in problems]
    length = max(len(t) for t, _ in docs)
    tokens = np.zeros((len(docs), length), np.int32)
    for i, (t, _) in enumerate(docs):
      tokens[i, :len(t)] = t
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    segments = (np.arange(length)[None] < np.array([len(t) for t, _ in docs])[:, None]).astype(np.int32)
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    pred = np.asarray(jnp.argmax(logits, -1))
    right: dict[str, list[bool]] = {}
    for i, (t, kinds) in enumerate(docs):
      for j, kind in enumerate(kinds):
        if kind:  # the token at j is predicted from position j - 1
          right.setdefault(kind, []).append(pred[i, j - 1] == t[j])
    out[op] = {k: float(np.mean(v)) for k, v in right.items()}
    print(f"op {op}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in out[op].items()), flush=True)
  (Path(args.run_dir) / "token_accuracy.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
