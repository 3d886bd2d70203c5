"""Compiled per-device memory and compile time of accelerator-sized train steps, on simulated CPU devices.

  python benchmarks/plan_memory.py [--devices 8] [--only qwen2.5-0.5b,...] [--set model.scan_layers=True ...]
                                   [--shapes] [--timeout 1800]

Each entry is `jaxstages.train.plan_stage` (what `jaxstages plan` prints) on an `fsdp` mesh of `--devices` simulated
host devices, run in its own process (one at a time: a big compile takes minutes and gigabytes of RAM here), and
printed as one Markdown row for `benchmarks/RESULTS.md`:

- `pretrain-interplay`, `midtrain-interplay`: the interplay study's presets (`configs/train.py`);
- `grpo-interplay-update`: a stand-in for one optimizer update of `grpo-interplay` (`plan` sizes packed-data stages
  only): a next-token step of the preset's model, mesh, optimizer and micro-batches over the rows of one minibatch
  (prompts x group / minibatches) at prompt + completion length. The RL loss's own extras (old / reference
  log-probs, advantages: `[rows, seq]` each) are small next to the activations; its log-probs do not yet go through
  the chunked path, so its `[rows, completion, vocab]` logits come on top (about 1.7 GiB per device at vocab 2,304);
  the sampler's KV cache (6,144 rows x 2,048 slots, bf16) is about 9 GiB per device, outside the update.
- `qwen2.5-0.5b`, `qwen2.5-1.5b`, `qwen2.5-7b`: pre-training at seq 4,096 with one sequence per device, from the
  presets `configs/train.py:pretrain-qwen2.5-*` where they exist, else (`--shapes`, or a checkout that predates
  them) built from `pretrain-interplay` with the model size of `configs/models.py` swapped in (the "before" numbers).

Memory is XLA's compiled estimate for the CPU backend: arguments + outputs - aliased (donated state) + temporaries.
The fused accelerator kernels (cuDNN, splash) do not compile on a CPU, so the attention measured here is the one
`model.attention` gives on a CPU (`auto`: the blocked attention, whose memory is that of a flash kernel's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENTRIES = ("pretrain-interplay", "midtrain-interplay", "grpo-interplay-update", "qwen2.5-0.5b", "qwen2.5-1.5b",
           "qwen2.5-7b")


def _config(name: str, shapes: bool, devices: int):
  """The training config of one entry (read in the child process, after XLA_FLAGS is set)."""
  from jaxstages.config import load_config

  if name.startswith("qwen"):
    preset = None
    if not shapes:
      try:
        preset = load_config(f"configs/train.py:pretrain-{name}")
      except KeyError:
        preset = None
    if preset is not None:
      return preset
    cfg = load_config("configs/train.py:pretrain-interplay")
    cfg.model = dict(load_config(f"models.py:{name}").to_dict())
    cfg.data.seq_len, cfg.data.batch_size = 4096, devices
    cfg.stage.name = f"pretrain-{name}"
  elif name == "grpo-interplay-update":
    rl = load_config("configs/train.py:grpo-interplay")
    cfg = load_config("configs/train.py:pretrain-interplay")
    cfg.model, cfg.mesh, cfg.optim = rl.model, rl.mesh, rl.optim
    cfg.stage.micro_batches = rl.stage.micro_batches
    cfg.stage.name = name
    cfg.data.batch_size = rl.data.batch_size * rl.grpo.rollout.group_size // rl.grpo.minibatches
    cfg.data.seq_len = rl.data.prompt_len + rl.grpo.rollout.max_new_tokens
  else:
    cfg = load_config(f"configs/train.py:{name}")
  if shapes:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, devices, 1
  return cfg


def _child(name: str, shapes: bool, devices: int, overrides: list[str]) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  from jaxstages.config import apply_overrides
  from jaxstages.train import plan_stage

  cfg = apply_overrides(_config(name, shapes, devices), overrides)
  start = time.perf_counter()
  plan = plan_stage(cfg)
  seconds = time.perf_counter() - start
  model = cfg.model
  print(json.dumps(dict(plan, name=name, seconds=seconds, batch=cfg.data.batch_size, seq=cfg.data.seq_len,
                        micro_batches=cfg.stage.micro_batches, remat=model.get("remat", False),
                        dtype=model.get("dtype", "float32"), param_dtype=model.get("param_dtype", "float32"),
                        attention=model.get("attention", "einsum"), logits_chunk=model.get("logits_chunk", 0),
                        scan_layers=model.get("scan_layers", False))))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--only", default=",".join(ENTRIES))
  parser.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE, for every entry")
  parser.add_argument("--shapes", action="store_true", help="build the Qwen entries from pretrain-interplay")
  parser.add_argument("--timeout", type=int, default=1800)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.shapes, args.devices, args.set)
    return
  gib = lambda b: f"{b / 2**30:,.1f}"
  print("| entry | params | batch x seq | micro | dtype / params | remat | attention | logits chunk | scan | "
        "arguments GiB | temporaries GiB | peak GiB per device | compile s |")
  print("| --- | ---: | --- | ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
  for name in args.only.split(","):
    cmd = [sys.executable, __file__, "--child", name, "--devices", str(args.devices)]
    cmd += ["--shapes"] if args.shapes else []
    cmd += [x for s in args.set for x in ("--set", s)]
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
      print(f"| {name} | timed out after {args.timeout} s |", flush=True)
      continue
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    if out.returncode or line is None:
      print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |",
            flush=True)
      continue
    r = json.loads(line)
    mem = r["memory_per_device_bytes"]
    print(f"| {name} | {r['params']:,} | {r['batch']} x {r['seq']:,} | {r['micro_batches']} | {r['dtype']} / "
          f"{r['param_dtype']} | {r['remat']} | {r['attention']} | {r['logits_chunk']} | {r['scan_layers']} | "
          f"{gib(mem['argument'])} | {gib(mem['temp'])} | {gib(mem['peak_estimate'])} | "
          f"{r.get('compile_s', r['seconds']):.0f} |",
          flush=True)


if __name__ == "__main__":
  main()
