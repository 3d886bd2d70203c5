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
import functools
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxstages.config import ConfigError, check_keys
from jaxstages.data import tasks
from jaxstages.data.pipeline import data_config
from jaxstages.losses import reverse_kl
from jaxstages.metrics import progress, write_atomic
from jaxstages.model import Transformer
from jaxstages.model.io import load_stage
from jaxstages.rewards import format_ok, think_block, verify
from jaxstages.sampling import SamplingConfig, completion_rows, sample, stop_ids, strip_stop
from jaxstages.sharding import (data_parallel_size, global_batch_from_process_local, initialize_distributed, make_mesh,
                                process_rows, replicate_to_host, use_mesh)


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
  # "document": problem text + newline (a pre-trained base); "chat": the user turn; None (`evaluate_run`): the one
  # the model's own stage kind calls for (`prompt_for`)
  prompt: str | None = "document"
  think: bool | None = None  # with prompt="chat": the /think or /no_think flag, or neither
  max_new_tokens: int | None = None  # None: enough for the gold solution of the cell's op, with slack
  think_budget: int | None = None  # close the think block after this many thinking tokens (sampling.SamplingConfig)
  # text forced after a budget's close: the start of the answer line, so the answer follows at once ("": none)
  think_budget_suffix: str = "\n" + tasks.ANSWER_PREFIX
  batch_size: int = 64  # prompts per sampler call
  seed: int = 0

  def __post_init__(self):
    if self.prompt not in ("document", "chat", None):
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


BASE_KINDS = ("pretrain", "midtrain")  # stage kinds whose models read problems as documents (the others: chats)


