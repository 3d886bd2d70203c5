"""The model's end-to-end smoke run: the README's first command until the stage pipeline exists.

On whatever devices are present (one CPU here, every chip of a pod slice there) it
1. builds the ~1M-parameter `toy` model sharded over a `(data, fsdp, tensor)` mesh,
2. trains it with the shared train step (AdamW) for 150 steps on packed rows of counting documents
   (`s, s+1, s+2, ... mod vocab`, two documents per row, separated by segment ids),
3. greedy-decodes continuations with the KV cache (`jaxstages.sampling.sample`) and checks them against
   uncached decoding and the rule,
4. exports to HF safetensors and re-imports, checking the logits match.
Metrics go to `OUT/metrics.jsonl`; a failed check exits non-zero.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstages.sampling import SamplingConfig, greedy_uncached, sample
from jaxstages.metrics import progress
from jaxstages.model import create_model, model_config, param_count
from jaxstages.model.hf import export_hf, import_hf
from jaxstages.optim import OptimConfig, make_optimizer
from jaxstages.sharding import MeshConfig, initialize_distributed, make_mesh, shard_batch
from jaxstages.stages.lm import lm_loss
from jaxstages.state import init_train_state
from jaxstages.train import make_train_step

DOC_LEN = 32


def counting_batch(rng: np.random.Generator, batch: int, vocab: int) -> dict[str, np.ndarray]:
  """Rows of two packed counting documents. `[batch, 2 * DOC_LEN]` each."""
  starts = rng.integers(0, vocab, size=(batch, 2))
  docs = (starts[:, :, None] + np.arange(DOC_LEN + 1)) % vocab  # one extra token for the target
  tokens = docs[:, :, :-1].reshape(batch, -1)
  targets = docs[:, :, 1:].reshape(batch, -1)
  segment_ids = np.repeat(np.array([1, 2]), DOC_LEN)[None].repeat(batch, 0)
  positions = np.tile(np.arange(DOC_LEN), 2)[None].repeat(batch, 0)
  return dict(tokens=tokens.astype(np.int32), targets=targets.astype(np.int32),
              loss_mask=np.ones_like(tokens, np.float32), segment_ids=segment_ids.astype(np.int32),
              positions=positions.astype(np.int32))


def main(steps: int = 150, out_dir: str = "runs/smoke", batch_size: int = 16, seed: int = 0) -> dict:
  initialize_distributed()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  cfg = model_config("toy")
  mesh = make_mesh(MeshConfig())
  batch_size = max(batch_size, len(jax.devices()))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}; "
        f"model toy ({param_count(cfg):,} params)")

  # the shared train step every stage uses, with the next-token loss of pre-training
  optimizer, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_fraction=0.1, weight_decay=0.01), steps)
  graphdef, state, shardings = init_train_state(create_model(cfg, seed, mesh), optimizer, mesh, seed)
  train_step = make_train_step(graphdef, optimizer, lm_loss, mesh, shardings, schedule)

  rng = np.random.default_rng(seed)
  metrics = []
  start = time.time()
  with open(out / "metrics.jsonl", "w") as log:
    bar = progress(steps, "smoke train")
    for step in range(1, steps + 1):
      state, step_metrics = train_step(state, shard_batch(counting_batch(rng, batch_size, cfg.vocab_size), mesh))
      if step % 10 == 0 or step == 1:  # the only host syncs
        row = {"step": step, "loss": float(step_metrics["loss"]), "grad_norm": float(step_metrics["grad_norm"]),
               "time_s": time.time() - start}
        metrics.append(row)
        log.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}")
      bar.update(1)
  bar.close()
  model = nnx.merge(graphdef, state.params)

  starts = rng.integers(0, cfg.vocab_size, size=(8,))
  prompt = jnp.asarray((starts[:, None] + np.arange(4)) % cfg.vocab_size, jnp.int32)
  greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
  cached = np.asarray(sample(model, np.asarray(prompt).tolist(), greedy).tokens)
  uncached = np.asarray(greedy_uncached(model, prompt, 12))
  expected = (starts[:, None] + 4 + np.arange(12)) % cfg.vocab_size
  rule_accuracy = float((cached == expected).mean())

  with tempfile.TemporaryDirectory() as tmp:
    export_hf(model, tmp)
    reloaded = import_hf(tmp)
    tokens = np.asarray(prompt)
    roundtrip_diff = float(np.abs(np.asarray(model(tokens)[0]) - np.asarray(reloaded(tokens)[0])).max())

  summary = {"first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
             "cached_equals_uncached": bool((cached == uncached).all()),
             "counting_accuracy": rule_accuracy, "hf_roundtrip_max_abs_diff": roundtrip_diff,
             "train_seconds": metrics[-1]["time_s"]}
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  print(json.dumps(summary, indent=2))
  ok = (summary["final_loss"] < 0.5 * summary["first_loss"] and summary["cached_equals_uncached"]
        and roundtrip_diff < 1e-5)
  if not ok:
    print("smoke run FAILED", file=sys.stderr)
    sys.exit(1)
  print(f"smoke run passed; metrics in {out / 'metrics.jsonl'}")
  return summary
