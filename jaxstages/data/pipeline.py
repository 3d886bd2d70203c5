"""Input pipelines for every stage, on grain: the task world in, fixed-shape numpy batches out.

One entry point, `make_pipeline(data_cfg, tokenizer)`, returns a checkpointable iterator of batch dicts. What a batch
holds depends on the pipeline's `kind`:

- `pretrain`, `midtrain`, `sft`: **packed rows**, each `[batch, seq_len]`: `tokens`, `targets` (int32), `loss_mask`
  (float32), `segment_ids`, `positions` (int32). Documents are packed first-fit into rows; segment ids count 1, 2,
  3, ... per document within a row and 0 marks padding; positions restart at 0 for each document. `targets[i]` is the
  document's next token and `loss_mask[i]` says whether it is trained on: 0 at the last token of every document (its
  successor belongs to another document), on padding, and (SFT with `loss_on="assistant"`) wherever the target is not
  an assistant token.
- `preference`: per pair `prompt_tokens`/`prompt_mask` `[batch, prompt_len]` (left-padded), `chosen_tokens`,
  `chosen_mask`, `chosen_segment_ids` and the same for `rejected`, each `[batch, seq_len]` (right-padded; the masks
  are 1 on the response tokens, segment ids 1 on every real token), and `op`, `context`, `index`, `valid` `[batch]`.
- `rl`, `eval`: `prompt_tokens`, `prompt_mask` `[batch, prompt_len]`, left-padded with pad id 0 so that every row's
  generation starts in the same column, and `answer`, `op`, `context` (an id into `CONTEXTS`), `index`, `valid`
  `[batch]`, so rewards can be computed from the batch alone. Decoding positions are `cumsum(prompt_mask) - 1`.
- every kind but `eval` also has `source [batch]`: the index of the mixture source a row came from.

**Sources.** Problems come from `tasks.generate(task_cfg, seed, split, index)`, a pure function, so a source is only an
index stream: endless (`num_examples=None`, indices 0, 1, 2, ...; every index is a fresh random problem, so no
shuffle is needed) or a finite set of `num_examples` problems, shuffled by seed and reshuffled each epoch
(`epochs=None` repeats forever). The `eval` kind walks a grid of `(op, context)` cells once, in order. SFT and RL
draw each example's think mode (`think_mix`) from its index, so a revisited problem keeps its mode across epochs.

**Long documents** (`overflow`): `"split"` cuts a document into consecutive pieces of `seq_len` tokens, each packed
as a segment of its own whose positions restart at 0 (targets were computed on the whole document first, so no target
is lost: a document of `n` tokens always contributes `n - 1` trained targets); `"truncate"` keeps the first
`seq_len` tokens; `"drop"` skips the document.

**Mixtures.** `sources` lists several streams (e.g. a new domain plus replay of pre-training data), each with its
own format, task overrides and seed; every output row (a packed row, or one prompt/pair) is drawn from one source
with the source's current weight, so weights are fractions of rows (about the fractions of tokens, for packed
rows). Weights can follow a **schedule** of `(batch, weights)` breakpoints, piecewise constant or linearly
interpolated. The pipeline knows the step because it is deterministic: row `r` of a process's stream is in batch
`r // local_batch`, and the mixer counts rows in its checkpointed state, so batch `k` of the iterator uses the
weights of step `k` (shift with `step_offset` when a pipeline starts at a later training step; with gradient
accumulation the schedule is in batches, not optimizer steps).

**Multi-host.** The data is split into `streams` shards (default: one per process), each a disjoint slice of every
index stream (`[stream::streams]` of the globally shuffled order) with its own mixer and packer, yielding
`batch_size / streams` rows per batch; each JAX process reads its own streams and yields their rows,
`batch_size / process_count` of them; assemble the global batch with
`jaxstages.sharding.global_batch_from_process_local`. With `streams` fixed, the global batch does not depend on how
many processes read it (2 processes of 1 stream each give what 1 process of 2 streams gives). Finite
rl/eval/preference streams are padded with `valid=0` examples to a whole number of global batches, so every process
yields the same number of batches. A finite *packed*
stream ends when its process's documents run out, which can differ by a batch between processes: train on endless
packed streams (the default) when running on several processes.

**Checkpointing.** The iterator is a `grain.DatasetIterator`: `state = it.get_state()` is a JSON-serialisable dict,
and `it.set_state(state)` on a freshly built iterator of the same config continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np

from jaxstages.config import ConfigError, check_bounds, check_keys, from_config, load_config, to_dict
from jaxstages.data import tasks

KINDS = ("pretrain", "midtrain", "sft", "preference", "rl", "eval")
PACKED_KINDS = ("pretrain", "midtrain", "sft")
DOCUMENT_FORMATS = ("pretrain", "instruction", "sft")  # what a packed source may turn a problem into
DEFAULT_FORMAT = {"pretrain": "pretrain", "midtrain": "instruction", "sft": "sft", "preference": "preference",
                  "rl": "rl", "eval": "rl"}
OVERFLOW = ("split", "truncate", "drop")
LOSS_ON = ("assistant", "all", "solution")
REJECTED = ("mixed", "result", "operand")
PROMPTS = ("chat", "document")
INTERP = ("constant", "linear")
# Contexts as int ids, so RL batches can carry them as arrays; stable because SURFACES is a fixed literal.
CONTEXTS: tuple[str, ...] = tuple(c for surface in tasks.SURFACES.values() for c in surface)
CONTEXT_IDS = {c: i for i, c in enumerate(CONTEXTS)}
ENDLESS = 2**62  # size of the index space of an endless source


class Tokenizer(Protocol):
  """What the pipeline needs of `jaxstages.data.tokenizer.Tokenizer`."""

  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]: ...


# -- config ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One stream of a mixture. Unset fields take the pipeline's value.

  `seed`: source `i` of the list defaults to `data.seed + i`, so sources draw different problems (set it to the
  pre-training seed to replay exactly the pre-training problems). `task`: overrides of the pipeline's task config.
  """

  name: str = "main"
  weight: float | None = None
  format: str | None = None
  task: Any = None
  seed: int | None = None
  num_examples: int | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything a pipeline needs; see the module docstring. Built by `data_config` from `configs/data.py`.

  After validation `task` is a `TaskConfig`, `split` is resolved, and two derived attributes hold the parsed
  mixture: `source_configs` (the `SourceConfig`s, every field filled in) and `mixture` (a `MixtureSchedule`).
  """

  kind: str = "pretrain"
  task: Any = None  # TaskConfig keys (a dict in configs) or a TaskConfig
  seq_len: int = 256  # packed row length; the padded length of preference sequences
  batch_size: int = 8  # global batch, over all processes
  seed: int = 0
  split: str | None = None  # default: "eval" for kind eval, else "train"
  num_examples: int | None = None  # None: endless index space
  epochs: int | None = None  # finite sets: passes over the set; None: forever
  shuffle: bool = True  # finite sets: shuffle by seed, differently every epoch
  sources: tuple = ()  # SourceConfig keys per source; empty: one source of the kind's format
  schedule: tuple = ()  # ((batch, weights), ...): weights a sequence aligned with `sources` or {name: weight}
  schedule_interp: str = "constant"  # "constant": the last breakpoint's weights; "linear": interpolate
  step_offset: int = 0  # the training step of this pipeline's first batch, for the schedule
  think_mix: tuple = (0.0, 0.0, 1.0)  # sft/rl: fractions of examples with think on / off / plain (no flag)
  loss_on: str = "assistant"  # sft: train on assistant tokens only, or on every token; pretrain / instruction
  #                               documents: "solution" trains on the solution and answer only (the problem's random
  #                               names and values are no target), anything else on every token
  rejected: str = "mixed"  # preference: the rejected solution's error (tasks.Problem.perturbed_steps)
  overflow: str = "split"  # packed documents longer than seq_len: split | truncate | drop
  pack_bins: int | None = None  # rows packed at once (more: fuller rows); default the per-process batch
  prompt_len: int = 128  # rl/eval/preference: left-padded prompt length
  # rl/eval: the prompt as a chat user turn ("chat"), or the problem as a document, as in pre-training ("document":
  # RL straight from a pre-trained base, which then ends its completion with the end-of-document token)
  prompt: str = "chat"
  eval_ops: tuple = (2, 3, 4, 5, 6)  # eval: the grid's ops
  eval_contexts: tuple = ()  # eval: the grid's contexts; default every context of the task mixture
  eval_per_cell: int = 32  # eval: problems per (op, context) cell
  # independent shards of the data (each a slice of every index stream, with its own mixer and packer), process
  # `p` of `P` reading shards `p * S / P` .. `(p + 1) * S / P - 1`; None: one per process. A fixed number (a
  # multiple of every process count used) gives the same batches on any number of processes
  streams: int | None = None
  read_threads: int = 0  # grain read threads; generation is GIL-bound Python, so threads rarely help
  prefetch: int = 0  # batches a background thread prepares ahead (overlaps with device compute)

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    for key, allowed in (("kind", KINDS), ("loss_on", LOSS_ON), ("overflow", OVERFLOW),
                         ("schedule_interp", INTERP), ("rejected", REJECTED), ("prompt", PROMPTS)):
      if getattr(self, key) not in allowed:
        raise ConfigError(f"data {key}={getattr(self, key)!r} is not one of {list(allowed)}")
    check_bounds(self, "data config", seq_len=">=1", batch_size=">=1", prompt_len=">=1", num_examples=">=1",
                 epochs=">=1", step_offset=">=0")
    task = self.task
    if not isinstance(task, tasks.TaskConfig):
      task = from_config(tasks.TaskConfig, _plain(task or {}), where="data task config")
    set_("task", task)
    split = self.split or ("eval" if self.kind == "eval" else "train")
    check_keys([split], tasks.SPLITS, "splits")
    set_("split", split)
    for key in ("seq_len", "batch_size", "prompt_len", "eval_per_cell"):
      if getattr(self, key) <= 0:
        raise ConfigError(f"data {key}={getattr(self, key)} must be positive")
    for key in ("num_examples", "epochs", "pack_bins", "streams"):
      if getattr(self, key) is not None and getattr(self, key) <= 0:
        raise ConfigError(f"data {key}={getattr(self, key)} must be positive or None")
    mix = tuple(float(x) for x in self.think_mix)
    if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
      raise ConfigError(f"think_mix {self.think_mix} must be three fractions (on, off, plain) summing to 1")
    set_("think_mix", mix)
    set_("eval_ops", tuple(int(o) for o in self.eval_ops))
    set_("eval_contexts", tuple(self.eval_contexts) or tuple(dict.fromkeys(m.context for m in task.mixture)))
    check_keys(self.eval_contexts, tasks.SURFACES[task.surface], f"contexts of the {task.surface!r} surface")
    # derived, like TaskConfig.mixture: the raw fields stay as written, so the config re-validates unchanged
    set_("source_configs", self._parse_sources())
    set_("mixture", MixtureSchedule(self._parse_schedule(), self.schedule_interp))

  def _parse_sources(self) -> tuple[SourceConfig, ...]:
    raw = [s if isinstance(s, SourceConfig) else from_config(SourceConfig, _plain(s), where="data source")
           for s in self.sources] or [SourceConfig()]
    if self.kind == "eval" and self.sources:
      raise ConfigError("eval pipelines walk the (op, context) grid and take no sources")
    names = [s.name for s in raw]
    if len(set(names)) != len(names):
      raise ConfigError(f"data source names must be unique: {names}")
    out = []
    for i, s in enumerate(raw):
      fmt = s.format or DEFAULT_FORMAT[self.kind]
      allowed = DOCUMENT_FORMATS if self.kind in PACKED_KINDS else (DEFAULT_FORMAT[self.kind],)
      if fmt not in allowed:
        raise ConfigError(f"source {s.name!r}: format {fmt!r} cannot feed a {self.kind!r} pipeline; "
                          f"use one of {list(allowed)}")
      task = s.task if isinstance(s.task, tasks.TaskConfig) else (
          self.task.replace(**_plain(s.task)) if s.task else self.task)
      out.append(dataclasses.replace(s, format=fmt, task=task, seed=self.seed + i if s.seed is None else s.seed,
                                     num_examples=s.num_examples or self.num_examples))
    return tuple(out)

  def _parse_schedule(self) -> tuple[tuple[int, tuple[float, ...]], ...]:
    names = [s.name for s in self.source_configs]
    weights = [s.weight for s in self.source_configs]
    if not self.schedule:
      if len(names) == 1 and weights[0] is None:
        weights = [1.0]
      if any(w is None for w in weights):
        raise ConfigError(f"data sources {[n for n, w in zip(names, weights) if w is None]} have no weight "
                          "(give every source a weight, or give a schedule)")
      return ((0, _check_weights(weights, names, "source weights")),)
    if any(w is not None for w in weights):
      raise ConfigError("give mixture weights either per source or in the schedule, not both")
    out, last = [], -1
    for entry in self.schedule:
      step, w = entry
      if isinstance(w, Mapping):
        check_keys(w, names, "schedule weights (source names)")
        w = [w.get(n, 0.0) for n in names]
      if len(w) != len(names):
        raise ConfigError(f"schedule weights {tuple(w)} at step {step}: need one per source {names}")
      if int(step) <= last:
        raise ConfigError(f"schedule steps must increase from >= 0: {[e[0] for e in self.schedule]}")
      last = int(step)
      out.append((int(step), _check_weights(w, names, f"schedule weights at step {step}")))
    return tuple(out)

  @property
  def packed(self) -> bool:
    return self.kind in PACKED_KINDS


def _plain(x: Any) -> dict:
  return to_dict(x) if isinstance(x, (Mapping, ml_collections.ConfigDict)) else dict(x)


def _check_weights(weights: Sequence[float], names: Sequence[str], where: str) -> tuple[float, ...]:
  w = tuple(float(x) for x in weights)
  if min(w) < 0 or abs(sum(w) - 1) > 1e-6:
    # never silently renormalised: a typo in a weight should not quietly change the mixture
    raise ConfigError(f"{where} {dict(zip(names, w))} must be non-negative and sum to 1")
  return w


def data_config(spec: str | Mapping[str, Any] | ml_collections.ConfigDict | DataConfig,
                **overrides: Any) -> DataConfig:
  """A `DataConfig` from a named config of `configs/data.py` (`"sft-symbolic"`), a `file.py:name` spec or a mapping;
  unknown keys raise `ConfigError` naming them."""
  if isinstance(spec, DataConfig):
    return dataclasses.replace(spec, **overrides) if overrides else spec
  if isinstance(spec, str):
    spec = load_config(spec if ".py" in spec else f"data.py:{spec}")
  return from_config(DataConfig, spec, where="data config", **overrides)


# -- mixture schedule -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixtureSchedule:
  """Source weights as a function of the step: breakpoints `((step, weights), ...)`, before the first breakpoint its
  weights hold; `constant` keeps each breakpoint's weights until the next, `linear` interpolates between them."""

  breakpoints: tuple[tuple[int, tuple[float, ...]], ...]
  interp: str = "constant"

  def weights_at(self, step: int) -> np.ndarray:
    """`[num_sources]` weights summing to 1."""
    steps = [s for s, _ in self.breakpoints]
    i = int(np.searchsorted(steps, step, side="right")) - 1
    if i < 0:
      return np.asarray(self.breakpoints[0][1])
    if self.interp == "constant" or i == len(steps) - 1:
      return np.asarray(self.breakpoints[i][1])
    (s0, w0), (s1, w1) = self.breakpoints[i], self.breakpoints[i + 1]
    t = (step - s0) / (s1 - s0)
    return (1 - t) * np.asarray(w0) + t * np.asarray(w1)


