"""Hugging Face checkpoint interop for the Qwen2/Qwen2.5 and Llama families.

`import_hf(folder)` reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`) into a
`Transformer`; `export_hf(model, folder)` writes the same layout back, loadable by `transformers`. Only safetensors
are read: pickle-based `pytorch_model.bin` files can run arbitrary code when loaded and are refused.

Each tensor is placed straight onto its `NamedSharding` with `jax.make_array_from_callback`, so on a mesh (and on
several hosts) every device receives only its own shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxstages.checkpoint import CheckpointMismatchError
from jaxstages.model.config import ModelConfig
from jaxstages.model.transformer import Transformer, convert_layers
from jaxstages.sharding import DEFAULT_RULES, LogicalRules, param_shardings

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


class UnsupportedCheckpointError(ValueError):
  """A checkpoint of an architecture or option jaxstages does not implement."""


# -- config ------------------------------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """`ModelConfig` from a HF `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
  `rope_parameters`)."""
  archs = hf.get("architectures") or []
  if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedCheckpointError(
        f"architecture {archs or hf.get('model_type')!r} is not supported; jaxstages imports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  arch = archs[0]
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedCheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("mlp_bias"):
    raise UnsupportedCheckpointError("mlp_bias=True is not supported")
  if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
    raise UnsupportedCheckpointError("Llama attention_bias=True (biases on q, k, v *and* o) is not supported")
  if hf.get("use_sliding_window"):
    raise UnsupportedCheckpointError("use_sliding_window=True is not supported")

  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  if not rope and hf.get("rope_scaling"):
    rope = dict(hf["rope_scaling"])
  kind = rope.get("rope_type", rope.get("type", "default"))
  rope_scaling = None
  if kind != "default":
    rope.setdefault("rope_type", kind)
    rope.pop("type", None)
    rope_scaling = tuple(sorted(rope.items()))
  num_heads = hf["num_attention_heads"]
  values = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      intermediate_size=hf["intermediate_size"], rope_theta=float(theta), rope_scaling=rope_scaling,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048))
  values.update(overrides)
  return ModelConfig(**values)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A HF `config.json` dict: Qwen2 when the model has QKV biases, Llama otherwise."""
  arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
  rope_parameters = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling:
    rope_parameters.update(dict(cfg.rope_scaling))
  hf = {
      "architectures": [arch], "model_type": "qwen2" if cfg.qkv_bias else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
      # both spellings of the RoPE settings, so transformers 4.x and 5.x read the same model
      "rope_theta": cfg.rope_theta, "rope_parameters": rope_parameters,
      "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
      "torch_dtype": dtype, "dtype": dtype,
  }
  if not cfg.qkv_bias:
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
  return hf


# -- tensor name map ---------------------------------------------------------------------------------------------

# (HF name, path of our parameter, HF shape, HF -> ours, ours -> HF)
Entry = tuple[str, tuple, tuple[int, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def tensor_map(cfg: ModelConfig) -> Iterator[Entry]:
  """Every tensor of a HF checkpoint of this shape, with how it maps onto our parameters."""
  e, h, kv, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                       cfg.vocab_size)
  same = lambda x: x
  yield "model.embed_tokens.weight", ("embed",), (v, e), same, same
  for i in range(cfg.num_layers):
    hp, ours = f"model.layers.{i}", ("layers", i)
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      # HF Linear weights are [out, in]; ours are [embed, heads, head_dim]
      yield (f"{hp}.self_attn.{name}_proj.weight", ours + ("attn", name), (heads * d, e),
             lambda x, n=heads: x.T.reshape(e, n, d), lambda x, n=heads: x.reshape(e, n * d).T)
      if cfg.qkv_bias:
        yield (f"{hp}.self_attn.{name}_proj.bias", ours + ("attn", f"{name}_bias"), (heads * d,),
               lambda x, n=heads: x.reshape(n, d), lambda x, n=heads: x.reshape(n * d))
    yield (f"{hp}.self_attn.o_proj.weight", ours + ("attn", "o"), (e, h * d),
           lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(h * d, e).T)
    for name in ("gate", "up"):
      yield f"{hp}.mlp.{name}_proj.weight", ours + ("mlp", name), (m, e), np.transpose, np.transpose
    yield f"{hp}.mlp.down_proj.weight", ours + ("mlp", "down"), (e, m), np.transpose, np.transpose
    yield f"{hp}.input_layernorm.weight", ours + ("attn_norm", "scale"), (e,), same, same
    yield f"{hp}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (e,), same, same
  yield "model.norm.weight", ("final_norm", "scale"), (e,), same, same
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head",), (v, e), np.transpose, np.transpose


def _variable(model: Transformer, path: tuple) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


# -- reading -----------------------------------------------------------------------------------------------------

def _safetensors_files(folder: Path) -> dict[str, Path]:
  """tensor name -> file holding it."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: folder / file for name, file in weight_map.items()}
  single = folder / "model.safetensors"
  if single.exists():
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
    raise UnsupportedCheckpointError(
        f"{folder} holds only pickle-based PyTorch weights (*.bin/*.pt); they can execute code when loaded and are "
        "refused. Convert them to safetensors first, e.g. in Python with transformers: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def read_hf_config(folder: str | Path) -> dict[str, Any]:
  path = Path(folder) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: a HF checkpoint folder needs config.json next to its weights")
  return json.loads(path.read_text())


def import_hf(folder: str | Path, mesh: Mesh | None = None, rules: LogicalRules = DEFAULT_RULES,
              **config_overrides: Any) -> Transformer:
  """Loads a HF Qwen2/Qwen2.5/Llama checkpoint folder into a `Transformer` (sharded over `mesh` when given).

  `config_overrides` change numerics only (e.g. `dtype="bfloat16"`, `param_dtype="bfloat16"`, `remat=True`) or the
  layers' layout (`scan_layers=True`).
  """
  folder = Path(folder)
  cfg = config_from_hf(read_hf_config(folder), **config_overrides)
  if cfg.scan_layers:  # read layer by layer into the list layout, then stack
    return convert_layers(import_hf(folder, mesh, rules, **dict(config_overrides, scan_layers=False)), True, mesh,
                          rules)
  files = _safetensors_files(folder)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  shardings = None
  if mesh is not None:
    shardings = param_shardings(nnx.state(model), mesh, rules)

  expected = list(tensor_map(cfg))
  missing = [name for name, *_ in expected if name not in files]
  if missing:
    raise CheckpointMismatchError(f"{folder}: tensors missing from the checkpoint: {missing[:8]}"
                                  + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  known = {name for name, *_ in expected} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unexpected = [n for n in files if n not in known and not n.endswith("rotary_emb.inv_freq")]
  if unexpected:
    raise CheckpointMismatchError(f"{folder}: tensors the model has no place for: {unexpected[:8]}")

  handles: dict[Path, Any] = {}
  try:
    for name, path, hf_shape, to_ours, _ in expected:
      file = files[name]
      if file not in handles:
        handles[file] = safe_open(file, framework="numpy")
      tensor = handles[file].get_tensor(name)
      if tuple(tensor.shape) != hf_shape:
        raise CheckpointMismatchError(f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)} but the model "
                                      f"(config.json) expects {hf_shape}")
      var = _variable(model, path)
      value = np.asarray(to_ours(tensor)).astype(cfg.weight_dtype)
      if shardings is None:
        var.set_value(jnp.asarray(value))
      else:
        sharding = _lookup(shardings, path).get_value()
        var.set_value(jax.make_array_from_callback(value.shape, sharding, lambda idx, x=value: x[idx]))
  finally:
    handles.clear()
  return model


def _lookup(state: nnx.State, path: tuple) -> nnx.Variable:
  node = state
  for part in path:
    node = node[part]
  return node


# -- writing -----------------------------------------------------------------------------------------------------

def export_hf(model: Transformer, folder: str | Path, dtype: str = "float32",
              max_shard_bytes: int = 4 * 2**30) -> Path:
  """Writes `config.json` and safetensors (sharded with an index past `max_shard_bytes`) that `transformers` loads.

  On several processes every process must call this (gathering is collective); only process 0 writes.
  """
  folder = Path(folder)
  model = convert_layers(model, False)  # HF names each layer's tensors: unstack scanned layers
  cfg = model.cfg
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  tensors: dict[str, np.ndarray] = {}
  for name, path, hf_shape, _, to_hf in tensor_map(cfg):
    value = _variable(model, path).get_value()
    if not value.is_fully_addressable:
      value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
    tensor = np.ascontiguousarray(to_hf(np.asarray(jax.device_get(value), np.float32))).astype(np_dtype)
    assert tensor.shape == hf_shape, (name, tensor.shape, hf_shape)
    tensors[name] = tensor
  if jax.process_index() != 0:
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    if current and size + tensor.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensor
    size += tensor.nbytes
  shards.append(current)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], folder / "model.safetensors", metadata=metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, folder / file, metadata=metadata)
      weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return folder
