"""Train-step and forward throughput of the jaxstages model, side by side with HF transformers on the same weights,
and as a fraction of this machine's measured matmul peak (MFU).

  python benchmarks/model_step.py [--model small] [--batch 8] [--seq 256] [--dtype float32]

Prints a Markdown table; append it to benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import next_token_loss
from jaxstages.model import create_model, model_config, param_count
from jaxstages.model.hf import export_hf


def timed(fn, repeats: int) -> float:
  """Median seconds per call after one warm-up call (the compile)."""
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


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-hf", action="store_true")
  args = parser.parse_args()

  cfg = model_config(args.model, dtype=args.dtype, param_dtype="float32")
  model = create_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
  batch = dict(tokens=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
               loss_mask=jnp.ones((args.batch, args.seq), jnp.float32))
  tokens = args.batch * args.seq

  @jax.jit
  def loss_and_grad(state, batch):
    def loss(state):
      total, count = next_token_loss(nnx.merge(graphdef, state), batch)
      return total / count
    return jax.value_and_grad(loss)(state)

  forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
  start = time.perf_counter()
  jax.block_until_ready(loss_and_grad(state, batch))
  compile_s = time.perf_counter() - start
  t_train = timed(lambda: jax.block_until_ready(loss_and_grad(state, batch)), args.repeats)
  t_fwd = timed(lambda: forward(state, batch["tokens"]).block_until_ready(), args.repeats)
  peak = matmul_peak(cfg.compute_dtype)
  train_mfu = train_flops_per_token(cfg, args.seq) * tokens / t_train / peak
  fwd_mfu = forward_flops_per_token(cfg, args.seq) * tokens / t_fwd / peak

  rows = [("jaxstages", tokens / t_train, train_mfu, tokens / t_fwd, fwd_mfu)]
  if not args.no_hf:
    import torch
    import transformers

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    with tempfile.TemporaryDirectory() as tmp:
      export_hf(model, tmp)
      hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype))
    t = torch.tensor(tok[:, :-1], dtype=torch.long)
    y = torch.tensor(tok[:, 1:], dtype=torch.long)

    def hf_train():
      hf.zero_grad()
      logits = hf(t).logits.float()
      torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()

    def hf_forward():
      with torch.no_grad():
        hf(t)

    t_hf_train = timed(hf_train, args.repeats)
    t_hf_fwd = timed(hf_forward, args.repeats)
    rows.append(("HF transformers (torch CPU)", tokens / t_hf_train,
                 train_flops_per_token(cfg, args.seq) * tokens / t_hf_train / peak,
                 tokens / t_hf_fwd, forward_flops_per_token(cfg, args.seq) * tokens / t_hf_fwd / peak))

  device = jax.devices()[0]
  print(f"\n### model `{args.model}` ({param_count(cfg):,} params), batch {args.batch} x seq {args.seq}, "
        f"{args.dtype} compute\n")
  print(f"machine: {device.platform} / {device.device_kind} x {jax.device_count()}, {platform.processor() or platform.machine()}; "
        f"measured {cfg.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s; train-step compile {compile_s:.1f} s\n")
  print("| implementation | train tokens/s | train MFU | forward tokens/s | forward MFU |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for name, tr, tr_mfu, fw, fw_mfu in rows:
    print(f"| {name} | {tr:,.0f} | {tr_mfu:.1%} | {fw:,.0f} | {fw_mfu:.1%} |")
  if len(rows) == 2:
    print(f"\njaxstages / HF: train {rows[0][1] / rows[1][1]:.2f}x, forward {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
  main()
