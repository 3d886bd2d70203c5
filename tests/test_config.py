"""Config errors a person can act on."""

import pytest

from jaxstages.config import ConfigError, load_config
from jaxstages.model import model_config
from jaxstages.sharding import MeshConfig


def test_unknown_model_key_names_the_key_and_the_nearest_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown key 'num_layer' in model config \(did you mean 'num_layers'"):
    model_config("tiny", num_layer=3)
  with pytest.raises(ConfigError, match=r"'rope_thetta'.*'rope_theta'"):
    model_config({"vocab_size": 10, "rope_thetta": 1.0})


def test_unknown_mesh_key():
  with pytest.raises(ConfigError, match=r"unknown key 'tensr' in mesh config \(did you mean 'tensor'"):
    MeshConfig.from_config({"tensr": 2})


def test_unknown_model_size_suggests_names():
  with pytest.raises(KeyError, match="qwen2.5-0.5b"):
    model_config("qwen2.5-0.5")


def test_bad_values_are_refused():
  with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
    model_config("tiny", num_heads=4, num_kv_heads=3)
  with pytest.raises(ConfigError, match="dtype='fp8'"):
    model_config("tiny", dtype="fp8")
  with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
    model_config("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_config_files_load_by_path_or_by_name():
  assert load_config("configs/models.py:toy").hidden_size == load_config("models.py:toy").hidden_size
  with pytest.raises(ConfigError, match="not found"):
    load_config("configs/nope.py")


def test_command_line_overrides():
  import ml_collections

  from jaxstages.config import apply_overrides

  base = ml_collections.ConfigDict(dict(optim=dict(lr=1e-3, schedule="cosine"), steps=10, model="toy"))
  cfg = apply_overrides(base, ["optim.lr=3e-4", "steps=20", "model=small", "optim.schedule=wsd"])
  assert (cfg.optim.lr, cfg.steps, cfg.model, cfg.optim.schedule) == (3e-4, 20, "small", "wsd")
  assert base.steps == 10  # the original is untouched
  with pytest.raises(ConfigError, match=r"unknown key 'lrr' in config.optim \(did you mean 'lr'"):
    apply_overrides(base, ["optim.lrr=1"])
  with pytest.raises(ConfigError, match="not a Python literal"):
    apply_overrides(base, ["steps=dict(a=1)"])
  with pytest.raises(ConfigError, match="must look like"):
    apply_overrides(base, ["steps"])


def test_every_preset_takes_numerics_overrides_and_keeps_its_hash():
  """`--config.model.dtype` / `model.remat` / the attention and loss options work on every training preset and
  recipe; spelling the model block out in full left the hash (the name of runs made before) of each preset as it was
  when the block held only the size's keys."""
  from jaxstages.config import HASH_NEUTRAL, apply_overrides, config_hash
  from jaxstages.model.config import stage_model_config

  names = ["pretrain-toy", "midtrain-toy", "sft-toy", "dpo-toy", "distill-toy", "grpo-toy", "ppo-toy",
           "pretrain-interplay", "midtrain-interplay", "grpo-interplay", "pretrain-qwen2.5-0.5b",
           "pretrain-qwen2.5-1.5b", "pretrain-qwen2.5-7b"]
  specs = [f"configs/train.py:{n}" for n in names] + ["configs/recipes/rl.py:dapo", "configs/recipes/rl.py:dapo-toy"]
  for spec in specs:
    cfg = apply_overrides(load_config(spec), ["model.dtype=bfloat16", "model.remat=True", "model.attention=einsum",
                                              "model.logits_chunk=256", "model.scan_layers=True",
                                              "optim.mu_dtype=bfloat16"])
    model = stage_model_config(cfg.model, 300)
    assert (model.dtype, model.remat, model.attention, model.logits_chunk) == ("bfloat16", True, "einsum", 256), spec
  # the hash leaves out a model block's spelled-out defaults
  toy = load_config("configs/train.py:pretrain-toy").to_dict()
  lean = dict(toy, model={k: v for k, v in toy["model"].items() if not (k in HASH_NEUTRAL and HASH_NEUTRAL[k] == v)})
  assert config_hash(lean) == config_hash(toy) and len(lean["model"]) < len(toy["model"])
