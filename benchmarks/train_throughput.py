"""Train-step throughput of jaxstages next to PyTorch (HF transformers) on the same weights and batch, and MFU against
this machine's measured matmul peak, for several model sizes in one run.

  python benchmarks/train_throughput.py [--models toy,small] [--batch 8] [--seq 256] [--dtype float32]
                                        [--attention auto,einsum] [--single-core]

Both sides run a full AdamW training step (forward, backward, clipping-free update) on identical weights; the
forward-only throughput is reported too. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

if "--single-core" in sys.argv:  # before jax sizes its thread pools: this process (JAX and PyTorch) on one core
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jaxstages  # noqa: F401  (before jax: it sets the C allocator up for XLA:CPU, jaxstages/host.py)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import next_token_loss
from jaxstages.model import create_model, model_config, param_count
from jaxstages.model.hf import export_hf
from jaxstages.sharding import MeshConfig, make_mesh
from jaxstages.state import init_train_state
from jaxstages.train import make_train_step


def timed(fn, repeats: int, warmup: int = 2) -> float:
  """Median seconds per call after `warmup` calls (by default the compile and a first run)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_peak(dtype, n: int = 2048) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / timed(lambda: f(a).block_until_ready(), 10)


def bench(name: str, batch: int, seq: int, dtype: str, repeats: int, with_torch: bool,
          attentions: tuple[str, ...] = ("auto",), block: int = 512) -> list[dict]:
  """One row per attention kernel. Every contender (each kernel's jaxstages step, PyTorch's) is built and warmed up
  first, then timed in interleaved rounds (one call of each per round), so a shared machine's changing load falls on
  all of them alike; medians over the rounds."""
  from flax import nnx

  cfgs = [model_config(name, dtype=dtype, param_dtype="float32", attention=a, attention_block=block)
          for a in attentions]
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfgs[0].vocab_size, (batch, seq + 1)).astype(np.int32)
  data = dict(tokens=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
              loss_mask=jnp.ones((batch, seq), jnp.float32))
  optimizer = optax.adamw(1e-4)
  train_fns, forward_fns, compile_s = {}, {}, {}
  tmp = tempfile.TemporaryDirectory()
  for attention, cfg in zip(attentions, cfgs):
    model = create_model(cfg, seed=0, mesh=mesh)  # the same weights for every kernel
    if with_torch and not os.listdir(tmp.name):
      export_hf(model, tmp.name)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, lambda m, b: (*next_token_loss(m, b), {}), mesh, shardings)
    forward = jax.jit(lambda p, t, graphdef=graphdef: nnx.merge(graphdef, p)(t)[0])
    holder = {"state": state}

    def train(step=step, holder=holder):
      holder["state"], metrics = step(holder["state"], data)
      jax.block_until_ready(metrics)

    start = time.perf_counter()
    train()
    compile_s[attention] = time.perf_counter() - start
    train_fns[attention] = train
    forward_fns[attention] = lambda holder=holder, forward=forward: forward(holder["state"].params,
                                                                            data["tokens"]).block_until_ready()
  if with_torch:
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp.name, dtype=getattr(torch, dtype))
    adam = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    t = torch.tensor(tok[:, :-1], dtype=torch.long)
    y = torch.tensor(tok[:, 1:], dtype=torch.long)

    def torch_train():
      adam.zero_grad()
      logits = hf(t).logits.float()
      torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
      adam.step()

    def torch_forward():
      with torch.no_grad():
        hf(t)

    train_fns["torch"], forward_fns["torch"] = torch_train, torch_forward
  tmp.cleanup()
  times = {}
  for kind, fns in (("train", train_fns), ("forward", forward_fns)):
    for fn in fns.values():  # warm-up
      fn()
    rounds = {k: [] for k in fns}
    for _ in range(repeats):
      for k, fn in fns.items():
        start = time.perf_counter()
        fn()
        rounds[k].append(time.perf_counter() - start)
    times[kind] = {k: float(np.median(v)) for k, v in rounds.items()}
  tokens = batch * seq
  rows = []
  for attention, cfg in zip(attentions, cfgs):
    row = {"model": name, "attention": attention, "params": param_count(cfg), "compile_s": compile_s[attention],
           "jax_train": tokens / times["train"][attention], "jax_forward": tokens / times["forward"][attention],
           "train_flops": train_flops_per_token(cfg, seq) * tokens,
           "forward_flops": forward_flops_per_token(cfg, seq) * tokens, "t_train": times["train"][attention],
           "t_fwd": times["forward"][attention]}
    if with_torch:
      row.update(torch_train=tokens / times["train"]["torch"], torch_forward=tokens / times["forward"]["torch"])
    rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="toy,small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--attention", default="auto", help="model.attention kernels to time, comma-separated")
  parser.add_argument("--attention-block", type=int, default=512)
  parser.add_argument("--single-core", action="store_true",
                      help="pin the process (both frameworks) to one core: a steadier ratio where other work loads "
                           "the machine")
  args = parser.parse_args()
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  peak = matmul_peak(dtype)
  device = jax.devices()[0]
  print(f"\nmachine: {device.platform} / {device.device_kind}, {os.cpu_count()} cores, {platform.machine()}; "
        f"measured {args.dtype} matmul peak {peak / 1e9:,.1f} GFLOP/s; batch {args.batch} x seq {args.seq}\n")
  print("| model | attention | params | jaxstages train tok/s | train MFU | PyTorch train tok/s "
        "| jax / torch (train) | jaxstages fwd tok/s | PyTorch fwd tok/s | jax / torch (fwd) | compile s |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name in args.models.split(","):
    for r in bench(name, args.batch, args.seq, args.dtype, args.repeats, not args.no_torch,
                   tuple(args.attention.split(",")), args.attention_block):
      mfu = r["train_flops"] / r["t_train"] / peak
      tt, tf = r.get("torch_train"), r.get("torch_forward")
      fmt = lambda x: f"{x:,.0f}" if x else "-"
      ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
      print(f"| {name} | {r['attention']} | {r['params']:,} | {fmt(r['jax_train'])} | {mfu:.1%} | {fmt(tt)} | "
            f"{ratio(r['jax_train'], tt)} | {fmt(r['jax_forward'])} | {fmt(tf)} | {ratio(r['jax_forward'], tf)} | "
            f"{r['compile_s']:.1f} |", flush=True)

if __name__ == "__main__":
  main()
