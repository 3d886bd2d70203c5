"""Nothing lost, nothing silently wrong: every model folder opens one way with its checksums checked (eval, sample,
init_from), run folders keep describing what they hold (a changed model refused before anything is written, a failed
start undone, one writer at a time, pipeline stages recorded by config hash, stage names kept inside the folder),
values checked at the boundary, and progress printed where no terminal is. Each test runs the command a user runs
(`jaxstages ...` in a process) where the README speaks of it."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxstages.config import ConfigError
from jaxstages.runfolder import LOCK, RunFolderError, locked
from jaxstages.schedule import run_pipeline, stage_configs
from tests.stage_runs import ENV, REPO, SMALL

ARTIFACTS = REPO / "experiments" / "artifacts"
TINY = SMALL + ["data.seq_len=128", "stage.log_every=2", "stage.checkpoint_every=2", "stage.eval_every=0",
                f"stage.tokenizer={str(ARTIFACTS / 'toy-base' / 'tokenizer')!r}"]


def jaxstages(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
  """`jaxstages ARGS` as a user runs it (stdout and stderr to pipes, not a terminal)."""
  done = subprocess.run([sys.executable, "-m", "jaxstages.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)
  if ok:
    assert done.returncode == 0, done.stderr[-3000:]
  return done


def train(workdir, *overrides: str, ok: bool = True, config: str = "pretrain-toy") -> subprocess.CompletedProcess:
  return jaxstages("train", "--config", f"configs/train.py:{config}", "--workdir", str(workdir),
                   *[f"--config.{o}" for o in TINY + list(overrides)], ok=ok)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
  """The failed command's error: exit 1, one line (no traceback) on stderr naming each of `words`."""
  assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
  errors = [line for line in done.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  for word in words:
    assert word in errors[0], errors[0]
  return errors[0]


def flip_bytes(path: Path) -> None:
  """Flips bytes in the middle of a file, keeping its size: only a checksum notices."""
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def largest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
  """A 4-step pre-training stage of the tiny shape with checkpoints at steps 2 and 4, trained by `jaxstages train`
  with its output going to pipes (as under nohup or SLURM): (workdir, the run's stderr)."""
  workdir = tmp_path_factory.mktemp("stage") / "pre"
  done = train(workdir, "stage.steps=4")
  return workdir, done.stderr


def copy_of(stage_dir: Path, tmp_path: Path) -> Path:
  out = tmp_path / stage_dir.name
  shutil.copytree(stage_dir, out)
  return out


# 1. one way to open any model folder, checked


def test_eval_of_a_committed_artifact_picks_chat_prompts_from_its_stage_kind(tmp_path):
  """`jaxstages eval experiments/artifacts/toy-sft`: a params folder (no config.json) evaluates, with the chat prompts
  its stage kind (sft) calls for; the toy SFT model gets some op-1 problems right that way."""
  jaxstages("eval", str(ARTIFACTS / "toy-sft"), "--ops", "1", "--contexts", "p", "--problems", "16", "--out",
            str(tmp_path))
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["config"]["prompt"] == "chat"
  assert result["cells"][0]["pass@1"] > 0, result["cells"]


def test_corrupted_params_folder_is_refused_by_eval_sample_and_init_from(tmp_path):
  """Flipped bytes in a params folder's tensor file (same size): `eval`, `sample` and a stage's `init_from` each
  refuse it in one line naming the file, instead of loading damaged weights (exit 0, wrong numbers)."""
  folder = copy_of(ARTIFACTS / "toy-sft", tmp_path)
  damaged = largest_file(folder / "params")
  flip_bytes(damaged)
  for done in (jaxstages("eval", str(folder), "--ops", "1", "--problems", "2", "--out", str(tmp_path / "e"), ok=False),
               jaxstages("sample", "--checkpoint", str(folder), "--max-new-tokens", "4", ok=False),
               train(tmp_path / "sft", "stage.steps=1", f"stage.init_from={str(folder)!r}", ok=False,
                     config="sft-toy")):
    one_line_error(done, "damaged", damaged.name)
  assert not (tmp_path / "sft").exists()  # the refused start left nothing behind


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_and_none_left_is_refused(stage, tmp_path):
  """Flipped bytes in the newest checkpoint (step 4): `eval` uses step 2 and says so; with step 2 damaged too, it
  refuses in one line. The stage folder is only read: nothing is moved."""
  workdir = copy_of(stage[0], tmp_path)
  flip_bytes(largest_file(workdir / "checkpoints" / "4"))
  args = ("eval", str(workdir), "--ops", "1", "--contexts", "p", "--problems", "2", "--out", str(tmp_path / "e"))
  done = jaxstages(*args)
  assert "checkpoint step 4" in done.stderr and "using step 2 instead" in done.stderr, done.stderr[-2000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  flip_bytes(largest_file(workdir / "checkpoints" / "2"))
  one_line_error(jaxstages(*args, ok=False), "no good checkpoint", "step 4", "step 2")


# 2. run folders that stay true


def test_rerun_with_another_model_shape_is_refused_and_leaves_the_folder_untouched(stage, tmp_path):
  """The same workdir, a changed model shape: refused in one line naming the tensor and both shapes; config.json,
  the checkpoints and everything else byte for byte as they were (no step taken for broken and moved aside)."""
  workdir = copy_of(stage[0], tmp_path)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  done = train(workdir, "stage.steps=6", "model.hidden_size=32", ok=False)
  one_line_error(done, "embed", "(768, 64)", "(768, 32)", "another workdir")
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  assert not (tmp_path / "broken_checkpoints").exists()


def test_a_failed_start_leaves_the_folder_as_it_was(tmp_path):
  """A config that fails once the tokenizer is chosen (sequences longer than the model's positions): a new workdir
  is not left behind with a stale tokenizer/ (which a fixed re-run would train with and `eval` decode with); an
  existing one keeps exactly what it held."""
  bad = ("stage.steps=1", "data.seq_len=1024", "model.max_position_embeddings=512")
  one_line_error(train(tmp_path / "new", *bad, ok=False), "max_position_embeddings")
  assert not (tmp_path / "new").exists()
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("mine")
  one_line_error(train(tmp_path / "old", *bad, ok=False), "max_position_embeddings")
  assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["notes.txt"]


def test_a_fresh_start_replaces_a_stale_tokenizer_it_finds_in_the_workdir(tmp_path):
  """A workdir with a `tokenizer/` but no checkpoint (left by a start that failed before starts were undone): a fresh
  start trains with the tokenizer its config calls for and replaces the stale one, so `eval` decodes with the one
  the model was trained with."""
  from jaxstages.config import apply_overrides, load_config
  from jaxstages.data.pipeline import data_config
  from jaxstages.data.tokenizer import load_tokenizer, task_tokenizer

  task = data_config(apply_overrides(load_config("configs/train.py:pretrain-toy"), []).data).task
  task_tokenizer(task, vocab_size=730, n_samples=300).save(tmp_path / "pre" / "tokenizer")
  train(tmp_path / "pre", "stage.steps=1", "stage.checkpoint_every=1", "stage.tokenizer=None")
  assert load_tokenizer(tmp_path / "pre" / "tokenizer").vocab_size == task_tokenizer(task).vocab_size != 730


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
  """While a process holds the workdir's lock, `jaxstages train` there is refused naming its pid and host; a lock
  left by a process that is gone (same host) is taken over with a warning and released at the end."""
  workdir = tmp_path / "pre"
  with locked(workdir):
    held = json.loads(os.readlink(workdir / LOCK))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    one_line_error(train(workdir, "stage.steps=1", ok=False), f"pid {os.getpid()}", socket.gethostname())
  assert not workdir.exists()  # the lock made the folder and took it back
  gone = subprocess.Popen(["true"])
  gone.wait()
  workdir.mkdir()
  os.symlink(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "earlier"}), workdir / LOCK)
  done = train(workdir, "stage.steps=1", "stage.checkpoint_every=1")
  assert f"pid {gone.pid}" in done.stderr and "taking it over" in done.stderr, done.stderr[-2000:]
  assert (workdir / "summary.json").exists() and not os.path.lexists(workdir / LOCK)


