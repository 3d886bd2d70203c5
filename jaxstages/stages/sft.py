"""Supervised fine-tuning: next-token loss on packed chats, trained only where the pipeline's `loss_mask` is 1.

The mask is the data's business (`jaxstages.data.pipeline`, `loss_on="assistant"`: the assistant turns and their
closing `<|im_end|>`; `"all"`: every token), so SFT adds only the choice of normalisation:

- `sft` (per token, as TRL and nanochat do; the same loss as pre-training, `lm.lm_loss`): sum of the NLL over every
  trained token of the global batch / their count. Long answers weigh more.
- `sft-per-sequence`: each conversation's mean NLL, summed over conversations / the number of conversations in the
  global batch. Every conversation weighs the same, whatever its length (what a per-example mean over an unpacked
  batch gives).

Both are `(sum, count)` pairs, so neither depends on how the batch is split into micro-batches or over devices; a
conversation never spans two rows (SFT packs with `overflow="drop"` or `"truncate"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstages.losses import model_token_log_probs


def per_sequence_nll(nll: jax.Array, mask: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over conversations of their mean NLL, number of conversations with a trained token). All inputs
  `[batch, seq]`; conversations are the non-zero segment ids of each row."""
  num = segment_ids.shape[1] + 1

  def row(nll, mask, seg):
    sums = jax.ops.segment_sum(nll * mask, seg, num_segments=num)[1:]
    counts = jax.ops.segment_sum(mask, seg, num_segments=num)[1:]
    has = counts > 0
    return jnp.sum(jnp.where(has, sums / jnp.maximum(counts, 1.0), 0.0)), jnp.sum(has.astype(jnp.float32))

  sums, counts = jax.vmap(row)(nll, mask, segment_ids)
  return jnp.sum(sums), jnp.sum(counts)


def sft_per_sequence_loss(model: nnx.Module, batch: dict[str, jax.Array]
                          ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Per-sequence normalisation: (sum of per-conversation mean NLLs, number of conversations, trained tokens)."""
  nll = -model_token_log_probs(model, batch["tokens"], batch["targets"], batch.get("positions"),
                               batch.get("segment_ids"))
  mask = batch["loss_mask"].astype(jnp.float32)
  total, count = per_sequence_nll(nll, mask, batch["segment_ids"])
  return total, count, {"trained_tokens": jnp.sum(mask)}
