"""FLOP counts from the config against XLA's own cost analysis of the compiled step."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxstages.flops import forward_flops_per_token, train_flops_per_token
from jaxstages.losses import next_token_loss
from jaxstages.model import create_model, model_config


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("name,batch,seq", [("toy", 4, 128), ("tiny", 8, 64)])
def test_flops_match_xla_cost_analysis(name, batch, seq):
  # The einsum attention computes the full [seq, seq] scores the formula counts (MFU's convention); "auto" picks the
  # blocked kernel from 128 positions on a CPU, which skips the masked blocks (measured -4.5% at toy 4 x 128).
  cfg = model_config(name, tie_embeddings=name == "toy", qkv_bias=name == "toy", attention="einsum")
  graphdef, state = nnx.split(create_model(cfg))
  data = dict(tokens=jnp.zeros((batch, seq), jnp.int32), targets=jnp.zeros((batch, seq), jnp.int32),
              loss_mask=jnp.ones((batch, seq)))

  def loss_and_grad(state, data):
    return jax.value_and_grad(lambda s: (lambda t, c: t / c)(*next_token_loss(nnx.merge(graphdef, s), data)))(state)

  train = _xla_flops(jax.jit(loss_and_grad).lower(state, data).compile())
  forward = _xla_flops(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, data["tokens"]).compile())
  # XLA also counts the elementwise work (norms, softmax, RoPE) the formula leaves out: measured +1.5% (toy) and
  # +3.3% (tiny) for both the forward and the training step. The output projection alone is 6.7-8.3% of the forward,
  # so the band [0, +5%] fails a formula that forgets it.
  for xla, formula in ((train, train_flops_per_token(cfg, seq)), (forward, forward_flops_per_token(cfg, seq))):
    assert 0.0 <= xla / (formula * batch * seq) - 1 <= 0.05, (name, xla / (formula * batch * seq))
