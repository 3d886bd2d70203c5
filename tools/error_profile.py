#!/usr/bin/env python
"""What goes wrong in a model's samples, per op: the share of samples strictly right, and of those that are not, what
the verifier found (`jaxstages.rewards.verify`): steps missing (the sample stopped short of the gold graph), extra
steps, wrong values, wrong dependencies, no answer line; and how many steps the samples wrote.

  python tools/error_profile.py base=experiments/artifacts/base-cpu easy=runs/.../rl --ops 2,5 [--problems 128]
      [--n 8] [--out error_profile.md]

Each MODEL is any model folder `jaxstages eval` takes (a stage's workdir, a params folder); its eval-split problems
come from its own training config, with the prompt it was trained to read (`evaluation.prompt_for`). Samples at
temperature 1 (`--temperature`), `--n` per problem, the same problems and seeds for every model (with up to 64
problems, the very samples `jaxstages eval` draws). Shares are of all samples; a sample can have several kinds of
error. "Steps written" counts the gold steps plus extra minus missing ones.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import jaxstages  # noqa: F401  (before jax: it sets the C allocator up for XLA:CPU, jaxstages/host.py)
from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.evaluation import EvalConfig, default_max_new_tokens, eval_prompt, load_stage, prompt_for
from jaxstages.rewards import verify
from jaxstages.sampling import SamplingConfig, sample, stop_ids, strip_stop

KINDS = ("strict right", "steps missing", "extra steps", "value errors", "dependency errors", "no answer")


def profile(model_dir: str, ops: list[int], problems: int, n: int, temperature: float, seed: int) -> dict[int, dict]:
  """Per op: `shares` (each of `KINDS`, a fraction of the samples) and `steps` (steps written -> fraction)."""
  model, tokenizer, config = load_stage(model_dir)
  task_cfg = data_config(config["data"]).task
  cfg = EvalConfig(prompt=prompt_for(config), temperature=temperature, n=n)
  stops = stop_ids(tokenizer, chat=cfg.prompt == "chat")
  out = {}
  for op in ops:
    chosen = tasks.eval_set(task_cfg, op=op, context=task_cfg.mixture[0].context, n=problems, seed=seed)
    scfg = SamplingConfig(max_new_tokens=default_max_new_tokens(task_cfg, op), temperature=temperature, n=n,
                          stop_tokens=stops)
    # the evaluation's seed for its first batch: up to its batch size (64) these are `jaxstages eval`'s samples
    completions = sample(model, [eval_prompt(p, tokenizer, cfg) for p in chosen], scfg,
                         seed=seed * 1_000_003 + op * 1009).completions()
    counts, steps = collections.Counter(), collections.Counter()
    for i, problem in enumerate(chosen):
      for tokens in completions[i * n:(i + 1) * n]:
        text = tokenizer.decode(strip_stop(tokens, stops))
        v = verify(problem, text)
        counts.update(kind for kind, hit in zip(KINDS, (
            v.strict_correct, v.missing_steps > 0, v.extra_steps > 0, v.value_errors > 0, v.dependency_errors > 0,
            v.answer is None)) if hit)
        steps[op + v.extra_steps - v.missing_steps] += 1
    total = len(chosen) * n
    out[op] = {"shares": {k: counts[k] / total for k in KINDS},
               "steps": {s: c / total for s, c in sorted(steps.items())}}
  return out


def markdown(results: dict[str, dict[int, dict]]) -> str:
  lines = ["| model | op | " + " | ".join(f"{k} (%)" for k in KINDS) + " | steps written: share (%) |",
           "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " | --- |"]
  for name, by_op in results.items():
    for op, r in by_op.items():
      steps = ", ".join(f"{s}: {100 * f:.1f}" for s, f in r["steps"].items())
      lines.append(f"| {name} | {op} | " + " | ".join(f"{100 * r['shares'][k]:.1f}" for k in KINDS)
                   + f" | {steps} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("models", nargs="+", metavar="NAME=MODEL_DIR")
  parser.add_argument("--ops", default="2", help="comma-separated ops")
  parser.add_argument("--problems", type=int, default=128, help="eval-split problems per op")
  parser.add_argument("--n", type=int, default=8, help="samples per problem")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
  args = parser.parse_args(argv)
  models = {}
  for item in args.models:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
      parser.error(f"{item!r}: give each model as NAME=MODEL_DIR")
    models[name] = folder
  ops = [int(op) for op in args.ops.split(",")]
  results = {name: profile(folder, ops, args.problems, args.n, args.temperature, args.seed)
             for name, folder in models.items()}
  table = markdown(results)
  print(table)
  if args.out:
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
  main()
