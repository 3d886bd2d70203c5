"""Generated tokens/s of the sampler (`jaxstages.sampling.sample`) next to the same model decoded without a KV cache
and HF transformers `generate` on the same weights, for several batch sizes in one run; then what sharing one
prefill across a GRPO group saves against prefilling n copies of the prompt.

  python benchmarks/sampling_throughput.py [--model toy] [--batches 1,16,128] [--prompt-len 64] [--new 64]
  python benchmarks/sampling_throughput.py --reshard --host-devices 8   # + the cost of resharding params per call
  python benchmarks/sampling_throughput.py --kernels --model toy           # decode attention and token choice

Every decoder generates exactly `--new` tokens per row greedily (no stop tokens), so all three do the same work.
Compile time is reported apart from the timed (warm) calls. Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

if "--host-devices" in sys.argv:  # simulated CPU devices must be requested before jax is imported
  count = sys.argv[sys.argv.index("--host-devices") + 1]
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"

import jax
import numpy as np
from flax import nnx

from jaxstages.model import create_model, model_config, param_count
from jaxstages.model.hf import export_hf
from jaxstages import sampling
from jaxstages.sampling import SamplingConfig, greedy_uncached, sample, without_fsdp
from jaxstages.sharding import MeshConfig, make_mesh
from train_throughput import timed  # noqa: E402  (this folder is on sys.path when a benchmark runs as a script)


def first_call(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="toy")
  parser.add_argument("--batches", default="1,16,128")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--group", type=int, default=8, help="GRPO group size for the shared-prefill comparison")
  parser.add_argument("--group-prompt-len", type=int, default=512)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--reshard", action="store_true",
                      help="also time sampling with params resharded from FSDP x tensor to tensor-only per call")
  parser.add_argument("--host-devices", type=int, default=None, help="simulated CPU devices (for --reshard)")
  parser.add_argument("--kernels", action="store_true",
                      help="only the decode step's attention kernels side by side (an evaluation's shape: 64 prompts "
                           "x 64 samples at temperature 1)")
  args = parser.parse_args()
  if args.reshard:
    reshard_cost(args)
    return
  if args.kernels:
    decode_kernels(args)
    return

  cfg = model_config(args.model, max_position_embeddings=max(2048, args.group_prompt_len + args.new))
  model = create_model(cfg, seed=0)
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  print(f"\nmachine: {device.platform} / {device.device_kind}, {os.cpu_count()} cores, {platform.machine()}; "
        f"model {args.model} ({param_count(cfg):,} params), prompt {args.prompt_len} tokens, {args.new} new tokens "
        f"per row, greedy, float32\n")
  hf = None
  if not args.no_torch:
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tmp = tempfile.TemporaryDirectory()
    export_hf(model, tmp.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()

  print("| batch | jaxstages tok/s | uncached tok/s | HF generate tok/s | jaxstages / uncached | jaxstages / HF | "
        "jaxstages first call s | uncached first call s |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  scfg = SamplingConfig(max_new_tokens=args.new, temperature=0.0, prompt_buckets=(args.prompt_len,))
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
    as_lists = prompts.tolist()
    run_ours = lambda: jax.block_until_ready(sample(model, as_lists, scfg).tokens)
    ours_compile = first_call(run_ours)
    t_ours = timed(run_ours, args.repeats, warmup=0)
    run_uncached = lambda: jax.block_until_ready(greedy_uncached(model, prompts, args.new))
    unc_compile = first_call(run_uncached)
    t_unc = timed(run_uncached, max(1, args.repeats - 1), warmup=0)
    ours_tokens = np.asarray(sample(model, as_lists, scfg).tokens)
    assert (ours_tokens == np.asarray(greedy_uncached(model, prompts, args.new))).mean() > 0.99, "decoders disagree"
    t_hf = None
    if hf is not None:
      import torch

      ids = torch.tensor(prompts, dtype=torch.long)

      def run_hf():
        with torch.no_grad():
          hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                      do_sample=False, use_cache=True, pad_token_id=0)

      run_hf()
      t_hf = timed(run_hf, args.repeats, warmup=0)
    tokens = batch * args.new
    hf_cell = f"{tokens / t_hf:,.0f}" if t_hf else "-"
    hf_ratio = f"{t_hf / t_ours:.1f}x" if t_hf else "-"
    print(f"| {batch} | {tokens / t_ours:,.0f} | {tokens / t_unc:,.0f} | {hf_cell} | {t_unc / t_ours:.1f}x | "
          f"{hf_ratio} | {ours_compile:.1f} | {unc_compile:.1f} |")

  # one prefill per group vs n copies of each prompt
  g, plen = args.group, args.group_prompt_len
  prompts = rng.integers(1, cfg.vocab_size, (128 // g, plen)).astype(np.int32).tolist()
  grouped = SamplingConfig(max_new_tokens=args.new, temperature=1.0, n=g, prompt_buckets=(plen,))
  copies = SamplingConfig(max_new_tokens=args.new, temperature=1.0, n=1, prompt_buckets=(plen,))
  run_grouped = lambda: jax.block_until_ready(sample(model, prompts, grouped).tokens)
  run_copies = lambda: jax.block_until_ready(sample(model, [p for p in prompts for _ in range(g)], copies).tokens)
  first_call(run_grouped)
  first_call(run_copies)
  t_g, t_c = timed(run_grouped, args.repeats, warmup=0), timed(run_copies, args.repeats, warmup=0)
  print(f"\nGRPO groups: {len(prompts)} prompts of {plen} tokens x {g} samples, {args.new} new tokens each, "
        f"temperature 1")
  print("\n| prefill | seconds per call | generated tok/s |\n| --- | ---: | ---: |")
  rows = len(prompts) * g * args.new
  print(f"| once per prompt, cache shared by its {g} samples | {t_g:.3f} | {rows / t_g:,.0f} |")
  print(f"| once per row ({g} copies of each prompt) | {t_c:.3f} | {rows / t_c:,.0f} |")
  print(f"\nshared prefill: {t_c / t_g:.2f}x faster")


def decode_kernels(args) -> None:
  """The sampler with each attention kernel for one-token decoding on the same weights and seed: 64 prompts x 64
  samples at temperature 1 (an evaluation's batch), `--new` tokens per row; then the decode kernel with the token
  choice done by `jax.random.categorical` in place of `jaxstages.sampling.categorical`. The samples must be the same."""
  base = model_config(args.model)
  params = nnx.state(create_model(base, seed=0), nnx.Param)
  prompts = np.random.default_rng(0).integers(1, base.vocab_size, (64, args.prompt_len)).tolist()
  scfg = SamplingConfig(max_new_tokens=args.new, temperature=1.0, n=64, prompt_buckets=(args.prompt_len,))
  print(f"\nmodel {args.model} ({param_count(base):,} params), 64 prompts of {args.prompt_len} tokens x 64 samples, "
        f"{args.new} new tokens per row, temperature 1, float32\n")
  print("| decode attention | token choice | seconds per call | generated tok/s | samples equal the first row's |")
  print("| --- | --- | ---: | ---: | --- |")
  reference, times = None, []
  ours = sampling.categorical
  for impl, choice in (("einsum", ours), ("decode", ours), ("decode", jax.random.categorical)):
    sampling.categorical = choice  # read when the sampler is traced: clear the compiled calls so it is re-traced
    jax.clear_caches()
    model = create_model(base.replace(attention=impl), seed=0)
    nnx.update(model, params)
    run = lambda: jax.block_until_ready(sample(model, prompts, scfg, seed=1).tokens)
    tokens = np.asarray(run())
    reference = tokens if reference is None else reference
    times.append(timed(run, args.repeats, warmup=0))
    name = "jaxstages.sampling.categorical" if choice is ours else "jax.random.categorical"
    print(f"| {impl} | {name} | {times[-1]:.2f} | {64 * 64 * args.new / times[-1]:,.0f} | "
          f"{np.array_equal(tokens, reference)} |")
  sampling.categorical = ours
  print(f"\ndecode kernel: {times[0] / times[1]:.2f}x the einsum's speed; the sampler's categorical: "
        f"{times[2] / times[1]:.2f}x jax.random.categorical's")


def reshard_cost(args) -> None:
  """Sampling on an FSDP x tensor training layout as is, against resharding the params to tensor-only inside the
  jitted call (the trainer -> sampler weight move), on all devices."""
  n = jax.device_count()
  mesh = make_mesh(MeshConfig(data=1, fsdp=n // 2, tensor=2))
  cfg = model_config(args.model)
  model = create_model(cfg, seed=0, mesh=mesh)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (16 * (n // 2), args.prompt_len)).tolist()
  scfg = SamplingConfig(max_new_tokens=args.new, temperature=0.0, prompt_buckets=(args.prompt_len,))
  as_is = lambda: jax.block_until_ready(sample(model, prompts, scfg, mesh=mesh).tokens)
  moved = lambda: jax.block_until_ready(sample(model, prompts, scfg, mesh=mesh, sampler_rules=without_fsdp()).tokens)
  first_call(as_is)
  first_call(moved)
  t_as_is, t_moved = timed(as_is, args.repeats, warmup=0), timed(moved, args.repeats, warmup=0)
  print(f"\n{n} devices, mesh {dict(mesh.shape)}, model {args.model}, {len(prompts)} prompts x {args.new} tokens\n")
  print("| params during sampling | seconds per call |\n| --- | ---: |")
  print(f"| as trained (FSDP x tensor: weights gathered every decode step) | {t_as_is:.3f} |")
  print(f"| resharded to tensor-only once per call, inside jit | {t_moved:.3f} |")


if __name__ == "__main__":
  main()