class _MixIterator(grain.DatasetIterator):

  def __init__(self, parents: Sequence[grain.DatasetIterator], schedule: MixtureSchedule, rows_per_step: int,
               step_offset: int, seed: Sequence[int]):
    super().__init__(list(parents))
    self._schedule, self._rows_per_step, self._step_offset, self._seed = schedule, rows_per_step, step_offset, seed
    self._row = 0

  def __next__(self) -> dict:
    k = 0
    if len(self._parents) > 1:
      w = self._schedule.weights_at(self._step_offset + self._row // self._rows_per_step)
      # a fresh generator per row keyed by the row number: the choice needs no hidden RNG state to checkpoint
      u = np.random.default_rng([*self._seed, self._row]).random()
      k = min(int(np.searchsorted(np.cumsum(w), u, side="right")), len(w) - 1)
    element = next(self._parents[k])
    self._row += 1
    return {**element, "source": np.int32(k)}

  def get_state(self) -> dict:
    return {"row": self._row, "sources": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict) -> None:
    self._row = int(state["row"])
    for parent, s in zip(self._parents, state["sources"], strict=True):
      parent.set_state(s)


class MixIterDataset(grain.IterDataset):
  """Draws each element from one parent with the schedule's weights at that element's step (`row // rows_per_step`,
  plus `step_offset`), and tags it with `source` (the parent's index). Ends when the chosen parent ends."""

  def __init__(self, parents: Sequence[grain.IterDataset], schedule: MixtureSchedule, rows_per_step: int,
               step_offset: int = 0, seed: Sequence[int] = (0,)):
    super().__init__(list(parents))
    self._schedule, self._rows_per_step, self._step_offset = schedule, rows_per_step, step_offset
    self._seed = tuple(int(s) for s in seed)

  def __iter__(self) -> _MixIterator:
    return _MixIterator([p.__iter__() for p in self._parents], self._schedule, self._rows_per_step,
                        self._step_offset, self._seed)


# -- documents and packing ------------------------------------------------------------------------------------------


def _targets_and_pieces(tokens: Sequence[int], mask: Sequence[float], seq_len: int, overflow: str) -> list[dict]:
  """One document -> the pieces to pack, each `{tokens, targets, loss_mask}` of equal length <= seq_len.

  `mask[i]` says whether token `i` is trained on as a *target*; targets are taken on the whole document before any
  split, so a split never loses the target across a cut.
  """
  tokens = np.asarray(tokens, np.int32)
  if len(tokens) == 0:
    return []
  targets = np.append(tokens[1:], np.int32(0)).astype(np.int32)
  loss_mask = np.append(np.asarray(mask, np.float32)[1:], np.float32(0)).astype(np.float32)
  if len(tokens) > seq_len:
    if overflow == "drop":
      return []
    if overflow == "truncate":
      tokens, targets, loss_mask = tokens[:seq_len], targets[:seq_len], loss_mask[:seq_len]
  return [{"tokens": tokens[i:i + seq_len], "targets": targets[i:i + seq_len], "loss_mask": loss_mask[i:i + seq_len]}
          for i in range(0, len(tokens), seq_len)]


# documents dropped in a row after which a packed stream is taken to be empty: with `overflow="drop"` and every
# document longer than `seq_len`, an endless source would otherwise search for a fitting document forever
MAX_DROPPED_IN_A_ROW = 1000


class _DocumentPieces(grain.experimental.FlatMapTransform):
  max_fan_out = 1024  # only bounds MapDataset flat maps; the IterDataset one used here streams any number

  def __init__(self, seq_len: int, overflow: str):
    self.seq_len, self.overflow = seq_len, overflow
    self.dropped = 0  # documents in a row that gave no piece

  def flat_map(self, doc: dict) -> list[dict]:
    mask = doc.get("mask")
    pieces = _targets_and_pieces(doc["tokens"], np.ones(len(doc["tokens"])) if mask is None else mask,
                                 self.seq_len, self.overflow)
    self.dropped = 0 if pieces else self.dropped + 1
    if self.dropped >= MAX_DROPPED_IN_A_ROW:
      raise ConfigError(f"{self.dropped} documents in a row gave nothing to pack: each was empty or longer than "
                        f"seq_len={self.seq_len} with overflow={self.overflow!r}; raise data.seq_len or set "
                        "data.overflow to 'split' or 'truncate'")
    return pieces


def _rename_packed(row: dict) -> dict:
  return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
          "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def pack_documents(documents: grain.IterDataset | grain.MapDataset | Iterable, seq_len: int, num_bins: int,
                   overflow: str = "split") -> grain.IterDataset:
  """Packs documents into rows of `seq_len` tokens with grain's first-fit packer (a full set of `num_bins` rows is
  emitted whenever a piece fits in none of them).

  documents: dicts with `tokens` (a document's ids, eos included) and optionally `mask` (1 where the token is
    trained on as a target; default all), or plain id sequences.
  Returns rows of `tokens`, `targets`, `segment_ids`, `positions` (int32) and `loss_mask` (float32), each
  `[seq_len]`; batch them with `.batch(n)` for `[n, seq_len]`. Long documents follow `overflow` (module docstring).
  """
  if overflow not in OVERFLOW:
    raise ConfigError(f"overflow={overflow!r} is not one of {list(OVERFLOW)}")
  if isinstance(documents, grain.MapDataset):
    documents = documents.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  elif not isinstance(documents, grain.IterDataset):
    docs = [d if isinstance(d, Mapping) else {"tokens": list(d)} for d in documents]
    documents = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                                                 prefetch_buffer_size=0))
  pieces = grain.experimental.FlatMapIterDataset(documents, _DocumentPieces(seq_len, overflow))
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len},
      num_packing_bins=num_bins, shuffle_bins=False, meta_features=("targets", "loss_mask"))
  return packed.map(_rename_packed)


