"""Loading and saving models: params folders, and any model folder a stage can start from.

A **params folder** is an orbax checkpoint of the parameters plus `model_config.json` beside it (`save_params`,
`load_params`): what `tools/convert_hf.py` writes and reads, and what `export_stage` makes of a stage's checkpoint.
(Full train states with optimizer and data-iterator state are the checkpoint manager's, `jaxstages.checkpoint`.)
`load_model` reads any source a stage may start from or freeze: a stage folder (its latest or a given checkpoint
step), a params folder, or `hf:FOLDER`. Orbax restores each array straight into its target sharding, so loading
onto a mesh or onto several hosts never gathers a whole tensor on one device.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from etils import epath

from jaxstages.checkpoint import BrokenCheckpointError, check_shapes, check_step, restore_params, write_manifest
from jaxstages.config import config_hash
from jaxstages.data.tokenizer import load_tokenizer
from jaxstages.model.config import ModelConfig, model_config, stage_model_config
from jaxstages.model.hf import config_from_hf, import_hf
from jaxstages.model.transformer import Transformer, convert_layers, create_model
from jaxstages.sharding import DEFAULT_RULES, LogicalRules, make_mesh, param_shardings


def save_params(model: Transformer, folder: str | Path) -> Path:
  """Writes `folder/params` (orbax) and `folder/model_config.json`. Collective on several processes."""
  folder = Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder / "params", nnx.state(model).to_pure_dict(), force=True)
  if jax.process_index() == 0:
    (folder / "model_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    write_manifest(epath.Path(folder))
  return folder


def load_params(folder: str | Path, mesh: Mesh | None = None, rules: LogicalRules = DEFAULT_RULES,
                **config_overrides) -> Transformer:
  """Reads what `save_params` wrote; `config_overrides` may change numerics (dtype, remat) and the layers' layout
  (`scan_layers`: converted after reading), not shapes."""
  folder = Path(folder).absolute()
  cfg_path = folder / "model_config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: not a jaxstages params folder")
  if problem := check_step(epath.Path(folder)):  # the manifest `save_params` wrote: sizes and CRC-32 of each file
    raise BrokenCheckpointError(f"params folder {folder} is damaged: {problem}")
  cfg = model_config(json.loads(cfg_path.read_text()), **config_overrides)
  saved_layout = bool(json.loads(cfg_path.read_text()).get("scan_layers", False))
  if cfg.scan_layers != saved_layout:  # read in the layout it was saved in, then convert
    model = load_params(folder, mesh, rules, **dict(config_overrides, scan_layers=saved_layout))
    return convert_layers(model, cfg.scan_layers, mesh, rules)
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
    try:
      restored = checkpointer.restore(folder / "params", target)
    except Exception as e:  # noqa: BLE001 - a folder without a manifest (older) that fails to read
      first = (str(e).splitlines() or [""])[0][:300]
      raise BrokenCheckpointError(f"params folder {folder} cannot be read: {type(e).__name__}: {first}") from e
  abstract.replace_by_pure_dict(restored)
  return nnx.merge(graphdef, abstract)


def model_config_of(source: str | Path) -> ModelConfig:
  """The model shape of a `load_model` source, read from its config files (no weights are loaded)."""
  source = str(source)
  if source.startswith("hf:"):
    return config_from_hf(json.loads((Path(source[3:]) / "config.json").read_text()))
  path = Path(source)
  if (path / "model_config.json").exists():
    return model_config(json.loads((path / "model_config.json").read_text()))
  stage_dir = path.parent if path.name == "checkpoints" else path
  if not (stage_dir / "config.json").exists():
    raise FileNotFoundError(f"{source}: neither a stage folder (with config.json), a params folder (with "
                            "model_config.json) nor hf:FOLDER")
  config = json.loads((stage_dir / "config.json").read_text())
  return stage_model_config(config["model"], load_tokenizer(stage_dir / "tokenizer").vocab_size)


def load_model(source: str | Path, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
               model_cfg: ModelConfig | None = None, step: int | None = None) -> Transformer:
  """A model from `source`: a stage folder (its `config.json`, `tokenizer/` and `checkpoints/`; latest step unless
  `step`), its `checkpoints/` folder, a params folder (`model_config.json`), or `hf:FOLDER`. A stage or params
  folder's model config is its own unless `model_cfg` is given (then a checkpoint that does not fit names the
  tensor and both shapes); a stage folder's checkpoint loads into either layer layout (`scan_layers`), converted
  after reading. A stage that trained more than the policy (PPO's critic) keeps the policy as its own
  subtree of the checkpoint (`jaxstages.checkpoint.POLICY`): that subtree is what is loaded."""
  source = str(source)
  if source.startswith("hf:"):
    return import_hf(source[3:], mesh=mesh, rules=rules)
  path = Path(source)
  if (path / "model_config.json").exists():
    return load_params(path, mesh=mesh, rules=rules, **(dataclasses.asdict(model_cfg) if model_cfg else {}))
  stage_dir = path.parent if path.name == "checkpoints" else path
  checkpoints = stage_dir / "checkpoints"
  if not checkpoints.exists():
    raise FileNotFoundError(f"{source}: neither a stage folder (with checkpoints/), a params folder (with "
                            "model_config.json) nor hf:FOLDER")
  saved_cfg = model_config_of(stage_dir) if model_cfg is None or (stage_dir / "config.json").exists() else None
  model_cfg = model_cfg or saved_cfg
  # read in the layout the stage trained in (scanned layers or a list; without the stage's config, the one asked
  # for), then convert to the one asked for
  read_cfg = model_cfg.replace(scan_layers=(saved_cfg or model_cfg).scan_layers)
  graphdef, target = nnx.split(nnx.eval_shape(lambda: create_model(read_cfg, 0)))
  params = restore_params(checkpoints, target, param_shardings(target, mesh, rules), step=step)
  return convert_layers(nnx.merge(graphdef, params), model_cfg.scan_layers, mesh, rules)


@dataclasses.dataclass
class OpenedModel:
  """A model opened from any folder (`open_model`): the model, its tokenizer, the training config that made it
  (None for `hf:`) and that config's stage kind (`pretrain`, `sft`, ...; what tells chat from document prompts)."""

  model: Transformer
  tokenizer: Any
  config: dict | None
  kind: str | None


def training_config_of(source: str | Path) -> dict | None:
  """The training config that made a model folder: a stage folder's `config.json`, a params folder's
  `source.json` (`export_stage`); None for `hf:` or a params folder that does not record one."""
  source = str(source)
  if source.startswith("hf:"):
    return None
  path = Path(source)
  path = path.parent if path.name == "checkpoints" else path
  for name, key in (("config.json", None), ("source.json", "config")):
    if (path / name).exists():
      config = json.loads((path / name).read_text())
      return config.get(key) if key else config
  return None


def open_model(source: str | Path, step: int | None = None, mesh: Mesh | None = None,
               rules: LogicalRules = DEFAULT_RULES) -> OpenedModel:
  """Any model folder `load_model` reads (a stage folder: its latest good or `step` checkpoint; a params folder, such
  as the committed `experiments/artifacts/*`; `hf:FOLDER`) with its tokenizer and the config that trained it, placed
  on `mesh` (default: every device, data-parallel). Every read is checked against the folder's manifests."""
  source = str(source)
  base = Path(source[3:] if source.startswith("hf:") else source)
  base = base.parent if base.name == "checkpoints" else base
  model = load_model(source, mesh or make_mesh(), rules, step=step)
  tok_dir = base if source.startswith("hf:") else base / "tokenizer"
  if not tok_dir.exists():
    raise FileNotFoundError(f"{source}: no tokenizer at {tok_dir}")
  config = training_config_of(source)
  kind = (config or {}).get("stage", {}).get("kind")
  return OpenedModel(model, load_tokenizer(tok_dir), config, kind)


def load_stage(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None):
  """(model, tokenizer, config) of any model folder (`open_model`): a stage's workdir, a params folder, `hf:`."""
  opened = open_model(run_dir, step, mesh)
  return opened.model, opened.tokenizer, opened.config


def export_stage(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str | None = None) -> Path:
  """A stage's checkpoint (latest, or `step`) as a self-contained params folder: `params/` + `model_config.json`
  (`save_params`), the stage's `tokenizer/`, and `source.json` with the stage's config, its hash
  (`jaxstages.config.config_hash`), the step and the stage's summary, so whoever uses the folder can re-make it."""
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
  write_manifest(epath.Path(out.absolute()))  # now over the tokenizer and source.json too
  return out
