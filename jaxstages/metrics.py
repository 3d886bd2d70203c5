"""Metrics to `metrics.jsonl` and TensorBoard event files, and a progress bar that stays quiet off a terminal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm


class MetricsWriter:
  """Appends one JSON object per logged step to `dir/metrics.jsonl` and writes the same scalars to TensorBoard.
  Only process 0 writes."""

  def __init__(self, directory: str | Path, tensorboard: bool = True):
    self.directory = Path(directory)
    self.enabled = jax.process_index() == 0
    self._file = self._tb = None
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
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.directory / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

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


def read_metrics(path: str | Path) -> list[dict]:
  """The rows of a `metrics.jsonl`; a line that is not JSON fails naming the file and the line number."""
  rows = []
  for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg}): {line[:80]!r}") from None
  return rows


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
  """A tqdm bar with ETA; disabled when stderr is not a terminal, under CI, or off process 0."""
  quiet = not sys.stderr.isatty() or os.environ.get("CI") == "true" or jax.process_index() != 0
  return tqdm(total=total, initial=initial, desc=desc, disable=quiet, dynamic_ncols=True)