def test_stage_names_are_path_components(tmp_path):
  """A pipeline stage named `../x` (outside the run folder), `tokenizer` (the shared tokenizer) or `a/b` is refused
  naming it."""
  for name in ("../x", "tokenizer", "a/b", ".hidden", ""):
    pipeline = dict(name="p", stages=[dict(name=name, config="train.py:pretrain-toy", steps=1)])
    with pytest.raises((RunFolderError, ConfigError), match="name"):
      stage_configs(pipeline, tmp_path)


def _pipeline(eval_problems: int, hidden: int = 64) -> dict:
  overrides = {"model.hidden_size": hidden, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
               "model.intermediate_size": 128, "data.batch_size": 8, "data.seq_len": 128, "stage.eval_every": 0,
               "stage.log_every": 2, "stage.checkpoint_every": 2, "stage.eval_batches": 1}
  return dict(name="p", stages=[dict(name="pre", config="train.py:pretrain-toy", steps=2, overrides=overrides)],
              eval=dict(ops=(1,), contexts=("p",), problems=eval_problems, max_new_tokens=8))


def test_a_pipeline_stage_whose_config_changed_is_refused_or_rerun_with_force(tmp_path):
  """A finished pipeline re-run with another model shape: refused naming the stage (never a report mixing the old
  stage's evaluation with the new plan); `force` re-runs it, the old folder moved aside, not deleted. Another eval
  size re-evaluates the finished stage without re-training it."""
  run_pipeline(_pipeline(2), tmp_path)
  report = json.loads((tmp_path / "report.json").read_text())
  with pytest.raises(RunFolderError, match="stage 'pre' .* another config.*--force"):
    run_pipeline(_pipeline(2, hidden=32), tmp_path)
  assert json.loads((tmp_path / "report.json").read_text()) == report
  run_pipeline(_pipeline(3), tmp_path)  # another eval protocol: evaluated again, the stage not re-run
  assert json.loads((tmp_path / "pre" / "eval.json").read_text())["cells"][0]["problems"] == 3
  assert json.loads((tmp_path / "pre" / "summary.json").read_text())["attempts"] == 1
  run_pipeline(_pipeline(3, hidden=32), tmp_path, force=True)
  assert json.loads((tmp_path / "pre" / "config.json").read_text())["model"]["hidden_size"] == 32
  (aside,) = (tmp_path / "replaced").iterdir()
  assert json.loads((aside / "config.json").read_text())["model"]["hidden_size"] == 64


