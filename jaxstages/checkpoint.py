"""Checkpoints of a stage: orbax `CheckpointManager` over params, optimizer state, step/rng and the data iterator.

Each checkpoint step holds four items: `params`, `opt_state`, `meta` (step, rng) and `data` (the data iterator's
JSON state, one file per process: `data/process_I-of-N.json`, since each process reads its own slice of the data and
resumes from its own position), so a later stage can restore `params` alone (the stage hand-off) while a resumed
stage restores all four. Every process calls `save` and `restore`: orbax writes and reads each process's shards of
the arrays, and each process its own data file.
Arrays are restored straight into the shardings of the target state, so a checkpoint written on one mesh loads on
another. Paths go through `etils.epath` as orbax's do: local folders and cloud URLs (`gs://...`) alike.

Orbax writes a step into a temporary folder and renames it into place once every item is committed, so a save cut
short by a kill never shows up as a step. What that cannot catch is a committed step damaged afterwards (a
truncated or deleted file, a disk that filled up while syncing): once a step is committed, `MANIFEST` records the
size and CRC-32 of each of its files, and a resume checks the latest step against it. A step that fails the check,
or fails to restore, is moved to `../broken_checkpoints/` with a warning naming it and the step used instead, and
the previous good step is restored. Checkpoints hold arrays (tensorstore) and JSON only, never pickles.

A stage whose module wraps the policy with more (PPO's actor-critic: the policy and its critic) keeps the policy
under the key `policy` (`POLICY`) of its params, so `restore_params` of a plain model's params finds it there and
restores that subtree alone: handing a stage's policy on needs no knowledge of the stage that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.experimental.multihost_utils
import orbax.checkpoint as ocp
from etils import epath

from jaxstages.state import TrainState


class ProcessJsonHandler(ocp.JsonCheckpointHandler):
  """Orbax handler of a JSON dict that differs by process (a data iterator's position): every process writes its
  own `process_I-of-N.json` (orbax's `JsonCheckpointHandler` writes the primary process's alone) and reads its own
  back. A checkpoint of the single-file form (`metadata`, written before per-process files) restores on one
  process."""

  async def async_save(self, directory, item=None, args=None):
    # serialised now: the caller's dict may change while the save runs in the background
    text = json.dumps(args.item if args is not None else item)

    async def write():
      (directory / process_file()).write_text(text)

    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="jaxstages_process_json_save")]

  def restore(self, directory, item=None, args=None) -> dict:
    del item, args
    path = directory / process_file()
    if path.exists():
      return json.loads(path.read_text())
    if jax.process_count() == 1 and (directory / "metadata").exists():
      return json.loads((directory / "metadata").read_text())
    saved = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    raise FileNotFoundError(f"{path} not found (the step has {saved}): the data iterator state was saved by another "
                            f"number of processes than this run's {jax.process_count()}; resume with as many "
                            "processes as saved it")


def process_file(index: int | None = None, count: int | None = None) -> str:
  """The file name of a process's own JSON state in a checkpoint item."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return f"process_{index}-of-{count}.json"


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


def _path(directory: str | epath.Path) -> epath.Path:
  """Cloud URLs as given; local paths made absolute (orbax requires it)."""
  return epath.Path(directory) if "://" in str(directory) else epath.Path(directory).absolute()


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model: names the tensor and both shapes."""


POLICY = "policy"  # the params key under which a stage module that wraps the policy keeps it (see the docstring)
ITEMS = ("params", "opt_state", "meta", "data")  # the items of every checkpoint step
MANIFEST = "jaxstages_manifest.json"  # in each step folder: {"files": {relative path: [bytes, crc32]}}


class BrokenCheckpointError(RuntimeError):
  """No checkpoint step of a stage passes its manifest check and restores."""


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(directory: epath.Path) -> list[epath.Path]:
  out = []
  for path in sorted(directory.iterdir()):
    out.extend(_files(path) if path.is_dir() else [path])
  return out


def write_manifest(step_dir: epath.Path) -> None:
  """Records the size and CRC-32 of every file of a committed step (written aside, then renamed into place)."""
  files = {str(p.relative_to(step_dir)): [p.stat().length, _crc32(p)]
           for p in _files(step_dir) if not p.name.startswith(MANIFEST)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files}))
  tmp.replace(step_dir / MANIFEST)  # over an older one (a params folder re-made in place)


def check_step(step_dir: epath.Path) -> str | None:
  """None when every file in the step's manifest is there with its size and CRC-32 (or the step has no manifest:
  a kill between commit and manifest; restoring it is then the test), else what is wrong, for a message."""
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_text())["files"]
  except (ValueError, KeyError) as e:
    return f"its manifest {manifest} is unreadable ({e})"
  for name, (size, crc) in files.items():
    path = step_dir / name
    if not path.exists():
      return f"{path} is missing"
    if (actual := path.stat().length) != size:
      return f"{path} has {actual} bytes, the manifest says {size}"
    if _crc32(path) != crc:
      return f"{path} does not match its CRC-32 in the manifest"
  return None


class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`, and always saves when forced."""

  def __init__(self, directory: str | epath.Path, save_every: int = 100, keep: int | None = 2,
               async_save: bool = True):
    self.directory = _path(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=ITEMS)

  def save(self, state: TrainState, data_state: dict | None = None, force: bool = False,
           step: int | None = None) -> bool:
    """Saves `state` when `step` is a multiple of `save_every` (or `force`). Returns whether a save started.

    `step` defaults to `state.step`; the train loop passes its own counter so that deciding not to save costs no
    device-to-host transfer.
    """
    step = int(state.step) if step is None else step
    if not force and (step % self.save_every or step in self.manager.all_steps()):
      return False
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ProcessJsonSave(data_state or {}))
    started = self.manager.save(step, args=args, force=True)
    self._write_manifests(exclude=step)  # orbax waited for the previous saves before starting this one
    return started

  def _write_manifests(self, exclude: int | None = None) -> None:
    if jax.process_index() != 0:
      return
    for s in self.manager.all_steps():
      step_dir = self.directory / str(s)
      if s != exclude and step_dir.exists() and not (step_dir / MANIFEST).exists():
        write_manifest(step_dir)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, target: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
    """The train state of the latest good step placed in `shardings`, and the data iterator state. Steps that fail
    their manifest check or their restore are moved aside with a warning, and the one before is tried."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    broken = []
    for step in steps:
      problem = check_step(self.directory / str(step))
      if problem is None:
        try:
          restored = self._restore(step, target, shardings)
        except Exception as e:  # noqa: BLE001 - any failure to read a step means: not this step
          problem = f"restoring it failed: {_first_line(e)}"
      if problem is None:
        if broken:
          self._set_aside(broken, used=step)
        return restored
      broken.append((step, problem))
    raise BrokenCheckpointError(f"no checkpoint in {self.directory} can be restored: " + "; ".join(
        f"step {s}: {p}" for s, p in broken))

  def _set_aside(self, broken: list[tuple[int, str]], used: int) -> None:
    """Moves broken steps to `../broken_checkpoints/` (so later saves can take their step numbers) and warns."""
    aside = self.directory.parent / "broken_checkpoints"
    for step, problem in broken:
      warnings.warn(f"checkpoint step {step} in {self.directory} is broken ({problem}); it is moved to {aside} and "
                    f"the run resumes from step {used}", stacklevel=3)
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / str(step)
        while target.exists():
          target = aside / (target.name + "-again")
        (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      jax.experimental.multihost_utils.sync_global_devices("jaxstages: broken checkpoints set aside")
    self.manager.reload()

  def _restore(self, step: int, target: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target.params, shardings.params)),
        opt_state=ocp.args.StandardRestore(_abstract(target.opt_state, shardings.opt_state)),
        meta=ocp.args.StandardRestore(_abstract({"step": target.step, "rng": target.rng},
                                                {"step": shardings.step, "rng": shardings.rng})),
        data=ProcessJsonRestore())
    restored = self.manager.restore(step, args=args)
    meta = restored.meta
    return TrainState(restored.params, restored.opt_state, meta["step"], meta["rng"]), dict(restored.data or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    self.manager.close()


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def _params_metadata(step_dir: epath.Path):
  """The array metadata (shapes, dtypes) of a step's `params` item, read by the item's handler: a `Checkpointer`
  would look for step metadata inside the item folder and log that it is missing on every read."""
  return ocp.StandardCheckpointHandler().metadata(step_dir / "params")


def _tree_of(metadata):
  """The pytree of array metadata inside an orbax metadata object (its shape differs across orbax APIs)."""
  tree = getattr(metadata, "item_metadata", metadata)
  return getattr(tree, "tree", tree)


def check_shapes(metadata, target, folder: Any) -> None:
  """Raises `CheckpointMismatchError` naming the tensor and both shapes when the saved arrays (orbax `metadata`) do
  not fit `target` (a tree of arrays or `ShapeDtypeStruct`s)."""
  saved = dict(jax.tree_util.tree_flatten_with_path(_tree_of(metadata))[0])
  wanted = dict(jax.tree_util.tree_flatten_with_path(target)[0])
  # params saved from an nnx.State carry each Variable's `value` as a last key; pure-dict targets do not
  name = lambda path: ".".join(k for k in map(_key, path) if k not in ("", "value"))
  saved_names = {name(p): v for p, v in saved.items()}
  for path, want in wanted.items():
    have = saved_names.get(name(path))
    if have is None:
      raise CheckpointMismatchError(f"{folder}: tensor {name(path)!r} is missing from the checkpoint")
    if tuple(have.shape) != tuple(want.shape):
      raise CheckpointMismatchError(f"{folder}: tensor {name(path)!r} has shape {tuple(have.shape)} in the "
                                    f"checkpoint but the model expects {tuple(want.shape)}")


def check_fits(directory: str | epath.Path, target_params: Any) -> None:
  """Raises `CheckpointMismatchError` when the latest readable checkpoint in `directory` holds params of another
  shape than `target_params`: a stage re-run in its workdir with another model is refused, not resumed into (nor
  its good checkpoints taken for broken ones). Unreadable steps are left to `Checkpointer.restore`."""
  path = _path(directory)
  steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True) if path.exists() else []
  for step in steps:
    try:
      metadata = _params_metadata(path / str(step))
    except Exception:  # noqa: BLE001 - a damaged step: the restore sets it aside
      continue
    try:
      check_shapes(metadata, target_params, f"{directory} (step {step})")
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(f"{e}: the workdir holds another model's checkpoints; train this config in "
                                    "another workdir, or set the model back to the one in its config.json") from None
    return


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def restore_params(directory: str | epath.Path, target_params: Any, shardings: Any, step: int | None = None):
  """Only the parameters of another run's or stage's checkpoint (latest good step by default): the stage hand-off.

  Each step is checked against its manifest (sizes and CRC-32, as a resume checks) before it is read. Without
  `step`, a step that fails the check or fails to read is skipped with a warning naming it and the step used
  instead (nothing is moved: a reader leaves the folder as it is); `BrokenCheckpointError` when no step is good, or
  when the asked-for `step` is broken. A checkpoint of another model shape is a `CheckpointMismatchError`, never
  skipped.

  When the saved params hold more than `target_params` under a `policy` key (PPO's policy and critic) and the
  target is not itself such a wrapper, the `policy` subtree alone is read (the critic's arrays are never loaded)."""
  path = _path(directory)
  manager = ocp.CheckpointManager(path, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    broken = []
    for s in steps:
      problem = check_step(path / str(s))
      if problem is None:
        try:
          params = _restore_params_step(manager, path, s, target_params, shardings, directory)
        except CheckpointMismatchError:
          raise
        except Exception as e:  # noqa: BLE001 - any failure to read a step means: not this step
          problem = f"reading it failed: {_first_line(e)}"
      if problem is None:
        for b, why in broken:
          warnings.warn(f"checkpoint step {b} in {directory} is broken ({why}); using step {s} instead",
                        stacklevel=2)
        return params
      broken.append((s, problem))
  finally:
    manager.close()
  raise BrokenCheckpointError(f"no good checkpoint in {directory}: " + "; ".join(
      f"step {s}: {p}" for s, p in broken))


def _restore_params_step(manager, path: epath.Path, step: int, target_params: Any, shardings: Any, directory):
  metadata = _params_metadata(path / str(step))
  saved = _tree_of(metadata)
  wrapped = (isinstance(saved, Mapping) and POLICY in saved and len(saved) > 1
             and not (isinstance(target_params, Mapping) and POLICY in target_params))
  if not wrapped:
    check_shapes(metadata, target_params, f"{directory} (step {step})")
    return manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target_params, shardings)))).params
  check_shapes(saved[POLICY], target_params, f"{directory} (step {step}, its {POLICY!r} params)")
  # a partial restore of the saved tree: the target names the `policy` subtree only
  abstract = {POLICY: _abstract(target_params, shardings)}
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(path / str(step) / "params", args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
  return restored[POLICY]