# -- examples of every format ---------------------------------------------------------------------------------------


def _think(think_mix: Sequence[float], seed: int, index: int) -> bool | None:
  u = np.random.default_rng([seed, index, 0x7468]).random()
  return True if u < think_mix[0] else False if u < think_mix[0] + think_mix[1] else None


def lm_document(tokenizer: Tokenizer, text: str, untrained_prefix: str = "") -> dict:
  """A plain document: its ids and an end-of-document token, every token trained on but those of
  `untrained_prefix` (the start of `text`, e.g. the problem before its solution)."""
  ids = list(tokenizer.encode(text)) + [tokenizer.eos_id]
  mask = np.ones(len(ids), np.float32)
  if untrained_prefix:
    if not text.startswith(untrained_prefix):
      raise ValueError(f"untrained prefix {untrained_prefix[:40]!r} does not start the document {text[:40]!r}")
    mask[:len(tokenizer.encode(untrained_prefix))] = 0.0
  return {"tokens": np.asarray(ids, np.int32), "mask": mask}


def sft_document(tokenizer: Tokenizer, messages: list[dict], loss_on: str = "assistant") -> dict:
  """A chat as one document. No eos is added: the closing `<|im_end|>` ends the turn, and segment ids keep packed
  chats apart. `mask` is the assistant mask (content + its `<|im_end|>`) or, with `loss_on="all"`, all ones."""
  ids, assistant = tokenizer.encode_chat(messages)
  mask = np.ones(len(ids), np.float32) if loss_on == "all" else np.asarray(assistant, np.float32)
  return {"tokens": np.asarray(ids, np.int32), "mask": mask}