# 3. values checked at the boundary


@pytest.mark.parametrize("override, message", [("stage.steps=0", "steps=0 in stage config: must be >=1"),
                                               ("stage.steps=-5", "steps=-5 in stage config: must be >=1"),
                                               ("optim.lr=-1", r"lr=-1(\.0)? in optimizer config: must be >=0"),
                                               ("data.batch_size=0", "batch_size=0 in data config: must be >=1"),
                                               ("stage.log_every=0", "log_every=0 in stage config: must be >=1")])
def test_out_of_range_values_are_refused_naming_the_key(override, message, tmp_path):
  from jaxstages.cli import main

  with pytest.raises(ConfigError, match=message):
    main(["train", "--config", "configs/train.py:pretrain-toy", "--workdir", str(tmp_path / "w"),
          f"--config.{override}"])
  assert not (tmp_path / "w").exists()


def test_a_pipeline_stage_of_zero_steps_is_refused_not_run_at_the_presets_length(tmp_path):
  for length in ("steps", "tokens", "flops"):
    pipeline = dict(name="p", stages=[dict(name="pre", config="train.py:pretrain-toy", **{length: 0})])
    with pytest.raises(ConfigError, match=f"stage 'pre': {length}=0 must be a number >= 1"):
      stage_configs(pipeline, tmp_path)


# 4. progress and paths


def test_training_off_a_terminal_prints_a_progress_line_per_log(stage):
  """stdout and stderr to pipes (nohup, SLURM, `| tee`): one line per `log_every` steps on stderr with the step,
  loss, tokens per second and the time left; and none of orbax's routine logs."""
  lines = [line for line in stage[1].splitlines() if line.startswith("pretrain: step")]
  assert [line.split()[2] for line in lines] == ["2/4", "4/4"], stage[1][-2000:]
  assert all("loss" in line and "tokens/s" in line and "ETA" in line for line in lines)
  assert "orbax" not in stage[1].lower(), stage[1][-2000:]


def test_a_cloud_workdir_is_refused_clearly_not_made_a_local_folder(tmp_path):
  done = subprocess.run([sys.executable, "-m", "jaxstages.cli", "train", "--config", "configs/train.py:pretrain-toy",
                         "--workdir", "gs://no-such-bucket/run"], cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO)},
                        capture_output=True, text=True, timeout=600)
  one_line_error(done, "gs://no-such-bucket/run", "local path")
  assert not (tmp_path / "gs:").exists()


# 5. configs


