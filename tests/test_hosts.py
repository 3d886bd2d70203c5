"""Every stage as users run it on several hosts: the real `jaxstages` command as 2 processes on 127.0.0.1 (4 CPU
devices each, gloo collectives) against 1 process with the same 8-device mesh. Both read the data as 2 streams
(`data.streams=2`), so their global batches are the same; the logged losses and rewards must be too.

Each run is a tiny model for a few steps; the runs of one comparison start together (start-up and compilation are
mostly single-threaded, so they overlap on a small machine)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxstages.metrics import read_metrics
from tests.stage_runs import SMALL, has_checkpoint, last_step

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative
# pre-training on a mixture of two sources: each data stream's mixer draws its own sequence of sources, so the two
# processes' iterator positions differ (what a checkpoint must keep per process)
MIXTURE = ("data.sources=[{'name': 'p', 'format': 'pretrain', 'weight': 0.5}, "
           "{'name': 'q', 'format': 'instruction', 'task': {'contexts': 'q'}, 'weight': 0.5}]")
PRETRAIN = SMALL + ["data.seq_len=64", "data.streams=2", MIXTURE, "stage.steps=4", "stage.log_every=1",
                    "stage.checkpoint_every=2", "stage.eval_every=0", "stage.async_checkpoints=False"]
# GRPO from the committed SFT model: 8 prompts x 4 samples, a held-out greedy evaluation at the end
GRPO = ["data.batch_size=8", "data.streams=2", "grpo.rollout.group_size=4", "grpo.rollout.max_new_tokens=16",
        "grpo.eval_problems=4",
        "stage.steps=3", "stage.log_every=1", "stage.checkpoint_every=2", "stage.eval_every=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith("JAX_COMPILATION_CACHE")
         or k.startswith("JAX_PERSISTENT_CACHE")}
  flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")  # the suite's other flags
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags}".strip(), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
  return env


def launch(args: list[str], processes: int, log: Path) -> list[subprocess.Popen]:
  """`jaxstages ARGS` as `processes` processes on 127.0.0.1 (4 devices each), or as 1 process with 8 devices; each
  process's output goes to `log` with its index appended."""
  cmd = [sys.executable, "-m", "jaxstages.cli", *args]
  if processes == 1:
    envs = [_env(8)]
  else:
    coordinator = f"127.0.0.1:{_free_port()}"
    envs = [_env(4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
            for i in range(processes)]
  procs = []
  for i, env in enumerate(envs):
    with open(f"{log}.{i}", "w") as out:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs


def finish(procs: list[subprocess.Popen], log: Path, timeout: float = 400) -> None:
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} of {len(procs)}:\n" + Path(f"{log}.{i}").read_text()[-4000:]


def train_args(config: str, workdir: Path, overrides: list[str]) -> list[str]:
  return ["train", "--config", f"configs/train.py:{config}", "--workdir", str(workdir),
          *(f"--config.{o}" for o in overrides)]


def rows(workdir: Path) -> dict[int, dict]:
  """step -> every metric logged at it (the last value written, as a resumed run writes steps again)."""
  out = {}
  for row in read_metrics(Path(workdir) / "metrics.jsonl"):
    out.setdefault(row["step"], {}).update(row)
  return out


def assert_close(a: float, b: float, what: str, scale: float = 0.0) -> None:
  assert abs(a - b) <= TOL * max(abs(a), abs(b), scale), f"{what}: {a} vs {b}"


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
  """The mixture pre-training as 2 processes and as 1, uninterrupted."""
  root = tmp_path_factory.mktemp("hosts_pretrain")
  runs = {n: launch(train_args("pretrain-toy", root / f"p{n}", PRETRAIN), n, root / f"p{n}.log") for n in (2, 1)}
  for n, procs in runs.items():
    finish(procs, root / f"p{n}.log")
  return root / "p2", root / "p1"


