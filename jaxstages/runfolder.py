"""Run folders that stay true: one writer at a time, names that stay inside the folder, and a start that fails
leaving the folder as it was.

- `locked(folder)`: a lock (`.jaxstages.lock`, a symbolic link whose target is JSON with the holder's host and pid:
  made with its content in one atomic step, never seen half-written) taken by process 0 for as
  long as a stage or a pipeline writes into `folder`; a second writer is refused naming the holder. A lock left by a
  process that is gone (same host, pid not running) is taken over with a warning; one from another host is only
  reported (its pid cannot be checked from here).
- `check_name`: a stage name is one safe path component that is none of the run folder's own files.
- `start_or_restore(folder)`: what a failed start added to `folder` (`tokenizer/`, `checkpoints/`, `config.json`)
  is removed again, and the files it rewrote (`config.json`) get their old text back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

LOCK = ".jaxstages.lock"
RESERVED = ("tokenizer", "checkpoints", "broken_checkpoints", "tensorboard", "eval", "replaced")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunFolderError(RuntimeError):
  """A run folder that cannot be written as asked: held by another writer, or asked to hold what does not fit it."""


def check_name(name: str, where: str) -> str:
  """`name` when it is one path component of letters, digits, `.`, `_` and `-` (not starting with `.` or `-`) and
  none of a run folder's own entries (`RESERVED`), else a `RunFolderError` naming it."""
  if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
    raise RunFolderError(f"{where} name {name!r} must be one folder name of letters, digits, '.', '_' and '-' "
                         f"(not starting with '.' or '-'), and none of {list(RESERVED)}")
  return name


def local(folder: str | os.PathLike, what: str = "workdir") -> Path:
  """`folder` as a local `Path`; a URL (`gs://...`) fails with a clear message instead of becoming a local folder
  named `gs:`. Checkpoints reach cloud storage through orbax (`etils.epath`), but a run folder's lock, metrics and
  tokenizer are local files."""
  text = os.fspath(folder)
  if "://" in text:
    scheme = text.split("://")[0]
    backend = {"gs": "gcsfs", "s3": "s3fs"}.get(scheme)
    installed = bool(backend) and importlib.util.find_spec(backend) is not None
    have = f"; its backend {backend} is {'installed' if installed else 'not installed'}"
    raise RunFolderError(f"{what} {text}: a run folder must be a local path (its lock, metrics and tokenizer are "
                         f"local files{have if backend else ''}); train into a local folder and copy it, or mount the "
                         "bucket (gcsfuse)")
  return Path(text)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
  """Holds `folder/.jaxstages.lock` (process 0; created with the folder if needed, and the folder removed again if
  it is left empty) while inside. A lock held by this same process is re-entered."""
  if jax.process_index() != 0:
    yield
    return
  folder = Path(folder)
  made = not folder.exists()
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / LOCK
  me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  while True:
    try:  # a symbolic link whose target is the holder: created with its content in one atomic step
      os.symlink(json.dumps(me), path)
    except FileExistsError:
      try:
        holder = json.loads(os.readlink(path))
      except FileNotFoundError:  # released this instant
        continue
      except (OSError, ValueError):
        holder = {}
      if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        yield  # re-entered: the outer holder releases it
        return
      if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
        warnings.warn(f"{path}: the run that held it (pid {holder.get('pid')}, since {holder.get('since')}) is gone; "
                      "taking it over", stacklevel=3)
        path.unlink(missing_ok=True)
        continue
      raise RunFolderError(
          f"{folder} is being written by pid {holder.get('pid')} on host {holder.get('host')} (since "
          f"{holder.get('since')}); wait for it to end, or, if that run is gone, delete {path}") from None
    break
  try:
    yield
  finally:
    path.unlink(missing_ok=True)
    if made and not any(folder.iterdir()):  # a start that failed and took back what it wrote: no trace
      folder.rmdir()


STARTED = ("tokenizer", "checkpoints", "config.json")  # what a start writes into a run or stage folder


@contextlib.contextmanager
def start_or_restore(folder: str | os.PathLike, started: tuple[str, ...] = STARTED,
                     rewritten: tuple[str, ...] = ("config.json",)) -> Iterator[None]:
  """A start that raises leaves `folder` as it was: the entries of `started` it added are removed, and the
  `rewritten` files get their old text back. Nothing else is touched (a broken checkpoint set aside stays set
  aside). Process 0 does the undoing."""
  folder = Path(folder)
  before = set(os.listdir(folder)) if folder.exists() else set()
  saved = {name: (folder / name).read_bytes() for name in rewritten if (folder / name).is_file()}
  try:
    yield
  except BaseException:
    if jax.process_index() == 0 and folder.exists():
      for name in (set(started) & set(os.listdir(folder))) - before:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
      for name, data in saved.items():
        (folder / name).write_bytes(data)
    raise
