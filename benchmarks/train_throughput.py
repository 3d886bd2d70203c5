"""Train-step throughput of jaxstages next to PyTorch (HF transformers) on the same weights and batch, and MFU against
this machine's measured matmul peak, for several model sizes in one run.

  python benchmarks/train_throughput.py [--models toy,small] [--batch 8] [--seq 256] [--dtype float32]

Both sides run a full AdamW training step (forward, backward, clipping-free update) on identical weights; the
forward-only throughput is reported too. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

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


def bench(name: str, batch: int, seq: int, dtype: str, repeats: int, with_torch: bool) -> dict:
  cfg = model_config(name, dtype=dtype, param_dtype="float32")
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  model = create_model(cfg, seed=0, mesh=mesh)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = dict(tokens=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
              loss_mask=jnp.ones((batch, seq), jnp.float32))
  tmp = tempfile.TemporaryDirectory()
  if with_torch:
    export_hf(model, tmp.name)
  optimizer = optax.adamw(1e-4)
  graphdef, state, shardings = init_train_state(model, optimizer, mesh)
  step = make_train_step(graphdef, optimizer, lambda m, b: (*next_token_loss(m, b), {}), mesh, shardings)
  from flax import nnx
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  holder = {"state": state}

  def train():
    holder["state"], metrics = step(holder["state"], data)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  train()
  compile_s = time.perf_counter() - start
  t_train = timed(train, repeats)
  t_fwd = timed(lambda: forward(holder["state"].params, data["tokens"]).block_until_ready(), repeats)
  tokens = batch * seq
  out = {"model": name, "params": param_count(cfg), "compile_s": compile_s,
         "jax_train": tokens / t_train, "jax_forward": tokens / t_fwd,
         "train_flops": train_flops_per_token(cfg, seq) * tokens, "forward_flops": forward_flops_per_token(cfg, seq) *
         tokens, "t_train": t_train, "t_fwd": t_fwd}
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

    out["torch_train"] = tokens / timed(torch_train, repeats)
    out["torch_forward"] = tokens / timed(torch_forward, repeats)
  tmp.cleanup()
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="toy,small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  peak = matmul_peak(dtype)
  device = jax.devices()[0]
  print(f"\nmachine: {device.platform} / {device.device_kind}, {os.cpu_count()} cores, {platform.machine()}; "
        f"measured {args.dtype} matmul peak {peak / 1e9:,.1f} GFLOP/s; batch {args.batch} x seq {args.seq}\n")
  print("| model | params | jaxstages train tok/s | train MFU | PyTorch train tok/s | jax / torch (train) | "
        "jaxstages fwd tok/s | PyTorch fwd tok/s | jax / torch (fwd) | compile s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name in args.models.split(","):
    r = bench(name, args.batch, args.seq, args.dtype, args.repeats, not args.no_torch)
    mfu = r["train_flops"] / r["t_train"] / peak
    tt, tf = r.get("torch_train"), r.get("torch_forward")
    fmt = lambda x: f"{x:,.0f}" if x else "-"
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
    print(f"| {name} | {r['params']:,} | {fmt(r['jax_train'])} | {mfu:.1%} | {fmt(tt)} | {ratio(r['jax_train'], tt)} | "
          f"{fmt(r['jax_forward'])} | {fmt(tf)} | {ratio(r['jax_forward'], tf)} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