def prompt_for(config: dict | None) -> str:
  """The prompt a model is evaluated with, from the training config that made it: a base (pretrain, midtrain) reads
  the problem as a document, a chat-tuned model (SFT and after) the user turn; an RL stage that trained on
  document prompts (RL straight from a base) keeps the document."""
  config = config or {}
  kind = config.get("stage", {}).get("kind", "pretrain")
  document = kind in BASE_KINDS or config.get("data", {}).get("prompt", "chat") == "document"
  return "document" if document else "chat"


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
  `answered` (samples with an answer line), `correct` (the strictly correct samples of each problem), `problem_ids`
  (`problem_id` of each problem, in the same order: what pairs two evaluations problem by problem), `sample_hashes`
  (`sample_hash` of each problem's samples: what shows two evaluations drew the same samples) and `format`
  (samples in the expected form: one answer line at the end, after a think block, empty for `/no_think`, when
  `think` is set; `rewards.format_ok`) and, when `think` is set,
  `think_followed`: samples whose think block is non-empty for `/think` and present but empty for `/no_think`."""
  if cfg.prompt is None:
    raise ConfigError("eval prompt=None: give 'document' or 'chat' (evaluate_run picks it from the model's stage)")
  contexts = cfg.contexts or tuple(dict.fromkeys(m.context for m in task_cfg.mixture))
  stops = stop_ids(tokenizer, chat=cfg.prompt == "chat")
  think = cfg.think if cfg.prompt == "chat" else None
  cells = []
  bar = progress(len(cfg.ops) * len(contexts) * cfg.problems, "eval") if show_progress else None
  for context in contexts:
    for op in cfg.ops:
      problems = tasks.eval_set(task_cfg, op=op, context=context, n=cfg.problems, seed=cfg.seed)
      scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens or default_max_new_tokens(task_cfg, op, think),
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.n,
                            stop_tokens=stops, think_budget=cfg.think_budget,
                            think_open_id=_id(tokenizer.think_open_id), think_close_id=_id(tokenizer.think_close_id),
                            think_budget_suffix=tuple(tokenizer.encode(cfg.think_budget_suffix)))
      stats = []  # per problem: STAT_FIELDS
      for start in range(0, len(problems), cfg.batch_size):
        chunk = problems[start:start + cfg.batch_size]
        prompts = [eval_prompt(p, tokenizer, cfg) for p in chunk]
        padded = prompts + [prompts[-1]] * (-len(prompts) % _data_shards(mesh))
        # each process samples, decodes and verifies its own prompts; only per-problem counts cross processes
        mine = slice(0, len(padded)) if mesh is None else process_rows(len(padded), mesh)
        out = sample(model, padded[mine], scfg, seed=cfg.seed * 1_000_003 + op * 1009 + start, mesh=mesh)
        completions = out.completions()
        local = np.zeros((mine.stop - mine.start, len(STAT_FIELDS)), np.float32)  # padding rows stay 0
        for i in range(mine.start, min(mine.stop, len(chunk))):
          first = (i - mine.start) * cfg.n
          local[i - mine.start] = problem_stats(chunk[i], completions[first:first + cfg.n], tokenizer, stops, think)
        stats.append(all_rows(local, mesh)[:len(chunk)])
        if bar is not None:
          bar.update(len(chunk))
      stats = dict(zip(STAT_FIELDS, np.concatenate(stats).astype(np.float64).T))
      samples = len(problems) * cfg.n
      correct = [int(c) for c in stats["correct"]]
      cell = {"op": op, "context": context, "problems": len(problems), "samples": cfg.n,
              "correct": correct,  # strictly correct samples of each problem
              "problem_ids": [problem_id(p) for p in problems],
              "sample_hashes": [int(h) for h in stats["sample_hash"]]}
      for k in cfg.ks:
        cell[f"pass@{k}"] = float(np.mean([pass_at_k(cfg.n, c, k) for c in correct]))
      cell[f"maj@{cfg.n}"] = float(np.mean(stats["majority"]))
      cell["answer@1"] = float(stats["answer_correct"].sum() / samples)
      cell["mean_length"] = float(stats["length"].sum() / samples)
      cell["answered"] = float(stats["answered"].sum() / samples)
      cell["format"] = float(stats["format"].sum() / samples)
      if think is not None:
        cell["think_followed"] = float(stats["think_followed"].sum() / samples)
      cells.append(cell)
  if bar is not None:
    bar.close()
  return {"config": dataclasses.asdict(cfg), "cells": cells}


def default_max_new_tokens(task_cfg: tasks.TaskConfig, op: int, think: bool | None = None) -> int:
  """The evaluation's length budget for an `op`-step problem: its gold solution with slack, and room for the think
  tags and the answer after them when `think` is set."""
  return (16 * op + 16) * (2 if task_cfg.surface == "story" else 1) + (16 if think is not None else 0)


def problem_id(problem: tasks.Problem) -> str:
  """A problem's identity across evaluations: 12 hex digits of the SHA-1 of its text (what the model reads)."""
  return hashlib.sha1(problem.text().encode()).hexdigest()[:12]


# what each problem's samples add to its cell (counts over its n samples; `majority` 0/1), the only per-problem
# numbers that cross processes
STAT_FIELDS = ("correct", "majority", "answer_correct", "length", "answered", "format", "think_followed",
               "sample_hash")


def think_followed(text: str, think: bool) -> bool:
  """Whether a sample's think block is non-empty for `/think` and present but empty for `/no_think`."""
  block = think_block(text)
  return block is not None and bool(block) == think


def sample_hash(completions: Sequence[list[int]]) -> int:
  """20 bits of the CRC-32 of a problem's sampled tokens (exact in the float32 rows that cross processes): what two
  evaluations compare to know they drew the same samples."""
  return zlib.crc32(np.asarray([t for toks in completions for t in [*toks, -1]], np.int64).tobytes()) & 0xFFFFF


def problem_stats(problem: tasks.Problem, completions: Sequence[list[int]], tokenizer, stops, think) -> list[float]:
  """`STAT_FIELDS` of one problem's samples (token lists, stop token included)."""
  texts = [tokenizer.decode(strip_stop(toks, stops)) for toks in completions]
  verdicts = [verify(problem, text) for text in texts]
  answers = [v.answer for v in verdicts]
  return [sum(v.strict_correct for v in verdicts), majority_correct(answers, problem.answer),
          sum(a == problem.answer for a in answers), sum(len(t) for t in completions),
          sum(a is not None for a in answers), sum(format_ok(text, think) for text in texts),
          sum(think_followed(text, think) for text in texts) if think is not None else 0, sample_hash(completions)]


def all_rows(local: np.ndarray, mesh) -> np.ndarray:
  """Every process's rows of small per-example numbers (`local`: this process's rows, `sharding.process_rows`), in
  order, on every process."""
  if mesh is None or jax.process_count() == 1:
    return local
  return replicate_to_host(global_batch_from_process_local({"x": local}, mesh)["x"], mesh)


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

  padded = prompts + [prompts[-1]] * (-len(prompts) % _data_shards(ctx.mesh))  # the sampler splits rows evenly
  width = max(len(p) for p in padded)  # one row layout on every process
  replicated = NamedSharding(ctx.mesh, PartitionSpec())

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def sums(params, ref, rows):
    """(KL summed over the first `n_prompts` rows, their completion tokens)."""
    kl = sequence_kl(params, ref, rows)
    return jnp.sum(kl * rows["counted"]), jnp.sum(jnp.sum(rows["completion_mask"], -1) * rows["counted"])

  def kl_drift(params) -> dict[str, float]:
    mine = process_rows(len(padded), ctx.mesh, ctx.rules)
    samples = sample(nnx.merge(ctx.graphdef, params), padded[mine], sampling, seed, ctx.mesh, ctx.rules).local()
    rows = completion_rows(padded[mine], samples, 1, tok.pad_id, width=width)
    rows["counted"] = (np.arange(mine.start, mine.stop) < n_prompts).astype(np.float32)
    with use_mesh(ctx.mesh, ctx.rules):
      kl, length = sums(params, ref_params, global_batch_from_process_local(rows, ctx.mesh, ctx.rules))
    return {"kl_from_reference": float(kl) / n_prompts, "drift_length": float(length) / n_prompts}

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
  """Evaluates any model folder (`model.io.open_model`: a stage's checkpoint, a params folder such as a committed
  artifact); writes `eval.json` and `eval.md` into `out_dir` (default: `run_dir/eval`). `cfg.prompt=None` takes the
  prompt from the model's stage kind (`prompt_for`). On several processes (`sharding.initialize_distributed`) each
  samples and verifies its share of every cell's problems."""
  initialize_distributed()
  mesh = mesh or make_mesh()
  model, tokenizer, config = load_stage(run_dir, step, mesh)
  if config is None:
    raise ConfigError(f"{run_dir} records no training config (config.json or source.json): its task world, which "
                      "the evaluation problems come from, is unknown")
  if cfg.prompt is None:
    cfg = dataclasses.replace(cfg, prompt=prompt_for(config))
  task_cfg = data_config(config["data"]).task
  result = evaluate(model, tokenizer, task_cfg, cfg, mesh=mesh)
  result["run"], result["step"] = str(run_dir), step
  out = Path(out_dir or Path(run_dir) / "eval")
  if jax.process_index() == 0:  # every process has the same cells
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "eval.json", json.dumps(result, indent=2))
    write_atomic(out / "eval.md", markdown_table(result) + "\n")
  return result