def test_pretraining_as_two_processes_logs_the_losses_of_one(pretrain_runs):
  two, one = map(rows, pretrain_runs)
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  for step in one:
    for key in ("loss", "grad_norm", "count", "eval_loss"):
      if key in one[step]:
        assert_close(two[step][key], one[step][key], f"step {step} {key}")
  summary = json.loads((pretrain_runs[0] / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["step"] == 4
  # each process saved its own data-iterator position, and the mixture made them differ
  data = pretrain_runs[0] / "checkpoints" / "4" / "data"
  states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert states[0] != states[1]


def test_two_processes_killed_and_resumed_equal_the_uninterrupted_run(pretrain_runs, tmp_path):
  """Both processes SIGKILLed after the step-2 checkpoint; the same command resumes each from its own data position
  (restored into the abstract state) and logs what the uninterrupted run logged."""
  workdir = tmp_path / "killed"
  procs = launch(train_args("pretrain-toy", workdir, PRETRAIN), 2, tmp_path / "killed.log")
  deadline = time.monotonic() + 300
  try:
    while not (last_step(workdir) >= 2 and has_checkpoint(workdir)):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          Path(f"{tmp_path / 'killed.log'}.0").read_text()[-3000:]
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
      p.wait()
  killed_at = last_step(workdir)
  assert killed_at < 4, "the run finished before the kill: nothing was resumed"
  finish(launch(train_args("pretrain-toy", workdir, PRETRAIN), 2, tmp_path / "resumed.log"), tmp_path / "resumed.log")
  resumed, uninterrupted = rows(workdir), rows(pretrain_runs[0])
  assert sorted(resumed) == sorted(uninterrupted)
  for step in uninterrupted:
    for key in ("loss", "grad_norm", "count", "eval_loss"):
      if key in uninterrupted[step]:
        assert_close(resumed[step][key], uninterrupted[step][key], f"step {step} {key}")
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] is not None and summary["attempts"] == 2


def test_grpo_as_two_processes_logs_the_losses_and_rewards_of_one(tmp_path):
  """Each process samples, decodes and verifies its own prompts; the rewards are the same, and so are the losses.
  A GRPO loss is a near-cancelling sum of advantage-weighted ratios (advantages are centred, ratios near 1): it is
  compared relative to the scale of its terms (|advantage| ~ 1), since the gradient all-reduce sums in another
  order across processes than within one (a 1e-7 difference the loss's cancellation shows as ~1e-5 of its value)."""
  runs = {n: launch(train_args("grpo-toy", tmp_path / f"g{n}", GRPO), n, tmp_path / f"g{n}.log") for n in (2, 1)}
  for n, procs in runs.items():
    finish(procs, tmp_path / f"g{n}.log")
  two, one = rows(tmp_path / "g2"), rows(tmp_path / "g1")
  assert sorted(two) == sorted(one) == [1, 2, 3]
  for step in one:
    for key in ("reward_mean", "reward_std", "pass_rate", "response_length", "truncated_fraction",
                "eval_pass@1", "eval_answer@1"):
      if key in one[step]:
        assert two[step][key] == pytest.approx(one[step][key], rel=TOL, abs=1e-7), f"step {step} {key}"
    assert_close(two[step]["loss"], one[step]["loss"], f"step {step} loss", scale=0.1)
    assert_close(two[step]["grad_norm"], one[step]["grad_norm"], f"step {step} grad_norm")
  assert one[3]["reward_std"] > 0  # rewards that differ: the test would notice rows verified by the wrong process


def test_a_resumed_stage_is_built_abstract_and_loads_starting_params_only_when_read(tmp_path, monkeypatch):
  """Resuming, the train state is only a target (shapes, dtypes, shardings: nothing allocated, the fresh state never
  made); the starting params are loaded for an objective that reads them (GRPO's reference), else never."""
  import jax

  import jaxstages.train
  from jaxstages.config import apply_overrides, load_config

  loads = []
  real = jaxstages.train.initial_model
  monkeypatch.setattr(jaxstages.train, "initial_model", lambda *a: loads.append(a) or real(*a))
  for config, overrides, expected in (("pretrain-toy", SMALL + ["data.seq_len=64"], 0),
                                      ("grpo-toy", ["grpo.kl.coef=0.01", "grpo.eval_problems=0"], 1)):
    loads.clear()
    built = jaxstages.train.build_stage(apply_overrides(load_config(f"configs/train.py:{config}"), overrides),
                                        tmp_path / config, resume=True)
    leaves = jax.tree.leaves(built.state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    assert len(loads) == expected, config


def _pipeline() -> dict:
  """Pre-training (continued from the committed SFT model, so that RL has rewards to learn from) -> GRPO."""
  tiny = {"stage.log_every": 1, "stage.checkpoint_every": 2, "stage.eval_every": 0, "data.streams": 2,
          "data.batch_size": 8}
  return dict(
      name="hosts",
      stages=[dict(name="pre", config="train.py:pretrain-toy", steps=2, overrides={
                  **tiny, "stage.init_from": "experiments/artifacts/toy-sft", "data.seq_len": 64,
                  "stage.eval_batches": 1, "optim.lr": 1e-4}),
              dict(name="rl", config="train.py:grpo-toy", steps=2, overrides={
                  **tiny, "grpo.rollout.group_size": 4, "grpo.rollout.max_new_tokens": 16, "grpo.eval_problems": 0})],
      eval=dict(ops=(1,), contexts=("p",), problems=4, max_new_tokens=16))


def _outcome(run_dir: Path) -> list[dict]:
  """Per stage what must not depend on the number of processes: steps, tokens, FLOPs and evaluation cells."""
  report = json.loads((run_dir / "report.json").read_text())
  return [{k: r[k] for k in ("stage", "kind", "steps", "tokens", "flops", "eval")} for r in report["stages"]]


# 2 x 2 stages and an evaluation, as 3 processes (~90 s); GRPO on 2 processes stays in the default run (above)
@pytest.mark.slow
def test_pipeline_and_eval_as_two_processes_report_what_one_process_does(tmp_path):
  """`jaxstages run` of pre-training -> GRPO as 2 processes ends with the report of 1 process (steps, tokens,
  FLOPs spent, evaluation cells); then `jaxstages eval` of its RL stage as 2 processes gives the cells of 1 (pass@k
  from 2 samples per problem, each process verifying its own problems)."""
  config = tmp_path / "pipeline.py"
  config.write_text(f"def get_config():\n  return {_pipeline()!r}\n")
  runs = {n: launch(["run", "--config", str(config), "--workdir", str(tmp_path / f"run{n}")], n,
                    tmp_path / f"run{n}.log") for n in (2, 1)}
  for n, procs in runs.items():
    finish(procs, tmp_path / f"run{n}.log")
  two, one = _outcome(tmp_path / "run2"), _outcome(tmp_path / "run1")
  assert [r["processes"] for r in json.loads((tmp_path / "run2" / "report.json").read_text())["stages"]] == [2, 2]
  for a, b in zip(two, one, strict=True):
    assert a["flops"] == pytest.approx(b["flops"], rel=TOL)
    assert {**a, "flops": 0} == {**b, "flops": 0}
  assert "| pre |" in Path(f"{tmp_path / 'run2.log'}.0").read_text()  # the report card, printed by process 0 only
  assert "| pre |" not in Path(f"{tmp_path / 'run2.log'}.1").read_text()

  evaluate = ["eval", str(tmp_path / "run1" / "rl"), "--ops", "1", "--contexts", "p,q", "--problems", "6", "--n", "2",
              "--k", "1,2", "--prompt", "chat"]
  runs = {n: launch(evaluate + ["--out", str(tmp_path / f"eval{n}")], n, tmp_path / f"eval{n}.log") for n in (2, 1)}
  for n, procs in runs.items():
    finish(procs, tmp_path / f"eval{n}.log")
  cells = {n: json.loads((tmp_path / f"eval{n}" / "eval.json").read_text())["cells"] for n in (2, 1)}
  assert cells[2] == cells[1] and len(cells[1]) == 2
  assert sum(sum(c["correct"]) for c in cells[1]) > 0  # some samples right: the cells carry information


COMMON = ["data.batch_size=8", "data.streams=2", "stage.steps=3", "stage.log_every=1", "stage.checkpoint_every=2",
          "stage.eval_every=0", "stage.eval_batches=1"]
OTHER_KINDS = {
    "midtrain": ("midtrain-toy", ["stage.init_from='experiments/artifacts/toy-base'", "data.seq_len=128"]),
    "sft": ("sft-toy", ["stage.init_from='experiments/artifacts/toy-base'"]),
    # pairs sampled from the reference and verified by each process; the KL drift on 2 held-out prompts at the end
    "dpo": ("dpo-toy", ["stage.init_from='experiments/artifacts/toy-sft'", "dpo.pairs='reference'",
                        "dpo.pair_samples=2", "dpo.pair_max_new_tokens=16", "dpo.drift_prompts=2",
                        "dpo.drift_max_new_tokens=16"]),
    # on-policy (GKD, λ = 1): the student's completions of each process's own prompts, the teacher's log-probs
    "distill": ("distill-toy", ["distill.teacher='experiments/artifacts/toy-sft'", "distill.on_policy_fraction=1.0",
                                "distill.max_new_tokens=16", "data.kind='rl'", "data.prompt_len=96"]),
    "ppo": ("ppo-toy", ["ppo.rollout.group_size=4", "ppo.rollout.max_new_tokens=16", "ppo.eval_problems=4"]),
    # GRPO's other paths across processes: dynamic sampling (groups chosen from several rounds, moved on device to
    # the process that holds their rows), an adaptive KL coefficient in the reward, recomputed old log-probs
    "grpo-dapo": ("grpo-toy", ["grpo.rollout.group_size=4", "grpo.rollout.max_new_tokens=16", "grpo.eval_problems=0",
                               "grpo.rollout.dynamic_sampling=True", "grpo.rollout.max_sampling_rounds=3",
                               "grpo.kl.coef=0.01",
                               "grpo.kl.placement='reward'", "grpo.kl.target=0.01",
                               "grpo.policy_loss.recompute_old_logprobs=True", "grpo.drift_prompts=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_every_other_stage_kind_as_two_processes_logs_what_one_does(kind, tmp_path):
  """Mid-training, SFT, DPO (with sampled pairs), on-policy distillation, PPO and GRPO with DAPO's dynamic sampling
  as 2 processes log the losses of 1 (RL also its rewards and group counts). Losses that are near-cancelling sums
  (PPO's, GRPO's) are compared relative to 0.1, as in the GRPO test above."""
  config, overrides = OTHER_KINDS[kind]
  runs = {n: launch(train_args(config, tmp_path / f"r{n}", COMMON + overrides), n, tmp_path / f"r{n}.log")
          for n in (2, 1)}
  for n, procs in runs.items():
    finish(procs, tmp_path / f"r{n}.log")
  two, one = rows(tmp_path / "r2"), rows(tmp_path / "r1")
  assert sorted(two) == sorted(one) == [1, 2, 3]
  for step in one:
    for key in ("reward_mean", "pass_rate", "eval_pass@1", "sampled_chosen", "sampled_rejected", "sampling_rounds",
                "groups_dropped", "groups_filled", "zero_variance_groups"):
      if key in one[step]:
        assert two[step][key] == pytest.approx(one[step][key], rel=TOL, abs=1e-7), f"step {step} {key}"
    if "kl_from_reference" in one[step]:  # a small difference of two models' log-probs: float noise shows ~1e-5
      assert two[step]["kl_from_reference"] == pytest.approx(one[step]["kl_from_reference"], rel=1e-3)
    for key in ("loss", "eval_loss"):
      if key in one[step]:
        scale = 0.1 if kind in ("ppo", "grpo-dapo") else 0.0
        assert_close(two[step][key], one[step][key], f"step {step} {key}", scale=scale)


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_the_same_step_and_the_run_resumes(tmp_path):
  """JAX's preemption service: SIGTERM to process 1 alone makes both processes save at the same step (the sync
  point) and exit with code 75; the same command resumes from that checkpoint and finishes."""
  from jaxstages.train import PREEMPTED_EXIT_CODE

  overrides = [o for o in PRETRAIN if not o.startswith(("stage.steps", "stage.checkpoint_every"))]
  overrides += ["stage.steps=12", "stage.checkpoint_every=100"]
  workdir = tmp_path / "run"
  procs = launch(train_args("pretrain-toy", workdir, overrides), 2, tmp_path / "run.log")
  deadline = time.monotonic() + 300
  try:
    while last_step(workdir) < 1:
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.02)
    os.kill(procs[1].pid, signal.SIGTERM)
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [Path(f"{tmp_path / 'run.log'}.{i}").read_text() for i in range(2)]
  assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, logs[0][-3000:] + logs[1][-3000:]
  stopped = last_step(workdir)
  assert 1 <= stopped < 12 and sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [stopped]
  assert all(f"checkpoint saved at step {stopped}" in log for log in logs)
  finish(launch(train_args("pretrain-toy", workdir, overrides), 2, tmp_path / "resumed.log"), tmp_path / "resumed.log")
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] == stopped and summary["step"] == 12
