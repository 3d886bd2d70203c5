"""Evaluation: n samples per problem through the one sampler, strictly verified, reported as pass@k (the unbiased
estimator of Chen et al. 2021), maj@k and mean length, broken down by difficulty (op) and context.

Every metric is under **strict** correctness (`jaxstages.rewards.verify`: right answer and every step right) except
`answer@1` (right final answer, steps unchecked) and maj@k (the majority final answer of k samples is right), so a
table shows both what a model gets right and how often it gets there by a wrong route.

Also the KL drift of a policy from a frozen reference on held-out prompts (`kl_drift_fn`), which DPO and RL stages
report at every evaluation, and `evaluate_run` for a stage's checkpoint (`load_stage` is `jaxstages.model.io`'s).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.config import ConfigError, check_keys
from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.losses import reverse_kl
from jaxstages.metrics import progress, write_atomic
from jaxstages.model import Transformer
from jaxstages.model.io import load_stage
from jaxstages.rewards import format_ok, think_block, verify
from jaxstages.sampling import SamplingConfig, completion_rows, sample, stop_ids, strip_stop
from jaxstages.sharding import data_parallel_size, make_mesh, use_mesh


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k), computed as a stable
  product (Chen et al. 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: Sequence[int | None], gold: int) -> bool:
  """Whether the most frequent final answer (unparseable ones do not vote; ties go to the answer seen first) is
  `gold`."""
  votes = Counter(a for a in answers if a is not None)
  if not votes:
    return False
  top = max(votes.values())
  return next(a for a in answers if a is not None and votes[a] == top) == gold


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate: `problems` eval-split problems per (op, context) cell, `n` samples each."""

  ops: tuple[int, ...] = (1, 2, 3, 4)
  contexts: tuple[str, ...] | None = None  # None: the contexts of the task's mixture
  problems: int = 64
  n: int = 1
  ks: tuple[int, ...] = (1,)
  temperature: float = 0.0  # greedy when n == 1; set e.g. 1.0 for pass@k with n > 1
  top_k: int = 0
  top_p: float = 1.0
  prompt: str = "document"  # "document": problem text + newline (a pre-trained base); "chat": the user turn
  think: bool | None = None  # with prompt="chat": the /think or /no_think flag, or neither
  max_new_tokens: int | None = None  # None: enough for the gold solution of the cell's op, with slack
  think_budget: int | None = None  # close the think block after this many thinking tokens (sampling.SamplingConfig)
  # text forced after a budget's close: the start of the answer line, so the answer follows at once ("": none)
  think_budget_suffix: str = "\n" + tasks.ANSWER_PREFIX
  batch_size: int = 64  # prompts per sampler call
  seed: int = 0

  def __post_init__(self):
    if self.prompt not in ("document", "chat"):
      raise ConfigError(f"eval prompt={self.prompt!r} is not one of ['document', 'chat']")
    if any(k > self.n for k in self.ks):
      raise ConfigError(f"pass@k needs k <= n samples per problem; got ks={self.ks}, n={self.n}")
    if self.n > 1 and self.temperature == 0:
      raise ConfigError(f"n={self.n} greedy samples would all be the same; set temperature > 0")

  @classmethod
  def from_config(cls, config=None, **overrides) -> "EvalConfig":
    values = dict(config or {}, **overrides)
    check_keys(values, {f.name for f in dataclasses.fields(cls)}, "eval config")
    for key in ("ops", "ks", "contexts"):
      if values.get(key) is not None:
        values[key] = tuple(values[key])
    return cls(**values)


def eval_prompt(problem: tasks.Problem, tokenizer, cfg: EvalConfig) -> list[int]:
  if cfg.prompt == "document":
    return tokenizer.encode(problem.text() + "\n")
  return tokenizer.encode_chat(tasks.rl_prompt(problem, cfg.think)["messages"], add_generation_prompt=True)[0]


def _id(token_id: int | None) -> int:
  return -1 if token_id is None else int(token_id)


