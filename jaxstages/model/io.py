"""Params-only checkpoints: an orbax checkpoint of the parameters plus `model_config.json` beside it.

This is what `tools/convert_hf.py` writes and reads, and what a stage can start from. (Full train states with
optimizer and data-iterator state are the checkpoint manager's.) Orbax restores each array straight into its target
sharding, so loading onto a mesh or onto several hosts never gathers a whole tensor on one device.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxstages.model.config import model_config
from jaxstages.model.hf import CheckpointMismatchError
from jaxstages.model.transformer import Transformer
from jaxstages.sharding import DEFAULT_RULES, LogicalRules, param_shardings


def save_params(model: Transformer, folder: str | Path) -> Path:
  """Writes `folder/params` (orbax) and `folder/model_config.json`. Collective on several processes."""
  folder = Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder / "params", nnx.state(model).to_pure_dict(), force=True)
  if jax.process_index() == 0:
    (folder / "model_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
  return folder


def load_params(folder: str | Path, mesh: Mesh | None = None, rules: LogicalRules = DEFAULT_RULES,
                **config_overrides) -> Transformer:
  """Reads what `save_params` wrote; `config_overrides` may change numerics (dtype, remat), not shapes."""
  folder = Path(folder).absolute()
  cfg_path = folder / "model_config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: not a jaxstages params folder")
  cfg = model_config(json.loads(cfg_path.read_text()), **config_overrides)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda v: v.replace(device), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = param_shardings(abstract, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract.to_pure_dict(), shardings.to_pure_dict())
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(folder / "params")
    check_shapes(metadata, target, folder)
    restored = checkpointer.restore(folder / "params", target)
  abstract.replace_by_pure_dict(restored)
  return nnx.merge(graphdef, abstract)


def check_shapes(metadata, target, folder: Path | str) -> None:
  """Names the tensor and both shapes when a checkpoint does not fit the model."""
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  saved = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  wanted = dict(jax.tree_util.tree_flatten_with_path(target)[0])
  # params saved from an nnx.State carry each Variable's `value` as a last key; pure-dict targets do not
  key = lambda p: str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
  name = lambda path: ".".join(k for k in map(key, path) if k not in ("", "value"))
  saved_names = {name(p): v for p, v in saved.items()}
  for path, want in wanted.items():
    have = saved_names.get(name(path))
    if have is None:
      raise CheckpointMismatchError(f"{folder}: tensor {name(path)!r} is missing from the checkpoint")
    if tuple(have.shape) != tuple(want.shape):
      raise CheckpointMismatchError(f"{folder}: tensor {name(path)!r} has shape {tuple(have.shape)} in the "
                                    f"checkpoint but the model expects {tuple(want.shape)}")


def export_stage(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str | None = None) -> Path:
  """A stage's checkpoint (latest, or `step`) as a self-contained params folder: `params/` + `model_config.json`
  (`save_params`), the stage's `tokenizer/`, and `source.json` with the stage's config, its hash
  (`jaxstages.config.config_hash`), the step and the stage's summary, so whoever uses the folder can re-make it."""
  import shutil

  import jax.numpy as jnp

  from jaxstages.config import config_hash
  from jaxstages.evaluation import load_stage

  run, out = Path(run_dir), Path(out_dir)
  model, tokenizer, config = load_stage(run, step)
  if dtype:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), state))
  if out.exists():
    shutil.rmtree(out)
  save_params(model, out)
  tokenizer.save(out / "tokenizer")
  summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
  (out / "source.json").write_text(json.dumps(
      {"run": run.name, "step": step or (summary or {}).get("step"), "config_hash": config_hash(config),
       "param_dtype": dtype or "as trained", "summary": summary, "config": config}, indent=2))
  return out
