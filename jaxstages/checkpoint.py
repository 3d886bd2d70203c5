"""Checkpoints of a stage: orbax `CheckpointManager` over params, optimizer state, step/rng and the data iterator.

Each checkpoint step holds four items: `params`, `opt_state`, `meta` (step, rng) and `data` (the data iterator's
JSON state), so a later stage can restore `params` alone (the stage hand-off) while a resumed stage restores all four.
Arrays are restored straight into the shardings of the target state, so a checkpoint written on one mesh loads on
another. Paths go through `etils.epath` as orbax's do: local folders and cloud URLs (`gs://...`) alike.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxstages.state import TrainState


def _path(directory: str | epath.Path) -> epath.Path:
  """Cloud URLs as given; local paths made absolute (orbax requires it)."""
  return epath.Path(directory) if "://" in str(directory) else epath.Path(directory).absolute()


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`, and always saves when forced."""

  def __init__(self, directory: str | epath.Path, save_every: int = 100, keep: int | None = 2,
               async_save: bool = True):
    self.directory = _path(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "opt_state", "meta", "data"))

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
        data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, target: TrainState, shardings: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """The train state at `step` (default: latest) placed in `shardings`, and the data iterator state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target.params, shardings.params)),
        opt_state=ocp.args.StandardRestore(_abstract(target.opt_state, shardings.opt_state)),
        meta=ocp.args.StandardRestore(_abstract({"step": target.step, "rng": target.rng},
                                                {"step": shardings.step, "rng": shardings.rng})),
        data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    meta = restored.meta
    return TrainState(restored.params, restored.opt_state, meta["step"], meta["rng"]), dict(restored.data or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_params(directory: str | epath.Path, target_params: Any, shardings: Any, step: int | None = None):
  """Only the parameters of another run's or stage's checkpoint (latest step by default): the stage hand-off."""
  manager = ocp.CheckpointManager(_path(directory), item_names=("params", "opt_state", "meta", "data"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(target_params, shardings))))
  manager.close()
  return restored.params