def _pad(ids: Sequence[int], length: int, side: str, pad_id: int, what: str) -> tuple[np.ndarray, np.ndarray]:
  """`(ids, mask)` padded to `[length]` on `side`."""
  n = len(ids)
  if n > length:
    # a cut prompt or response changes the task; fail loudly instead
    raise ValueError(f"{what} of {n} tokens does not fit in {length}; raise the config's length for it")
  out, mask = np.full(length, pad_id, np.int32), np.zeros(length, np.int32)
  sl = slice(length - n, length) if side == "left" else slice(0, n)
  out[sl], mask[sl] = ids, 1
  return out, mask


def rl_example(tokenizer: Tokenizer, p: tasks.Problem, prompt_len: int, think: bool | None = None,
               valid: bool = True, prompt_kind: str = "chat") -> dict:
  """The prompt of `p` (a chat user turn, or the problem as a document when `prompt_kind="document"`), left-padded
  to `[prompt_len]`, with the verifier's metadata as scalars."""
  prompt = tasks.rl_prompt(p, think)
  if prompt_kind == "document":  # the pre-training format: the problem's text, the solution follows its newline
    ids = tokenizer.encode(p.text() + "\n")
  else:
    ids, _ = tokenizer.encode_chat(prompt["messages"], add_generation_prompt=True)
  tokens, mask = _pad(ids, prompt_len, "left", tokenizer.pad_id, "RL prompt (prompt_len)")
  return {"prompt_tokens": tokens, "prompt_mask": mask, "answer": np.int32(prompt["answer"]),
          "op": np.int32(prompt["op"]), "context": np.int32(CONTEXT_IDS[prompt["context"]]),
          "index": np.int32(p.index), "valid": np.int32(valid)}


