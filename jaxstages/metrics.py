"""Metrics to `metrics.jsonl` and TensorBoard event files, and progress that works everywhere: a tqdm bar on a
terminal, one line per log to stderr elsewhere (nohup, SLURM, `| tee`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
from absl import logging as absl_logging
from tqdm import tqdm


# TensorBoard groups: `eval/` held-out metrics, `rollout/` what an RL step's sampling measured, `time/` speeds and
# times, `train/` the rest (the update's own metrics)
ROLLOUT_METRICS = ("reward_mean", "reward_std", "pass_rate", "outcome_rate", "hack_rate", "response_length",
                   "truncated_fraction", "kl_ref_sequence", "kl_coef", "value_mean", "mismatch_abs_logprob",
                   "zero_variance_groups", "groups_dropped", "groups_filled", "sampling_rounds",
                   "reference_forwards", "flops_sampling", "flops_logprobs", "flops_update")
TIME_METRICS = ("step_time_s", "tokens_per_s", "mfu")


def tensorboard_tag(name: str) -> str:
  """The TensorBoard tag of a metric: `eval_loss` -> `eval/loss`, `reward_mean` -> `rollout/reward_mean`,
  `time_sampling_s` -> `time/sampling_s`, `loss` -> `train/loss`."""
  if name.startswith("eval_"):
    return "eval/" + name.removeprefix("eval_")
  if name.startswith("time_") or name in TIME_METRICS:
    return "time/" + name.removeprefix("time_")
  if name in ROLLOUT_METRICS:
    return "rollout/" + name
  return "train/" + name


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without PyTorch: where torch is installed, tensorboardX loads it at
  import only to accept torch tensors as values (about 3 s of every process's start-up); this writer logs Python
  numbers, so torch stays out unless something else has already loaded it."""
  keep_out = "torch" not in sys.modules
  if keep_out:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    from tensorboardX import SummaryWriter
  finally:
    if keep_out:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends one JSON object per logged step to `dir/metrics.jsonl` (every row, a resumed run's again-computed
  steps included: the record of what ran) and writes the same scalars to TensorBoard, grouped by
  `tensorboard_tag`, each tag only when its value changed (a constant is one point, not a flat line of them).
  `resumed_from`: TensorBoard drops what an earlier attempt logged after that step (`purge_step`), so a curve has
  one value per step. Only process 0 writes."""

  def __init__(self, directory: str | Path, tensorboard: bool = True, resumed_from: int | None = None):
    self.directory = Path(directory)
    self.enabled = jax.process_index() == 0
    self._file = self._tb = None
    self._last: dict[str, float] = {}
    if self.enabled:
      self.directory.mkdir(parents=True, exist_ok=True)
      path = self.directory / "metrics.jsonl"
      if path.exists():  # a run killed mid-write left half a line: drop it before appending
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
          with open(path, "r+b") as f:
            f.truncate(text.rfind(b"\n") + 1)
      self._file = open(path, "a")
      if tensorboard:
        purge = None if resumed_from is None else resumed_from + 1
        # a file of its own per attempt: tensorboardX names files by the second, and a second attempt within it
        # would write over the first's
        self._tb = _summary_writer_class()(str(self.directory / "tensorboard"), purge_step=purge,
                                           filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and self._last.get(k) != v:
          self._tb.add_scalar(tensorboard_tag(k), v, int(step))
          self._last[k] = v

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


def _scalar(v):
  try:
    v = v.item()
  except AttributeError:
    pass
  return v


def write_atomic(path: str | Path, text: str) -> None:
  """Writes `text` to `path` so that a reader (or a run resumed after a kill) sees the old file or the new one,
  never half of one: a temporary file in the same folder, renamed over `path`."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_metrics(path: str | Path, as_run: bool = False) -> list[dict]:
  """The rows of a `metrics.jsonl`; a line that is not JSON fails naming the file and the line number.

  The file keeps every attempt's rows. `as_run=True` gives the run as it went on: when a resumed attempt logs a
  step again (or one before a step already logged), the earlier attempt's rows from that step on are dropped, so
  each step has the row of the attempt that continued (what TensorBoard shows too) and curves of resumed and
  uninterrupted runs line up step for step."""
  rows = []
  last, kinds_at_last = None, set()  # the latest step kept, and the key sets of its rows
  for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg}): {line[:80]!r}") from None
      step, kind = row.get("step"), frozenset(row)
      if as_run and step is not None and last is not None and (
          step < last or (step == last and kind in kinds_at_last)):  # a resumed attempt: drop what it re-does
        rows = [r for r in rows if r.get("step") is None or r["step"] < step]
        last = max((r["step"] for r in rows if r.get("step") is not None), default=None)
        kinds_at_last = {frozenset(r) for r in rows if r.get("step") == last}
      if step is not None:
        if last is None or step > last:
          last, kinds_at_last = step, set()
        kinds_at_last.add(kind)
      rows.append(row)
  return rows


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
  """A tqdm bar with ETA; disabled when stderr is not a terminal, under CI, or off process 0."""
  quiet = not sys.stderr.isatty() or os.environ.get("CI") == "true" or jax.process_index() != 0
  return tqdm(total=total, initial=initial, desc=desc, disable=quiet, dynamic_ncols=True)


def on_terminal() -> bool:
  """Whether a bar can redraw in place: stderr is a terminal and not under CI."""
  return sys.stderr.isatty() and os.environ.get("CI") != "true"


class TrainProgress:
  """A stage's progress on process 0: a tqdm bar on a terminal; elsewhere one line per `log` to stderr with the
  step, loss, tokens per second and the time left (a log file of a long job shows where it is)."""

  def __init__(self, total: int, desc: str, initial: int = 0):
    self.total, self.desc, self.step = total, desc, initial
    self.enabled = jax.process_index() == 0
    self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if (
        self.enabled and on_terminal()) else None

  def log(self, step: int, row: dict[str, Any]) -> None:
    if self.bar is not None:
      self.bar.update(step - self.step)
      self.bar.set_postfix(loss=f"{row['loss']:.4f}")
    elif self.enabled:
      eta = max(self.total - step, 0) * row.get("step_time_s", 0.0)
      print(f"{self.desc}: step {step}/{self.total}  loss {row['loss']:.4f}  "
            f"{row.get('tokens_per_s', 0.0):,.0f} tokens/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
            file=sys.stderr, flush=True)
    self.step = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def quiet_libraries(verbose: bool = False) -> None:
  """The libraries' routine logs (orbax's per-checkpoint notes and warnings go through absl) shown only when asked
  (`--verbose`); their errors always."""
  level = logging.INFO if verbose else logging.ERROR
  for name in ("absl", "orbax", "jax._src.distributed"):
    logging.getLogger(name).setLevel(level)
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)  # orbax logs through absl
