"""Time per RL step, split into sampling, the post-processing (the one jitted call from sampled tokens and rewards to
the training batch: old / reference log-probs, values, advantages), the updates and the host's share (everything
outside the sampler's, the post-processing's and the update's jitted calls: decoding text, verifying, assembling the
rollout's global arrays, reading metrics), for the toy GRPO setup and a larger model in one run; with the FLOPs of
each part and its rate against this machine's measured matmul peak.

  python benchmarks/rl_step.py [--configs toy,small] [--steps 4] [--kinds grpo,ppo]

`toy` is `configs/train.py:grpo-toy` (the committed toy SFT model, 16 prompts x 8 samples, up to 40 new tokens);
`small` is the same stage on the 6M-parameter `small` shape, freshly initialised (its completions run to the token
limit: the worst case for sampling), 16 prompts x 8 samples, 64 new tokens. The first step (compilation) is reported
apart; the others are averaged. Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import logging
import platform
import tempfile
import time

import jaxstages  # noqa: F401  (before jax: it sets the C allocator up for XLA:CPU, jaxstages/host.py)
import jax
import numpy as np

from jaxstages.config import apply_overrides, load_config
from jaxstages.data.pipeline import make_pipeline
from jaxstages.sharding import global_batch_from_process_local
from jaxstages.train import build_stage
from train_throughput import matmul_peak  # noqa: E402  (this folder is on sys.path when a benchmark runs as a script)

SETUPS = {
    "toy": [],
    "small": ["stage.init_from=None", "model.hidden_size=256", "model.num_layers=6", "model.num_heads=8",
              "model.num_kv_heads=2", "model.intermediate_size=1024", "model.rope_theta=1000000.0",
              "{kind}.rollout.max_new_tokens=64"],
}


class CompileCounter(logging.Handler):
  """Counts XLA compilations by function name (JAX logs one line per compilation with `jax_log_compiles`)."""

  def __init__(self):
    super().__init__()
    self.counts = collections.Counter()

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):  # "Compiling jit(name) with global shapes ..."
      self.counts[message.split()[1].removeprefix("jit(").removesuffix(")")] += 1


def bench(kind: str, setup: str, steps: int, extra: list[str]) -> dict:
  overrides = [o.format(kind=kind) for o in SETUPS[setup]] + [f"{kind}.eval_problems=0", *extra]
  cfg = apply_overrides(load_config(f"configs/train.py:{kind}-toy"), overrides)
  with tempfile.TemporaryDirectory() as workdir:
    built = build_stage(cfg, workdir)
    it = make_pipeline(built.data, built.tokenizer)
    next_batch = lambda: global_batch_from_process_local(next(it), built.mesh, built.rules)
    step_fn, state = built.train_step(), built.state
    rows = []
    compiles, logger = CompileCounter(), logging.getLogger("jax")
    logger.addHandler(compiles)
    logger.propagate = False  # counted, not printed
    jax.config.update("jax_log_compiles", True)
    for step in range(steps + 1):
      start = time.perf_counter()
      batch = built.objective.prepare(state, next_batch(), step, next_batch)
      host = built.objective.host_metrics()
      t_update = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready((state, metrics))
      end = time.perf_counter()
      # the host's share: everything but the sampler's jitted call, the post-processing's and the update's
      # (decoding text, verifying, assembling global arrays, reading metrics, dispatch)
      device = host["time_sampler_s"] + host["time_logprobs_s"] + (end - t_update)
      rows.append(dict(sampling=host["time_sampling_s"], logprobs=host["time_logprobs_s"], update=end - t_update,
                       total=end - start, sampler=host["time_sampler_s"], host=end - start - device,
                       flops_sampling=host["flops_sampling"],
                       flops_logprobs=host["flops_logprobs"], flops_update=host["flops_update"],
                       length=host["response_length"]))
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(compiles)
    logger.propagate = True
  first, warm = rows[0], rows[1:]
  mean = {k: float(np.mean([r[k] for r in warm])) for k in warm[0]}
  return dict(kind=kind, setup=setup, params=built.model_cfg, first=first, mean=mean,
              postprocess_compiles=compiles.counts["postprocess"], rows=built.data.batch_size,
              group=cfg[kind].rollout.group_size, new=cfg[kind].rollout.max_new_tokens)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="toy,small")
  parser.add_argument("--kinds", default="grpo")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--override", action="append", default=[], help="extra config overrides, e.g. grpo.epochs=2")
  args = parser.parse_args()
  from jaxstages.model import param_count

  peak = matmul_peak("float32")
  dev = jax.devices()[0]
  print(f"machine: {dev.platform} / {dev.device_kind} x {jax.device_count()}, {platform.machine()}; measured "
        f"float32 matmul peak {peak / 1e9:,.1f} GFLOP/s; {args.steps} timed steps after the first\n")
  print("| stage | model | params | prompts x G, new | first step s | step s | sampling s (sampler s) | "
        "post-processing s | updates s | host s | host share | sampling share | sampling GFLOP/s | update GFLOP/s | "
        "mean length | post-processing (with GAE) compiles |")
  print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |")
  for setup in args.configs.split(","):
    for kind in args.kinds.split(","):
      r = bench(kind, setup, args.steps, args.override)
      m = r["mean"]
      print(f"| {kind} | {setup} | {param_count(r['params']):,} | {r['rows']} x {r['group']}, {r['new']} | "
            f"{r['first']['total']:.1f} | {m['total']:.2f} | {m['sampling']:.2f} ({m['sampler']:.2f}) | "
            f"{m['logprobs']:.3f} | {m['update']:.2f} | {m['host']:.3f} | {m['host'] / m['total']:.1%} | "
            f"{m['sampling'] / m['total']:.0%} | {m['flops_sampling'] / m['sampling'] / 1e9:.1f} | "
            f"{m['flops_update'] / m['update'] / 1e9:.1f} | {m['length']:.1f} | {r['postprocess_compiles']} |")


if __name__ == "__main__":
  main()
