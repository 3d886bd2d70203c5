"""Pre-training and mid-training: next-token loss on packed documents.

The two stages share this loss and differ only in data (mid-training: a new mixture, e.g. a new domain plus a replay
fraction of pre-training data) and schedule (mid-training starts from pre-training's final checkpoint and re-warms
the learning rate). Both are configs, not code: see `configs/train.py`.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxstages.losses import next_token_loss


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(summed next-token NLL, counted tokens, no extra metrics). batch: packed rows `[batch, seq]`."""
  total, count = next_token_loss(model, batch)
  return total, count, {}
