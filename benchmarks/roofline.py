"""Train-step MFU and decode tokens/s against the device's roofline, for the accelerator model shapes.

  python benchmarks/roofline.py [--models qwen2.5-0.5b,interplay-100m] [--seq 4096] [--batch 1] [--decode-batch 64]
                                [--prompt-len 1024] [--new 128] [--dtype bfloat16] [--set attention=cudnn ...]
  python benchmarks/roofline.py --tiny        # the same code at tiny shapes: runs on a CPU in seconds

On the first device JAX finds:
- **train step**: forward, backward and an AdamW update of `--batch` rows of `--seq` tokens (bf16 compute over float32
  master weights, the model's `attention` / `logits_chunk` / `scan_layers` / `remat` as configured); MFU = model
  FLOPs (`jaxstages.flops.train_flops_per_token`: matmuls, attention at full seq x seq, backward = 2 x forward) per
  second over the chip's peak dense bf16 FLOP/s.
- **decode**: `--decode-batch` rows prefilled with `--prompt-len` tokens, then `--new` greedy one-token steps with the
  KV cache (one jitted `lax.scan`; params stored in the compute dtype, as for serving). Each step must read every
  parameter once and the filled part of every row's cache, so the memory roofline is
  `batch x HBM bandwidth / (param bytes + mean KV bytes)` tokens/s; the compute roofline is peak FLOP/s over the
  forward FLOPs per token. Printed is the lower of the two (at batch 64 on an accelerator: memory) and the share of
  it reached.

Peak FLOP/s and HBM bandwidth come from `CHIPS` (datasheet numbers of known accelerators, matched on the start of
`device_kind`); on anything else (a CPU) both are measured: a jitted square matmul of the compute dtype and a
reduction over a 512 MiB array. Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak, timed  # noqa: E402

from jaxstages.flops import forward_flops_per_token, train_flops_per_token  # noqa: E402
from jaxstages.losses import next_token_loss  # noqa: E402
from jaxstages.model import KVCache, create_model, model_config, param_count  # noqa: E402
from jaxstages.model.transformer import convert_layers  # noqa: E402
from jaxstages.sharding import MeshConfig, make_mesh  # noqa: E402
from jaxstages.state import init_train_state  # noqa: E402
from jaxstages.train import make_train_step  # noqa: E402

# device_kind prefix -> (peak dense bf16 FLOP/s, HBM bytes/s), datasheet values; longest matching prefix wins
CHIPS = {
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H100": (989e12, 3.35e12),  # SXM5 80 GB
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA GH200": (989e12, 4.0e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100": (312e12, 2.039e12),  # 80 GB
    "NVIDIA L4": (121e12, 0.3e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5e": (197e12, 0.819e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "TPU v6e": (918e12, 1.64e12),
}


def chip_peaks(device: jax.Device, dtype) -> tuple[float, float, str]:
  """(peak FLOP/s, HBM bytes/s, where they came from) of `device`."""
  kind = device.device_kind
  match = max((k for k in CHIPS if kind.startswith(k)), key=len, default=None)
  if match:
    return (*CHIPS[match], f"datasheet ({match})")
  x = jnp.ones((2**27,), jnp.float32)  # 512 MiB
  reduce = jax.jit(jnp.sum)
  bandwidth = x.nbytes / timed(lambda: reduce(x).block_until_ready(), 5)
  return matmul_peak(dtype), bandwidth, "measured (matmul, reduction)"


def shape(name: str, tiny: bool, overrides: dict):
  cfg = model_config(name)
  if tiny:  # the name's head layout at toy width and depth, a small vocabulary
    width = cfg.num_heads * 16
    overrides = dict(dict(num_layers=2, hidden_size=width, head_dim=16, intermediate_size=4 * width, vocab_size=1024,
                          max_position_embeddings=4096), **overrides)
  return cfg.replace(**overrides)


def train_mfu(cfg, batch: int, seq: int, peak: float, repeats: int) -> dict:
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  model = create_model(cfg.replace(param_dtype="float32"), seed=0, mesh=mesh)
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = dict(tokens=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
              loss_mask=jnp.ones((batch, seq), jnp.float32))
  optimizer = optax.adamw(1e-4)
  graphdef, state, shardings = init_train_state(model, optimizer, mesh)
  step = make_train_step(graphdef, optimizer, lambda m, b: (*next_token_loss(m, b), {}), mesh, shardings)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], data)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  seconds = timed(run, repeats, warmup=1)
  flops = train_flops_per_token(cfg, seq) * batch * seq
  return {"tokens_per_s": batch * seq / seconds, "mfu": flops / seconds / peak, "step_s": seconds,
          "compile_s": compile_s}


def decode_roofline(cfg, batch: int, prompt_len: int, new: int, bandwidth: float, peak: float, repeats: int) -> dict:
  cfg = cfg.replace(param_dtype=cfg.dtype)  # weights served in the compute dtype
  model = create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  cache_len = prompt_len + new
  rng = np.random.default_rng(1)
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32))

  @jax.jit
  def prefill(params, prompts):
    logits, cache = nnx.merge(graphdef, params)(prompts, cache=KVCache.init(cfg, batch, cache_len))
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  @jax.jit
  def decode(params, token, cache):
    model = convert_layers(nnx.merge(graphdef, params), False)  # as the sampler does: layers sliced once

    def one(carry, _):
      token, cache = carry
      logits, cache = model(token[:, None], cache=cache)
      token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      return (token, cache), token

    return jax.lax.scan(one, (token, cache), None, length=new)[1]

  token, cache = prefill(params, prompts)
  decode(params, token, cache).block_until_ready()  # compile
  seconds = timed(lambda: decode(params, token, cache).block_until_ready(), repeats, warmup=1)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  mean_filled = prompt_len + (new + 1) / 2
  bytes_per_step = param_bytes + batch * kv_per_token * mean_filled
  memory_roof = batch * bandwidth / bytes_per_step  # tokens/s if each step only streamed its bytes
  compute_roof = peak / forward_flops_per_token(cfg, int(mean_filled))  # tokens/s if each step only did its FLOPs
  roofline = min(memory_roof, compute_roof)
  tokens_per_s = batch * new / seconds
  return {"tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roofline, "share": tokens_per_s / roofline,
          "bound": "memory" if memory_roof <= compute_roof else "compute", "step_ms": 1e3 * seconds / new,
          "bytes_per_step": bytes_per_step}


def _value(text: str):
  """A command-line value as a Python literal (512, True), else the string itself (cudnn)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="qwen2.5-0.5b,interplay-100m")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=1, help="train rows per step")
  parser.add_argument("--decode-batch", type=int, default=64)
  parser.add_argument("--prompt-len", type=int, default=1024)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16, float32 on a CPU)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--set", action="append", default=[], help="a ModelConfig override KEY=VALUE")
  parser.add_argument("--tiny", action="store_true", help="toy width/depth, seq 128, decode batch 4: a CPU check")
  parser.add_argument("--no-train", action="store_true")
  parser.add_argument("--no-decode", action="store_true")
  args = parser.parse_args(argv)
  if args.tiny:
    args.seq, args.batch, args.decode_batch, args.prompt_len, args.new, args.repeats = 128, 2, 4, 32, 8, 2
  device = jax.devices()[0]
  args.dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
  overrides = dict(dtype=args.dtype, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
  if not args.tiny:
    overrides = dict(dict(logits_chunk=1024, scan_layers=True, remat=True), **overrides)
  peak, bandwidth, source = chip_peaks(device, jnp.dtype(args.dtype))
  print(f"\ndevice: {device.platform} / {device.device_kind} ({platform.machine()}); peak {peak / 1e12:,.2f} "
        f"TFLOP/s {args.dtype}, HBM {bandwidth / 1e9:,.0f} GB/s, {source}\n")
  print("| model | params | train batch x seq | train tok/s | MFU | decode batch | prompt + new | decode tok/s | "
        "ms / step | roofline tok/s | share of roofline |")
  print("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
  for name in args.models.split(","):
    cfg = shape(name, args.tiny, overrides)
    t = {} if args.no_train else train_mfu(cfg, args.batch, args.seq, peak, args.repeats)
    d = {} if args.no_decode else decode_roofline(cfg, args.decode_batch, args.prompt_len, args.new, bandwidth, peak,
                                                   args.repeats)
    fmt = lambda r, k, f: f.format(r[k]) if k in r else "-"
    print(f"| {name}{' (tiny)' if args.tiny else ''} | {param_count(cfg):,} | {args.batch} x {args.seq} | "
          f"{fmt(t, 'tokens_per_s', '{:,.0f}')} | {fmt(t, 'mfu', '{:.1%}')} | {args.decode_batch} | "
          f"{args.prompt_len} + {args.new} | {fmt(d, 'tokens_per_s', '{:,.0f}')} | {fmt(d, 'step_ms', '{:.2f}')} | "
          f"{fmt(d, 'roofline_tokens_per_s', '{:,.0f}')} ({d.get('bound', '-')}) | {fmt(d, 'share', '{:.1%}')} |",
          flush=True)


if __name__ == "__main__":
  main()
