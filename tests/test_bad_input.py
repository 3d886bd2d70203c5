"""Bad inputs fail early with a message a person can act on: it names the key, file, line, tensor or sizes at
fault. Everything here fails while a stage is being built (or on its first batch), so no test trains."""

from pathlib import Path

import pytest

from jaxstages.config import ConfigError, apply_overrides, load_config
from jaxstages.data.pipeline import data_config, make_pipeline
from jaxstages.data.tokenizer import load_tokenizer
from jaxstages.metrics import read_metrics
from jaxstages.model import model_config
from jaxstages.model.hf import CheckpointMismatchError
from jaxstages.schedule import stage_configs
from jaxstages.train import StageConfig, build_stage, run_stage

ARTIFACTS = Path(__file__).resolve().parents[1] / "experiments" / "artifacts"
TOKENIZER = ARTIFACTS / "toy-base" / "tokenizer"  # 748 tokens; a saved one spares training one per test
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=128", "model.max_position_embeddings=512", "data.batch_size=8", "data.seq_len=64",
        "stage.steps=2", "stage.eval_batches=1", f"stage.tokenizer={str(TOKENIZER)!r}"]


def tiny_config(*overrides: str, name: str = "pretrain-toy") -> dict:
  """A training config loaded as `jaxstages train --config configs/train.py:NAME --config.KEY=VALUE` loads it."""
  return apply_overrides(load_config(f"configs/train.py:{name}"), TINY + list(overrides)).to_dict()


# 1. unknown or mistyped keys


def test_mistyped_key_names_it_and_the_nearest_valid_keys(tmp_path):
  from jaxstages.cli import main

  with pytest.raises(ConfigError, match=r"unknown key 'lrr' in config\.optim \(did you mean 'lr'"):
    main(["train", "--config", "configs/train.py:pretrain-toy", "--workdir", str(tmp_path), "--config.optim.lrr=1"])
  config = tiny_config()
  config["stage"]["stepss"] = 3
  with pytest.raises(ConfigError, match=r"unknown key 'stepss' in stage config \(did you mean 'steps'"):
    build_stage(config, tmp_path)
  pipeline = dict(name="p", stages=[dict(name="pre", config="train.py:pretrain-toy", steps=1,
                                         overrides={"data.seq_lenn": 64})])
  with pytest.raises(ConfigError, match=r"unknown key 'seq_lenn' in config\.data \(did you mean 'seq_len'"):
    stage_configs(pipeline, tmp_path)
  pipeline["stages"][0]["step"] = 1
  with pytest.raises(ConfigError, match=r"unknown key 'step' in pipeline stage 'pre' \(did you mean 'steps'"):
    stage_configs(pipeline, tmp_path)


# 2. values of the wrong type


def test_value_of_the_wrong_type_names_the_key_the_expected_type_and_the_value(tmp_path):
  with pytest.raises(ConfigError, match=r"stage\.steps='ten'.*type int"):
    tiny_config("stage.steps=ten")  # a bare word on the command line
  with pytest.raises(ConfigError, match=r"steps='ten' in stage config: expected int, got str"):
    build_stage(tiny_config("stage.steps='ten'"), tmp_path)  # a quoted string gets past the command line
  with pytest.raises(ConfigError, match=r"lr='fast' in optimizer config: expected float, got str"):
    build_stage(tiny_config("optim.lr='fast'"), tmp_path)
  with pytest.raises(ConfigError, match=r"seq_len=64\.5 in data config: expected int, got float"):
    build_stage(tiny_config("data.seq_len=64.5"), tmp_path)
  with pytest.raises(ConfigError, match=r"hidden_size='64' in model config: expected int, got str"):
    model_config("tiny", hidden_size="64")
  with pytest.raises(ConfigError, match=r"async_checkpoints='no' in stage config: expected bool, got str"):
    StageConfig.from_config({"async_checkpoints": "no"})
  with pytest.raises(ConfigError, match=r"init_from=3 in stage config: expected str or None, got int"):
    StageConfig.from_config({"init_from": 3})
  with pytest.raises(ConfigError, match=r"steps=True in stage config: expected int, got bool"):
    StageConfig.from_config({"steps": True})
  assert model_config("tiny", rope_theta=10_000).rope_theta == 10_000  # an int where a float belongs is fine