def test_configs_load_from_the_checkout_the_command_runs_in(tmp_path, monkeypatch):
  """A checkout's own `configs/` (here with a changed `toy` size) is what `configs/train.py:pretrain-toy` and the
  `models.py` it reads come from, not the copy beside the installed package; a file it lacks falls back to it."""
  shutil.copytree(REPO / "configs", tmp_path / "configs")
  models = tmp_path / "configs" / "models.py"
  models.write_text(models.read_text().replace("vocab_size=512, hidden_size=128", "vocab_size=512, hidden_size=96"))
  (tmp_path / "configs" / "data.py").unlink()  # not in this checkout: the package's copy
  monkeypatch.chdir(tmp_path)
  from jaxstages.config import load_config

  assert load_config("configs/train.py:pretrain-toy").model.hidden_size == 96
  assert load_config("models.py:toy").hidden_size == 96
  assert load_config(str(REPO / "configs" / "train.py") + ":pretrain-toy").model.hidden_size == 128


def test_a_named_model_size_replaces_the_model_block():
  """`--config.model=qwen2.5-0.5b`: the whole model block of that size (its dtype included); a misspelt name is
  refused with the nearest sizes."""
  from jaxstages.config import apply_overrides, load_config

  config = apply_overrides(load_config("configs/train.py:pretrain-toy"), ["model=qwen2.5-0.5b", "model.num_layers=2"])
  assert (config.model.hidden_size, config.model.num_layers, config.model.dtype) == (896, 2, "bfloat16")
  with pytest.raises(ConfigError, match="unknown model size 'qwen2.5-05b'.*qwen2.5-0.5b"):
    apply_overrides(load_config("configs/train.py:pretrain-toy"), ["model=qwen2.5-05b"])


# 6. plan


# four stages compiled at the quickstart's sizes (~40 s of CPU); every kind's plan is in the default run
@pytest.mark.slow
def test_plan_of_a_pipeline_sizes_each_stage_and_says_its_memory_is_a_cpu_compile():
  """`jaxstages plan --config configs/pipelines/quickstart.py` (the example of its own --help): every stage, GRPO
  included, sized as the run would configure it, each with the note that CPU-compiled memory is no accelerator's."""
  out = jaxstages("plan", "--config", "configs/pipelines/quickstart.py").stdout
  stages = [line.split()[1:3] for line in out.splitlines() if line.startswith("stage ")]
  assert stages == [["pretrain", "(pretrain)"], ["midtrain", "(midtrain)"], ["sft", "(sft)"], ["rl", "(grpo)"]], out
  assert out.count("note: compiled for CPU") == 4, out


@pytest.mark.parametrize("name, extra", [("dpo-toy", ["data.seq_len=128"]), ("distill-toy", ["data.seq_len=128"]),
                                         ("ppo-toy", ["ppo.rollout.max_new_tokens=16", "ppo.rollout.group_size=2"])])
def test_plan_sizes_the_other_stage_kinds_on_their_update_batches(name, extra):
  """DPO (pairs and reference log-probs), distillation (the teacher's outputs; the teacher not yet trained) and PPO
  (rollout rows, the critic): the update step compiles on the shapes the stage trains on; model and XLA FLOPs
  agree."""
  from jaxstages.config import apply_overrides, load_config
  from jaxstages.train import plan_stage

  tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
          "model.intermediate_size=128", "data.batch_size=8"]
  plan = plan_stage(apply_overrides(load_config(f"configs/train.py:{name}"), tiny + extra))
  assert plan["kind"] == name.split("-")[0] and plan["memory_per_device_bytes"]["peak_estimate"] > 0
  assert 0.4 < plan["xla_flops_per_step_per_device"] * 8 / plan["flops_per_step"] < 1.5, plan


def test_plan_flops_count_every_micro_batch():
  """XLA counts a scanned body once: with 4 micro-batches the plan's XLA FLOPs are still the whole step's."""
  from jaxstages.config import apply_overrides, load_config
  from jaxstages.train import plan_stage

  tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
          "model.intermediate_size=128", "data.batch_size=32", "data.seq_len=64"]
  one, four = (plan_stage(apply_overrides(load_config("configs/train.py:sft-toy"), tiny + [f"stage.micro_batches={m}"]))
               for m in (1, 4))
  assert four["xla_flops_per_step_per_device"] == pytest.approx(one["xla_flops_per_step_per_device"], rel=0.05)


# 7. TensorBoard


def _events(folder: Path) -> list:
  """Every event of a folder's TensorBoard files, in the order written (TFRecords: length, CRC, event, CRC)."""
  import struct

  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
      i += 12 + n + 4
  return out