def evaluate(model: Transformer, tokenizer, task_cfg: tasks.TaskConfig, cfg: EvalConfig, mesh=None,
             show_progress: bool = True) -> dict:
  """Samples, verifies and scores every (op, context) cell. Returns `{"cells": [...], "config": ...}`; each cell has
  `op`, `context`, `problems`, `samples`, `pass@k` for each k, `maj@n`, `answer@1`, `mean_length` (tokens),
  `answered` (samples with an answer line), `correct` (the strictly correct samples of each problem) and `format`
  (samples in the expected form: one answer line at the end, after a think block, empty for `/no_think`, when
  `think` is set; `rewards.format_ok`) and, when `think` is set,
  `think_followed`: samples whose think block is non-empty for `/think` and present but empty for `/no_think`."""
  contexts = cfg.contexts or tuple(dict.fromkeys(m.context for m in task_cfg.mixture))
  stops = stop_ids(tokenizer, chat=cfg.prompt == "chat")
  think = cfg.think if cfg.prompt == "chat" else None
  cells = []
  bar = progress(len(cfg.ops) * len(contexts) * cfg.problems, "eval") if show_progress else None
  for context in contexts:
    for op in cfg.ops:
      problems = tasks.eval_set(task_cfg, op=op, context=context, n=cfg.problems, seed=cfg.seed)
      # the gold solution of an `op`-step problem with slack, and room for the think tags and the answer after them
      default_new = (16 * op + 16) * (2 if task_cfg.surface == "story" else 1) + (16 if think is not None else 0)
      scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens or default_new,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.n,
                            stop_tokens=stops, think_budget=cfg.think_budget,
                            think_open_id=_id(tokenizer.think_open_id), think_close_id=_id(tokenizer.think_close_id),
                            think_budget_suffix=tuple(tokenizer.encode(cfg.think_budget_suffix)))
      strict, answers, lengths, formats, followed = [], [], [], [], []
      for start in range(0, len(problems), cfg.batch_size):
        chunk = problems[start:start + cfg.batch_size]
        prompts = [eval_prompt(p, tokenizer, cfg) for p in chunk]
        padded = prompts + [prompts[-1]] * (-len(prompts) % _data_shards(mesh))
        out = sample(model, padded, scfg, seed=cfg.seed * 1_000_003 + op * 1009 + start, mesh=mesh)
        completions = out.completions()[:len(chunk) * cfg.n]
        for i, toks in enumerate(completions):
          text = tokenizer.decode(strip_stop(toks, stops))
          verdict = verify(chunk[i // cfg.n], text)
          formats.append(format_ok(text, think))
          if think is not None:
            block = think_block(text)
            followed.append(block is not None and bool(block) == think)
          strict.append(verdict.strict_correct)
          answers.append(verdict.answer)
          lengths.append(len(toks))
        if bar is not None:
          bar.update(len(chunk))
      strict = np.asarray(strict).reshape(len(problems), cfg.n)
      cell = {"op": op, "context": context, "problems": len(problems), "samples": cfg.n,
              "correct": [int(c) for c in strict.sum(1)]}  # strictly correct samples of each problem
      for k in cfg.ks:
        cell[f"pass@{k}"] = float(np.mean([pass_at_k(cfg.n, int(c), k) for c in strict.sum(1)]))
      cell[f"maj@{cfg.n}"] = float(np.mean([majority_correct(answers[i * cfg.n:(i + 1) * cfg.n], p.answer)
                                            for i, p in enumerate(problems)]))
      cell["answer@1"] = float(np.mean([a == problems[i // cfg.n].answer for i, a in enumerate(answers)]))
      cell["mean_length"] = float(np.mean(lengths))
      cell["answered"] = float(np.mean([a is not None for a in answers]))
      cell["format"] = float(np.mean(formats))
      if think is not None:
        cell["think_followed"] = float(np.mean(followed))
      cells.append(cell)
  if bar is not None:
    bar.close()
  return {"config": dataclasses.asdict(cfg), "cells": cells}


def kl_drift_fn(ctx, ref_graphdef, ref_params, n_prompts: int, max_new_tokens: int, seed: int = 0):
  """`params -> {kl_from_reference, drift_length}`: how far a stage's policy has moved from a frozen reference.

  On the first `n_prompts` eval-split problems of the stage's task (never trained on; chat turns or documents, as
  the stage's `data.prompt`), one sample each from the policy at temperature 1; the sequence KL(π‖π_ref) is the sum
  over the completion of the exact per-token KL between the two next-token distributions (a Rao-Blackwellised,
  lower-variance estimate of the sequence KL than the log-ratio of the sample). `drift_length` is the mean
  completion length. `ctx` is the stage's context (graphdef, data, tokenizer, mesh, rules); DPO and RL use it alike.
  """
  d, tok = ctx.data, ctx.tokenizer
  kind = d.prompt
  prompts = [eval_prompt(tasks.generate(d.task, d.seed, "eval", i), tok, EvalConfig(prompt=kind))
             for i in range(n_prompts)]
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, stop_tokens=stop_ids(tok, kind == "chat"),
                            pad_id=tok.pad_id)

  def sequence_kl(params, ref, rows):
    policy, reference = nnx.merge(ctx.graphdef, params), nnx.merge(ref_graphdef, ref)
    inputs = (rows["tokens"], rows["positions"], rows["segment_ids"])
    per_token = reverse_kl(policy(*inputs)[0], reference(*inputs)[0])  # KL(π‖π_ref) at every position
    return jnp.sum(per_token * rows["completion_mask"], axis=-1)

  kl_fn = jax.jit(sequence_kl)
  padded = prompts + [prompts[-1]] * (-len(prompts) % _data_shards(ctx.mesh))  # the sampler splits rows evenly

  def kl_drift(params) -> dict[str, float]:
    samples = sample(nnx.merge(ctx.graphdef, params), padded, sampling, seed, ctx.mesh, ctx.rules)
    rows = completion_rows(padded, samples, 1, tok.pad_id)
    with use_mesh(ctx.mesh, ctx.rules):
      kl = np.asarray(kl_fn(params, ref_params, {k: jnp.asarray(v) for k, v in rows.items()}))[:n_prompts]
    return {"kl_from_reference": float(kl.mean()),
            "drift_length": float(np.mean(np.asarray(samples.lengths)[:n_prompts]))}

  return kl_drift


def _data_shards(mesh) -> int:
  return 1 if mesh is None else data_parallel_size(mesh)


def markdown_table(result: dict) -> str:
  """One row per context, one column per (metric, op): pass@k for each k, then maj@n, answer@1, the answered and
  well-formatted fractions and the mean length."""
  cells = result["cells"]
  ops = sorted({c["op"] for c in cells})
  metrics = [m for m in cells[0] if m.startswith(("pass@", "maj@"))] + ["answer@1", "answered", "format"]
  metrics += (["think_followed"] if "think_followed" in cells[0] else []) + ["mean_length"]
  by = {(c["context"], c["op"]): c for c in cells}
  lines = ["| context | metric | " + " | ".join(f"op {o}" for o in ops) + " |",
           "| --- | --- |" + " ---: |" * len(ops)]
  for context in dict.fromkeys(c["context"] for c in cells):
    for m in metrics:
      fmt = (lambda v: f"{v:.1f}") if m == "mean_length" else (lambda v: f"{v:.1%}")
      lines.append(f"| {context} | {m} | " + " | ".join(fmt(by[(context, o)][m]) if (context, o) in by else "—"
                                                        for o in ops) + " |")
  return "\n".join(lines)


def evaluate_run(run_dir: str | Path, cfg: EvalConfig, step: int | None = None, out_dir: str | Path | None = None,
                 mesh=None) -> dict:
  """Evaluates a stage's checkpoint; writes `eval.json` and `eval.md` into `out_dir` (default: `run_dir/eval`)."""
  mesh = mesh or make_mesh()
  model, tokenizer, config = load_stage(run_dir, step, mesh)
  task_cfg = data_config(config["data"]).task
  result = evaluate(model, tokenizer, task_cfg, cfg, mesh=mesh)
  result["run"], result["step"] = str(run_dir), step
  out = Path(out_dir or Path(run_dir) / "eval")
  out.mkdir(parents=True, exist_ok=True)
  write_atomic(out / "eval.json", json.dumps(result, indent=2))
  write_atomic(out / "eval.md", markdown_table(result) + "\n")
  return result
