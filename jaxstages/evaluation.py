"""Evaluation of trained stages (minimal for now: strict greedy accuracy by op).

The batched sampler with temperature, top-k/p, n samples per prompt and pass@k/maj@k replaces `greedy_decode` here
when it lands; the strict verifier (`jaxstages.rewards.verify`) is already the one every metric is reported under.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.checkpoint import restore_params
from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.data.tokenizer import load_tokenizer
from jaxstages.model import KVCache, Transformer
from jaxstages.rewards import verify
from jaxstages.sharding import make_mesh, param_shardings
from jaxstages.train import stage_model_config


def greedy_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new: int, eos_id: int) -> list[list[int]]:
  """Greedy continuations through the KV cache, stopped at `eos_id` (excluded). Prompts are left-padded: padding
  slots carry segment id 0 so nothing attends to them, and each row's positions start at 0 at its first token."""
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    segments[i, width - len(p):] = 1
    positions[i, width - len(p):] = np.arange(len(p))
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, segments, positions):
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.cfg, tokens.shape[0], tokens.shape[1] + max_new)
    logits, cache = model(tokens, positions, segments, cache)

    def step(carry, _):
      token, pos, cache = carry
      logits, cache = model(token[:, None], pos[:, None], jnp.ones_like(token)[:, None], cache)
      return (jnp.argmax(logits[:, -1], -1), pos + 1, cache), token

    carry = (jnp.argmax(logits[:, -1], -1), positions[:, -1] + 1, cache)
    return jax.lax.scan(step, carry, None, length=max_new)[1].T

  out = []
  for row in np.asarray(run(state, tokens, segments, positions)).tolist():
    out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out


def strict_accuracy(model: Transformer, tokenizer, task_cfg: tasks.TaskConfig, ops: Sequence[int], n: int,
                    context: str | None = None) -> dict[int, float]:
  """Share of `n` eval-split problems per op whose greedy completion is strictly correct (answer and every step).
  The prompt is the problem text and a newline, as in pre-training documents."""
  context = context or task_cfg.mixture[0].context
  acc = {}
  for op in ops:
    problems = tasks.eval_set(task_cfg, op=op, context=context, n=n)
    prompts = [tokenizer.encode(p.text() + "\n") for p in problems]
    completions = greedy_decode(model, prompts, max_new=14 * op + 12, eos_id=tokenizer.eos_id)
    acc[op] = float(np.mean([verify(p, tokenizer.decode(c)).strict_correct for p, c in zip(problems, completions)]))
  return acc


def load_stage(run_dir: str | Path, step: int | None = None):
  """(model, tokenizer, config) of a stage's workdir, params from its latest (or `step`) checkpoint."""
  run_dir = Path(run_dir)
  config = json.loads((run_dir / "config.json").read_text())
  tokenizer = load_tokenizer(run_dir / "tokenizer")
  cfg = stage_model_config(config["model"], tokenizer.vocab_size)
  graphdef, target = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  mesh = make_mesh()
  params = restore_params(run_dir / "checkpoints", target, param_shardings(target, mesh), step=step)
  return nnx.merge(graphdef, params), tokenizer, config


def evaluate_run(run_dir: str | Path, ops: Sequence[int], n: int, context: str | None = None,
                 step: int | None = None) -> dict:
  model, tokenizer, config = load_stage(run_dir, step)
  task_cfg = data_config(config["data"]).task
  return {"strict_greedy_accuracy": strict_accuracy(model, tokenizer, task_cfg, ops, n, context)}