def preference_example(tokenizer: Tokenizer, p: tasks.Problem, seq_len: int, prompt_len: int,
                       valid: bool = True, rejected: str = "mixed") -> dict:
  """The pair of `tasks.preference_pair(p)`: prompt left-padded `[prompt_len]`; chosen/rejected prompt + response
  right-padded `[seq_len]` with masks 1 on the response tokens."""
  pair = tasks.preference_pair(p, error=rejected)
  prompt_ids, _ = tokenizer.encode_chat(pair["prompt"], add_generation_prompt=True)
  out = dict(zip(("prompt_tokens", "prompt_mask"),
                 _pad(prompt_ids, prompt_len, "left", tokenizer.pad_id, "preference prompt (prompt_len)")))
  for side in ("chosen", "rejected"):
    ids, response = tokenizer.encode_chat(pair["prompt"] + pair[side])
    out[f"{side}_tokens"], out[f"{side}_segment_ids"] = _pad(ids, seq_len, "right", tokenizer.pad_id,
                                                             f"{side} sequence (seq_len)")
    out[f"{side}_mask"] = _pad(response, seq_len, "right", 0, f"{side} sequence (seq_len)")[0]
  out.update(op=np.int32(p.op), context=np.int32(CONTEXT_IDS[p.context]), index=np.int32(p.index),
             valid=np.int32(valid))
  return out


