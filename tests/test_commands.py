"""The command line, run as a user runs it (the `jaxstages` console script and `tools/`, in processes): `smoke`,
`plan`, `data show`, `tools/export_params.py`, a stage started from `init_from=hf:FOLDER`, `eval` of a PPO
checkpoint with a separate critic and `tools/error_profile.py`. Each result is checked against a value read another
way. `smoke` and the PPO evaluation are the slow ones (marked `slow`)."""

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxstages.sharding import make_mesh
from tests.stage_runs import ENV, REPO, SMALL, TOY_TOKENIZER

JAXSTAGES = shutil.which("jaxstages")
TINY = SMALL + ["data.seq_len=128"]


def _run(*args, cwd=REPO) -> str:
  """Runs a command line (`jaxstages ...` or `python tools/...`); returns its stdout, failing with its stderr."""
  assert JAXSTAGES, "the jaxstages console script is not installed (pip install -e .)"
  cmd = [JAXSTAGES, *args[1:]] if args[0] == "jaxstages" else [sys.executable, *args]
  done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f"{' '.join(args)}\n{done.stderr[-3000:]}"
  return done.stdout


def _params(model) -> list[np.ndarray]:
  return [np.asarray(x, np.float32) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
  """A 2-step pre-training stage of the tiny shape, trained by `jaxstages train`."""
  workdir = tmp_path_factory.mktemp("pretrain")
  _run("jaxstages", "train", "--config", "configs/train.py:pretrain-toy", "--workdir", str(workdir),
       *[f"--config.{o}" for o in TINY + ["stage.steps=2", "stage.checkpoint_every=2", "stage.eval_every=0"]])
  return workdir


@pytest.mark.slow  # 113 s on a loaded 2-core CPU: it compiles and trains the toy model, decodes, round-trips HF
def test_smoke_command(tmp_path):
  """`jaxstages smoke`: exit 0, the loss at least halved, cached decoding equal to uncached, HF round trip exact."""
  _run("jaxstages", "smoke", "--steps", "60", "--out", str(tmp_path))
  summary = json.loads((tmp_path / "summary.json").read_text())
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1 and rows[-1]["step"] == 60
  assert summary["final_loss"] == rows[-1]["loss"] < 0.5 * rows[0]["loss"] == 0.5 * summary["first_loss"]
  assert summary["cached_equals_uncached"] and summary["hf_roundtrip_max_abs_diff"] < 1e-5


def test_export_params_command(stage, tmp_path):
  """`tools/export_params.py RUN OUT --dtype bfloat16`: OUT stores the stage's params in bfloat16 (orbax metadata),
  has its tokenizer and `source.json` (config and step), and loads as a model whose params are the stage's rounded
  to bfloat16."""
  from jaxstages.model.io import load_params
  from jaxstages.train import load_model

  out = tmp_path / "export"
  _run("tools/export_params.py", str(stage), str(out), "--dtype", "bfloat16")
  source = json.loads((out / "source.json").read_text())
  assert source["step"] == 2 and source["config"]["stage"]["kind"] == "pretrain"
  assert (out / "tokenizer").is_dir() and (out / "model_config.json").exists()
  with ocp.StandardCheckpointer() as checkpointer:  # stored in bfloat16: half the size
    stored = jax.tree.leaves(checkpointer.metadata(out / "params").item_metadata.tree)
  assert stored and all(m.dtype == jax.numpy.bfloat16 for m in stored), stored[:2]
  exported = load_params(out)  # read back in the model config's float32
  trained = [x.astype(jax.numpy.bfloat16).astype(np.float32) for x in _params(load_model(stage, make_mesh()))]
  for a, b in zip(_params(exported), trained, strict=True):
    np.testing.assert_array_equal(a, b)


def test_init_from_hf_folder_starts_from_its_params(stage, tmp_path):
  """`jaxstages convert export` of the stage's params, then a stage with `init_from=hf:FOLDER` at learning rate 0:
  its checkpoint holds exactly the HF folder's weights (read back with safetensors, not through jaxstages)."""
  from safetensors.numpy import load_file

  from jaxstages.model.io import export_stage
  from jaxstages.train import load_model

  params = export_stage(stage, tmp_path / "params")
  hf = tmp_path / "hf"
  _run("jaxstages", "convert", "export", str(params), str(hf))
  workdir = tmp_path / "from-hf"
  _run("jaxstages", "train", "--config", "configs/train.py:pretrain-toy", "--workdir", str(workdir),
       *[f"--config.{o}" for o in TINY + ["stage.steps=1", "stage.checkpoint_every=1", "stage.eval_every=0",
                                          f"stage.init_from='hf:{hf}'", f"stage.tokenizer='{params / 'tokenizer'}'",
                                          "optim.lr=0.0"]])
  model = load_model(workdir, make_mesh())
  weights = load_file(str(hf / "model.safetensors"))
  np.testing.assert_array_equal(np.asarray(model.embed[...]), weights["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(model.final_norm.scale[...]), weights["model.norm.weight"])
  for a, b in zip(_params(model), _params(load_model(stage, make_mesh())), strict=True):  # lr 0: the start itself
    np.testing.assert_array_equal(a, b)
  assert json.loads((workdir / "summary.json").read_text())["step"] == 1


def test_error_profile_counts_the_samples_jaxstages_eval_draws(tmp_path):
  """`tools/error_profile.py` on the committed base draws `jaxstages eval`'s own samples (same problems and seeds):
  its share of strictly right samples per op is eval's pass@1 exactly, and its shares of steps written add up to 1."""
  base = "experiments/artifacts/base-cpu"
  _run("jaxstages", "eval", base, "--ops", "1,5", "--problems", "16", "--n", "4", "--out", str(tmp_path / "eval"))
  _run("tools/error_profile.py", f"base={base}", "--ops", "1,5", "--problems", "16", "--n", "4", "--out",
       str(tmp_path / "profile.md"))
  cells = {c["op"]: c for c in json.loads((tmp_path / "eval" / "eval.json").read_text())["cells"]}
  rows = [line.split("|")[1:-1] for line in (tmp_path / "profile.md").read_text().splitlines()[2:]]
  assert [int(r[1]) for r in rows] == [1, 5]
  for row in rows:
    assert float(row[2]) == round(100 * cells[int(row[1])]["pass@1"], 1)
    steps = [float(s.split(":")[1]) for s in row[-1].split(",")]
    assert sum(steps) == pytest.approx(100, abs=0.1 * len(steps))


def test_plan_command(tmp_path):
  """`jaxstages plan` with overrides prints the overridden stage: its steps, tokens per step (batch x seq_len),
  parameters and FLOPs per step of the overridden model (the FLOP formula is checked against XLA in test_flops)."""
  from jaxstages.config import apply_overrides, load_config
  from jaxstages.data.tokenizer import load_tokenizer
  from jaxstages.flops import train_flops_per_token
  from jaxstages.model import param_count
  from jaxstages.model.config import stage_model_config
  out = _run("jaxstages", "plan", "--config", "configs/train.py:pretrain-toy",
             *[f"--config.{o}" for o in TINY + ["stage.steps=37"]])
  config = apply_overrides(load_config("configs/train.py:pretrain-toy"), TINY + ["stage.steps=37"])
  # the model at the vocabulary of the tokenizer TINY gives the stage (the one it would train: test_tokenizer)
  model = stage_model_config(config.model.to_dict(), load_tokenizer(TOY_TOKENIZER).vocab_size)
  plan = {"params": param_count(model), "flops_per_step": train_flops_per_token(model, 128) * 8 * 128}
  numbers = lambda label: re.search(rf"{label}\s+([\d,.e+]+)", out).group(1).replace(",", "")
  assert int(numbers("parameters")) == plan["params"]
  assert re.search(r"tokens per step\s+1,024\s+x 37 steps", out), out
  assert float(numbers("FLOPs per step")) == pytest.approx(plan["flops_per_step"], rel=1e-3)
  assert float(numbers("total FLOPs")) == pytest.approx(37 * plan["flops_per_step"], rel=1e-3)


def test_data_show_command():
  """`jaxstages data show` of the SFT pipeline: the header names the config, and in every printed conversation the
  tokens in the loss (outside `[[...]]`) are exactly the assistant turns and their `<|im_end|>`."""
  out = _run("jaxstages", "data", "show", "--config", "configs/data.py:sft-symbolic", "--n", "2", "--color", "never")
  assert out.startswith("configs/data.py:sft-symbolic: kind sft, batch 16, seq_len 512")
  assert "=== example 1 ===" in out and "=== example 2 ===" not in out
  segments = re.split(r"--- segment \d+: .* ---\n", out)[1:]
  assert len(segments) >= 4
  for text in segments:
    text = re.split(r"=== example|--- padding", text)[0].rstrip("\n")
    trained = "".join(re.split(r"\[\[.*?\]\]", text, flags=re.S))
    turns = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text.replace("[[", "").replace("]]", ""),
                       flags=re.S)
    assert turns and trained.strip() == "".join(turns).strip(), text


@pytest.mark.slow  # 53 s on a loaded 2-core CPU: a PPO step (sampling, critic) and two evaluations compile
def test_eval_command_on_a_ppo_checkpoint_with_a_separate_critic(tmp_path):
  """One PPO step (separate critic, a large learning rate so the two trunks part), then `jaxstages eval`: it loads
  the policy, not the critic's trunk: its params are the checkpoint's `policy` subtree (read with orbax alone),
  which differs from `critic_trunk`, and its table equals an evaluation of those params in this process."""
  from jaxstages.data.tokenizer import load_tokenizer
  from jaxstages.evaluation import EvalConfig, evaluate
  from jaxstages.model import create_model
  from jaxstages.train import load_model, model_config_of

  workdir = tmp_path / "ppo"
  _run("jaxstages", "train", "--config", "configs/train.py:ppo-toy", "--workdir", str(workdir),
       *[f"--config.{o}" for o in ["stage.steps=1", "stage.checkpoint_every=1", "stage.eval_every=0",
                                   "data.batch_size=8", "ppo.rollout.group_size=2", "ppo.rollout.max_new_tokens=16",
                                   "ppo.eval_problems=0", "ppo.ppo.critic='separate'", "optim.lr=0.01"]])
  _run("jaxstages", "eval", str(workdir), "--ops", "1", "--contexts", "p", "--problems", "16", "--prompt", "chat")
  table = json.loads((workdir / "eval" / "eval.json").read_text())["cells"]

  raw = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "1" / "params")
  flat = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  loaded = load_model(workdir, make_mesh())
  policy = flat(raw["policy"])
  assert len(policy) == len(_params(loaded))
  for a, b in zip(_params(loaded), policy, strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(policy, flat(raw["critic_trunk"])))

  model = create_model(model_config_of(workdir), 0)
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), [np.asarray(x) for x in policy]))
  cfg = EvalConfig(ops=(1,), contexts=("p",), problems=16, prompt="chat")
  from jaxstages.data.pipeline import data_config
  task = data_config(json.loads((workdir / "config.json").read_text())["data"]).task
  expected = evaluate(model, load_tokenizer(workdir / "tokenizer"), task, cfg, show_progress=False)["cells"]
  assert [c["pass@1"] for c in table] == [c["pass@1"] for c in expected]