# 3. a global batch the data-parallel shards do not divide


def test_batch_size_not_divisible_by_data_parallel_size_names_both(tmp_path, devices):
  with pytest.raises(ConfigError, match=r"batch size 12 is not divisible by the 8 data-parallel shards"):
    build_stage(tiny_config("data.batch_size=12"), tmp_path, devices)
  with pytest.raises(ConfigError, match=r"batch size 6 is not divisible by the 4 data-parallel shards"):
    build_stage(tiny_config("data.batch_size=6", "mesh.data=4", "mesh.tensor=2"), tmp_path, devices)


# 4. sequences longer than the model's positions


def test_sequence_beyond_max_position_embeddings_names_both(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.seq_len=1024 tokens exceed the model's max_position_embeddings=512"):
    build_stage(tiny_config("data.seq_len=1024"), tmp_path)


def test_rl_prompt_and_completion_beyond_max_position_embeddings_names_all_three(tmp_path):
  # the committed toy SFT model has 1024 positions
  config = apply_overrides(load_config("configs/train.py:grpo-toy"), ["grpo.rollout.max_new_tokens=1000"]).to_dict()
  with pytest.raises(ConfigError, match=r"data\.prompt_len=48 \+ grpo\.rollout\.max_new_tokens=1000 = 1048 tokens "
                                        r"exceed the model's max_position_embeddings=1024"):
    build_stage(config, tmp_path)


# 5. a file with a malformed line: the data pipeline generates its data and reads no files; metrics.jsonl is the one
# line-by-line file the project reads back


def test_malformed_line_names_the_file_and_the_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.9\n{"step": 3, "loss": 1.8}\n')
  with pytest.raises(ValueError, match=rf"{path}, line 3: not a JSON object"):
    read_metrics(path)


# 6. data that yields nothing


def test_data_that_packs_nothing_fails_instead_of_hanging():
  cfg = data_config("sft-symbolic", seq_len=8, batch_size=2, overflow="drop")  # every chat is longer than 8
  with pytest.raises(ConfigError, match=r"longer than seq_len=8 with overflow='drop'; raise data\.seq_len"):
    next(make_pipeline(cfg, load_tokenizer(TOKENIZER), 0, 1))


def test_finite_data_that_runs_out_fails_with_a_clear_error(tmp_path, devices):
  # one pre-training document fills no row of 8 x 64 tokens, so the set yields no batch at all
  with pytest.raises(ConfigError, match=r"stage 'pretrain': the pretrain data pipeline \(train split\) has no more "
                                        r"batches of 8 rows; examples per source \{'main': 1\}, data\.epochs=1"):
    run_stage(tiny_config("data.num_examples=1", "data.epochs=1"), tmp_path, devices[:1])


# 7. a checkpoint of another model shape


def test_init_from_params_of_another_width_names_the_tensor_and_both_shapes(tmp_path):
  # toy-base is 128 wide; the stage's model 64
  config = tiny_config(f"stage.init_from={str(ARTIFACTS / 'toy-base')!r}")
  with pytest.raises(CheckpointMismatchError, match=r"toy-base: tensor '[\w.]+' has shape \((\d+, )*128(, \d+)*\) "
                                                    r"in the checkpoint but the model expects \((\d+, )*64(, \d+)*\)"):
    build_stage(config, tmp_path)


# 8. a tokenizer the model's embedding cannot hold


def test_tokenizer_larger_than_the_model_vocabulary_names_both_sizes(tmp_path):
  with pytest.raises(ConfigError, match=r"model vocab_size 128 is smaller than the tokenizer's vocabulary of 748"):
    build_stage(tiny_config("model.vocab_size=128"), tmp_path)