# -- index streams and sources --------------------------------------------------------------------------------------


def _index_dataset(num_examples: int | None, epochs: int | None, shuffle: bool, seed: int, process_index: int,
                   process_count: int, pad_to: int | None = None) -> grain.MapDataset:
  """This process's indices: a slice of the global stream (shuffled per epoch for finite sets). `pad_to`: pad a
  finite stream with -1 (invalid) to a multiple of it before slicing, so every process gets as many."""
  if num_examples is None:
    ds = grain.MapDataset.range(ENDLESS)
  else:
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
      ds = ds.shuffle(seed % 2**32)  # grain folds the epoch into the seed: a new order every epoch
    if epochs != 1:
      ds = ds.repeat(epochs)
    if epochs is not None and pad_to and len(ds) % pad_to:
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([-1] * (pad_to - len(ds) % pad_to))])
  return ds[process_index::process_count]


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)


def _source_dataset(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer, process_index: int,
                    process_count: int, local_batch: int) -> grain.IterDataset:
  """One source's stream of rows (packed kinds) or examples (the others), for this process."""
  task, seed, split = src.task, src.seed, cfg.split
  pad_to = cfg.batch_size if not cfg.packed else None
  indices = _index_dataset(src.num_examples, cfg.epochs, cfg.shuffle, seed, process_index, process_count, pad_to)

  def problem(index: int) -> tasks.Problem:
    return tasks.generate(task, seed, split, max(index, 0))

  def lm(document, p: tasks.Problem, prompt: str | None = None) -> dict:
    """`document(p)` as one LM document; with loss on the solution, no target before the end of `prompt`'s line
    (the problem's text by default)."""
    text, prompt = document(p), prompt or p.text()
    prefix = text[:text.index(prompt) + len(prompt) + 1] if cfg.loss_on == "solution" else ""
    return lm_document(tokenizer, text, prefix)

  if src.format == "pretrain":
    def pretrain(p: tasks.Problem) -> dict:
      if tasks.is_recall_drill(p, task.recall_drills):
        return lm(tasks.recall_document, p, tasks.recall_prompt(p))
      return lm(tasks.pretrain_document, p)

    docs = indices.map(lambda i: pretrain(problem(i)))
  elif src.format == "instruction":
    docs = indices.map(lambda i: lm(tasks.instruction_document, problem(i)))
  elif src.format == "sft":
    docs = indices.map(lambda i: sft_document(
        tokenizer, tasks.sft_messages(problem(i), think=_think(cfg.think_mix, seed, i)), cfg.loss_on))
  elif src.format == "rl":
    return indices.map(lambda i: rl_example(tokenizer, problem(i), cfg.prompt_len,
                                            _think(cfg.think_mix, seed, max(i, 0)), valid=i >= 0,
                                            prompt_kind=cfg.prompt)
                       ).to_iter_dataset(_read_options(cfg))
  else:  # preference
    return indices.map(lambda i: preference_example(tokenizer, problem(i), cfg.seq_len, cfg.prompt_len,
                                                    valid=i >= 0, rejected=cfg.rejected)
                       ).to_iter_dataset(_read_options(cfg))
  return pack_documents(docs.to_iter_dataset(_read_options(cfg)), cfg.seq_len, cfg.pack_bins or local_batch,
                        cfg.overflow)