def test_tensorboard_tags_are_grouped_constants_written_once_and_a_resume_purges_what_it_redoes(tmp_path):
  """Tags under train/, eval/, rollout/, time/; a value that does not change is one point; a run resumed from step 2
  marks its restart (TensorBoard's purge of steps >= 3), so after TensorBoard drops the purged events every step
  has one value."""
  from jaxstages.metrics import MetricsWriter

  first = MetricsWriter(tmp_path)
  for step in (1, 2, 3, 4):
    first.write(step, {"loss": 5.0 - step, "lr": 1e-3, "eval_loss": 9.0, "reward_mean": 0.5, "time_sampling_s": step,
                       "tokens_per_s": 100.0 * step})
  first.close()
  again = MetricsWriter(tmp_path, resumed_from=2)
  for step in (3, 4):
    again.write(step, {"loss": 5.0 - step, "lr": 1e-3})
  again.close()
  points: dict[str, dict[int, list[float]]] = {}
  for event in _events(tmp_path / "tensorboard"):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      for by_step in points.values():  # what TensorBoard does with a restart at `purge_step`
        for step in [s for s in by_step if s >= event.step]:
          del by_step[step]
    for value in event.summary.value:
      points.setdefault(value.tag, {}).setdefault(event.step, []).append(value.simple_value)
  assert set(points) == {"train/loss", "train/lr", "eval/loss", "rollout/reward_mean", "time/sampling_s",
                         "time/tokens_per_s"}
  assert sorted(points["train/loss"]) == [1, 2, 3, 4] and all(len(v) == 1 for v in points["train/loss"].values())
  assert list(points["eval/loss"]) == [1] and list(points["rollout/reward_mean"]) == [1]
  assert sorted(points["train/lr"]) == [1, 3]  # once per attempt: the resumed writer's first value


def test_metrics_as_the_run_went_keep_the_resumed_attempts_rows(tmp_path):
  """metrics.jsonl keeps every attempt's rows; read as the run went on, a step logged again by a resumed attempt has
  only the later row, and rows of another kind at the same step (an evaluation) stay."""
  from jaxstages.metrics import MetricsWriter, read_metrics

  first = MetricsWriter(tmp_path, tensorboard=False)
  for step in (5, 10, 15, 20):
    first.write(step, {"loss": 1.0, "attempt": 1})
    if step == 10:
      first.write(step, {"eval_loss": 2.0})
  first.close()
  again = MetricsWriter(tmp_path, tensorboard=False, resumed_from=10)  # killed after 20, resumed from step 10
  for step in (15, 20, 25):
    again.write(step, {"loss": 0.5, "attempt": 2})
  again.close()
  assert len(read_metrics(tmp_path / "metrics.jsonl")) == 8
  run = [(r["step"], r.get("attempt", "eval")) for r in read_metrics(tmp_path / "metrics.jsonl", as_run=True)]
  assert run == [(5, 1), (10, 1), (10, "eval"), (15, 2), (20, 2), (25, 2)]
  third = MetricsWriter(tmp_path, tensorboard=False, resumed_from=20)  # killed after logging 25, resumed from 20
  third.write(25, {"loss": 0.25, "attempt": 3})
  third.close()
  assert [r.get("attempt") for r in read_metrics(tmp_path / "metrics.jsonl", as_run=True)][-1] == 3
  assert len(read_metrics(tmp_path / "metrics.jsonl", as_run=True)) == 6


def test_the_tensorboard_writer_starts_without_loading_torch_and_leaves_it_importable(tmp_path):
  """tensorboardX imports PyTorch when it is installed (3 s of every run's start-up); the metrics writer keeps it
  out, writes its events all the same, and a later `import torch` still works."""
  code = ("import sys; from jaxstages.metrics import MetricsWriter; w = MetricsWriter(sys.argv[1]); "
          "w.write(1, {'loss': 2.5}); w.close(); print('torch' in sys.modules); "
          "import torch; print(torch.ones(1).sum().item())")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["False", "1.0"]
  assert [(v.tag, v.simple_value) for e in _events(tmp_path / "tensorboard") for v in e.summary.value] == [
      ("train/loss", 2.5)]


def test_overrides_take_absls_space_separated_form_too(tmp_path):
  from jaxstages.cli import main

  with pytest.raises(ConfigError, match="steps=0 in stage config"):
    main(["train", "--config", "configs/train.py:pretrain-toy", "--workdir", str(tmp_path / "w"),
          "--config.stage.steps", "0"])
