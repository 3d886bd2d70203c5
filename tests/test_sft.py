"""SFT losses: per-token and per-sequence normalisation against NumPy, and both independent of micro-batching."""


import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxstages.losses import token_log_probs
from jaxstages.model import create_model
from jaxstages.sharding import MeshConfig, make_mesh, shard_batch
from jaxstages.stages import LOSSES
from jaxstages.stages.sft import per_sequence_nll
from jaxstages.state import init_train_state
from jaxstages.train import make_train_step


def packed_chats(vocab, rows=8, seq=32, seed=0):
  """Rows packed with 1-3 conversations of very different lengths; trained tokens only in parts of each."""
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
  seg = np.zeros((rows, seq), np.int32)
  pos = np.zeros((rows, seq), np.int32)
  mask = np.zeros((rows, seq), np.float32)
  for r in range(rows):
    start = 0
    for s in range(1, rng.integers(1, 4) + 1):
      n = int(rng.integers(3, 16))
      if start + n > seq:
        break
      seg[r, start:start + n], pos[r, start:start + n] = s, np.arange(n)
      answer = int(rng.integers(1, n))  # the last `answer` tokens are the assistant's
      mask[r, start + n - answer:start + n] = 1
      start += n
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=mask, segment_ids=seg, positions=pos)


def numpy_per_sequence(nll, mask, seg):
  total, count = 0.0, 0
  for r in range(nll.shape[0]):
    for s in set(seg[r].tolist()) - {0}:
      m = (seg[r] == s) * mask[r]
      if m.sum():
        total += (nll[r] * m).sum() / m.sum()
        count += 1
  return total, count


def test_per_sequence_nll_equals_numpy():
  rng = np.random.default_rng(1)
  batch = packed_chats(50, seed=1)
  nll = rng.random(batch["loss_mask"].shape).astype(np.float32) * 5
  total, count = per_sequence_nll(jnp.asarray(nll), jnp.asarray(batch["loss_mask"]), jnp.asarray(batch["segment_ids"]))
  ref_total, ref_count = numpy_per_sequence(nll, batch["loss_mask"], batch["segment_ids"])
  assert int(count) == ref_count and abs(float(total) - ref_total) < 1e-4


@pytest.fixture(scope="module")
def wide_model_cfg(tiny_cfg):
  return tiny_cfg.replace(init_std=0.3)  # spread per-token losses so the normalisations differ clearly


# "sft" is the LM loss, whose micro-batch independence test_train_step checks; its value is checked below
@pytest.mark.parametrize("kind", ["sft-per-sequence"])
def test_sft_losses_equal_numpy_and_do_not_depend_on_micro_batches(kind, wide_model_cfg, devices):
  batch = packed_chats(wide_model_cfg.vocab_size)
  model = create_model(wide_model_cfg, seed=0)
  logits, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
  nll = -np.asarray(token_log_probs(logits, jnp.asarray(batch["targets"])))
  if kind == "sft":
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  else:
    total, count = numpy_per_sequence(nll, batch["loss_mask"], batch["segment_ids"])
    expected = total / count
  losses, norms = [], []
  for micro in (1, 4):
    mesh = make_mesh(MeshConfig(1, 1, 1), devices[:1])
    optimizer = optax.sgd(1.0)
    graphdef, state, shardings = init_train_state(create_model(wide_model_cfg, seed=0, mesh=mesh), optimizer, mesh)
    step = make_train_step(graphdef, optimizer, LOSSES[kind], mesh, shardings, micro_batches=micro)
    _, metrics = step(state, shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(norms, norms[0], rtol=1e-5)


def test_the_two_normalisations_differ_on_uneven_conversations(wide_model_cfg):
  batch = {k: jnp.asarray(v) for k, v in packed_chats(wide_model_cfg.vocab_size).items()}
  model = create_model(wide_model_cfg, seed=0)
  per_token = LOSSES["sft"](model, batch)
  per_seq = LOSSES["sft-per-sequence"](model, batch)
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  nll, mask = -np.asarray(token_log_probs(logits, batch["targets"])), np.asarray(batch["loss_mask"])
  np.testing.assert_allclose(float(per_token[0] / per_token[1]), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  assert abs(float(per_token[0] / per_token[1]) - float(per_seq[0] / per_seq[1])) > 1e-2
  assert float(per_seq[2]["trained_tokens"]) == float(per_token[1])