def eval_cells(cfg: DataConfig) -> list[tuple[int, str]]:
  """The eval grid's `(op, context)` cells in stream order (cell `c` holds indices `c * eval_per_cell + i`)."""
  return [(op, ctx) for ctx in cfg.eval_contexts for op in cfg.eval_ops]


def _eval_dataset(cfg: DataConfig, tokenizer: Tokenizer, process_index: int, process_count: int) -> grain.IterDataset:
  cells, per_cell = eval_cells(cfg), cfg.eval_per_cell
  indices = _index_dataset(len(cells) * per_cell, 1, False, cfg.seed, process_index, process_count, cfg.batch_size)

  def example(g: int) -> dict:
    op, ctx = cells[max(g, 0) // per_cell]
    p = tasks.generate(cfg.task, cfg.seed, cfg.split, max(g, 0) % per_cell, op=op, context=ctx)
    return rl_example(tokenizer, p, cfg.prompt_len, _think(cfg.think_mix, cfg.seed, max(g, 0)), valid=g >= 0,
                      prompt_kind=cfg.prompt)

  return indices.map(example).to_iter_dataset(_read_options(cfg))


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:  # unless given (tests and tools simulate processes): jax's
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def make_dataset(data_cfg: DataConfig | Mapping | ml_collections.ConfigDict | str, tokenizer: Tokenizer,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """The pipeline as a grain `IterDataset` of this process's batches (`make_pipeline` iterates it): the rows of its
  streams (`DataConfig.streams`), stream by stream."""
  cfg = data_config(data_cfg)
  process_index, process_count = _default_process(process_index, process_count)
  streams = cfg.streams or process_count
  if streams % process_count:
    raise ConfigError(f"data.streams={streams} does not split over {process_count} processes; use a multiple of "
                      f"{process_count}")
  if cfg.batch_size % streams:
    raise ConfigError(f"data batch_size {cfg.batch_size} is not divisible by the {streams} data streams "
                      f"({'data.streams' if cfg.streams else 'one per process'})")
  per_process, stream_batch = streams // process_count, cfg.batch_size // streams
  parts = [_stream_dataset(cfg, tokenizer, s, streams, stream_batch)
           for s in range(process_index * per_process, (process_index + 1) * per_process)]
  ds = parts[0] if len(parts) == 1 else ConcatRowsIterDataset(parts)
  if cfg.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  return ds


def _stream_dataset(cfg: DataConfig, tokenizer: Tokenizer, stream: int, streams: int,
                    stream_batch: int) -> grain.IterDataset:
  """Stream `stream` of `streams`: batches of `stream_batch` rows."""
  if cfg.kind == "eval":
    ds = _eval_dataset(cfg, tokenizer, stream, streams)
  else:
    parents = [_source_dataset(cfg, s, tokenizer, stream, streams, stream_batch) for s in cfg.source_configs]
    ds = MixIterDataset(parents, cfg.mixture, stream_batch, cfg.step_offset, seed=(cfg.seed, stream, 0x6D6978))
  # Finite rl/eval/preference streams are padded to whole batches; a finite packed stream drops its last partial batch
  return ds.batch(stream_batch, drop_remainder=True)


class _ConcatRowsIterator(grain.DatasetIterator):

  def __next__(self) -> dict:
    parts = [next(p) for p in self._parents]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"streams": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict) -> None:
    for parent, s in zip(self._parents, state["streams"], strict=True):
      parent.set_state(s)


class ConcatRowsIterDataset(grain.IterDataset):
  """Batches of several parents side by side: each element is the parents' next batches concatenated along rows
  (a process's data streams). Ends when any parent ends."""

  def __iter__(self) -> _ConcatRowsIterator:
    return _ConcatRowsIterator([p.__iter__() for p in self._parents])


def make_pipeline(data_cfg: DataConfig | Mapping | ml_collections.ConfigDict | str, tokenizer: Tokenizer,
                  process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
  """This process's batches (dicts of numpy arrays, see the module docstring) as a checkpointable iterator.

  process_index, process_count: default `jax.process_index()` / `jax.process_count()`; each process gets
    `batch_size / process_count` rows of a disjoint slice of the data.
  """
  return iter(make_dataset(data_cfg, tokenizer, process_index, process_count))


# -- showing examples -----------------------------------------------------------------------------------------------

_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def _spans(tokenizer: Tokenizer, ids: Sequence[int], trained: Sequence[bool], ansi: bool) -> str:
  """Decodes runs of equally-trained tokens; untrained runs dimmed (ansi) or in `[[...]]`."""
  out, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or trained[i] != trained[start]:
      text = tokenizer.decode([int(t) for t in ids[start:i]])
      if not trained[start]:
        text = f"{_DIM}{text}{_RESET}" if ansi else f"[[{text}]]"
      out.append(text)
      start = i
  return "".join(out)


def format_example(batch: Mapping[str, np.ndarray], row: int, tokenizer: Tokenizer, ansi: bool = False) -> str:
  """One row of a batch as text: packed rows segment by segment, with the tokens the loss does *not* train on
  dimmed or in `[[...]]` (token `j` is trained when `loss_mask[j - 1]` is 1, i.e. it is a trained target); prompts
  with their metadata; preference pairs with their responses marked."""
  lines = []
  if "segment_ids" in batch:
    seg, tokens, loss = batch["segment_ids"][row], batch["tokens"][row], batch["loss_mask"][row]
    lines.append(f"source {int(batch['source'][row])}, {int((seg > 0).sum())}/{len(seg)} tokens used, "
                 f"{int(loss.sum())} trained targets")
    for s in range(1, int(seg.max()) + 1):
      idx = np.flatnonzero(seg == s)
      trained = [j > idx[0] and loss[j - 1] > 0 for j in idx]
      lines.append(f"--- segment {s}: {len(idx)} tokens, positions {batch['positions'][row][idx[0]]}.."
                   f"{batch['positions'][row][idx[-1]]} ---")
      lines.append(_spans(tokenizer, tokens[idx], trained, ansi))
    if (seg == 0).any():
      lines.append(f"--- padding: {int((seg == 0).sum())} tokens ---")
    return "\n".join(lines)
  if "chosen_tokens" in batch:
    lines.append(f"op {int(batch['op'][row])}, context {CONTEXTS[int(batch['context'][row])]}, "
                 f"index {int(batch['index'][row])}, valid {int(batch['valid'][row])}")
    for side in ("chosen", "rejected"):
      real = batch[f"{side}_segment_ids"][row] > 0
      lines.append(f"--- {side} ---")
      lines.append(_spans(tokenizer, batch[f"{side}_tokens"][row][real], batch[f"{side}_mask"][row][real] > 0,
                          ansi))
    return "\n".join(lines)
  real = batch["prompt_mask"][row] > 0
  lines.append(f"answer {int(batch['answer'][row])}, op {int(batch['op'][row])}, "
               f"context {CONTEXTS[int(batch['context'][row])]}, index {int(batch['index'][row])}, "
               f"valid {int(batch['valid'][row])}, left padding {int((~real).sum())}")
  lines.append(tokenizer.decode([int(t) for t in batch["prompt_tokens"][row][real]]))
  return "\n".join(lines)


def show(data_cfg: DataConfig | Mapping | ml_collections.ConfigDict | str, tokenizer: Tokenizer, n: int = 5,
         ansi: bool = False) -> str:
  """The first `n` rows of the pipeline (single process), formatted by `format_example`."""
  cfg = data_config(data_cfg)
  it, out = make_pipeline(cfg, tokenizer, 0, 1), []
  for batch in it:
    if len(out) >= n:
      break
    for r in range(min(cfg.batch_size, n - len(out))):
      out.append(f"=== example {len(out)} ===\n" + format_example(batch, r, tokenizer, ansi))
  return "\n".join(out)


__all__ = ["CONTEXTS", "ConcatRowsIterDataset", "DataConfig", "MixIterDataset", "MixtureSchedule", "SourceConfig",
           "data_config", "eval_cells", "format_example", "lm_document", "make_dataset", "make_pipeline",
           "pack_documents", "preference_example", "rl_example", "sft_document", "show"]
