"""Scanned layers (`model.scan_layers`): the same model as the list of layers (same init, logits, loss, gradients,
cached decoding), a program whose size does not grow with depth, and a parameter layout that converts both ways
through params folders, stage checkpoints and HF checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstages.losses import next_token_loss
from jaxstages.model import create_model
from jaxstages.model.transformer import convert_layers
from jaxstages.sampling import SamplingConfig, sample


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)
  mean = lambda state: (lambda s, c: s / c)(*next_token_loss(nnx.merge(graphdef, state), batch))
  return jax.jit(jax.value_and_grad(mean))(state)


def _batch(cfg, b=2, t=12):
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  return dict(tokens=tok[:, :-1], targets=tok[:, 1:], loss_mask=np.ones((b, t), np.float32))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_the_layer_list(tiny_cfg, remat):
  cfg = tiny_cfg.replace(remat=remat)
  plain, scanned = create_model(cfg, seed=2), create_model(cfg.replace(scan_layers=True), seed=2)
  # one init: the stacked parameters are the list's, layer by layer
  for i in range(cfg.num_layers):
    np.testing.assert_array_equal(scanned.layers.attn.q[...][i], plain.layers[i].attn.q[...])
  batch = _batch(cfg)
  loss, grads = _loss_and_grads(plain, batch)
  loss_s, grads_s = _loss_and_grads(scanned, batch)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  stacked = convert_layers(nnx.merge(nnx.graphdef(scanned), grads_s), False)  # gradients in the list layout
  for g, r in zip(jax.tree.leaves(nnx.state(stacked)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, r, atol=1e-6)


def test_scanned_model_samples_like_the_layer_list(tiny_cfg):
  greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
  prompts = [[1, 2, 3, 4], [5, 6]]
  plain = sample(create_model(tiny_cfg, seed=1), prompts, greedy)
  scanned = sample(create_model(tiny_cfg.replace(scan_layers=True), seed=1), prompts, greedy)
  np.testing.assert_array_equal(scanned.tokens, plain.tokens)
  np.testing.assert_allclose(scanned.logprobs, plain.logprobs, atol=1e-5)


def test_scanned_program_does_not_grow_with_depth(tiny_cfg):
  """The traced train step of a scanned model is the same size at 2 and 8 layers (so is its compile time); the
  layer list's grows with every layer."""
  def size(cfg):
    model = create_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    batch = _batch(cfg)
    loss = lambda state: next_token_loss(nnx.merge(graphdef, state), batch)[0]
    return len(str(jax.make_jaxpr(jax.grad(loss))(state)).splitlines())

  scanned = [size(tiny_cfg.replace(num_layers=n, scan_layers=True)) for n in (2, 8)]
  plain = [size(tiny_cfg.replace(num_layers=n)) for n in (2, 8)]
  assert scanned[0] == scanned[1], scanned
  assert plain[1] > 2 * plain[0], plain


def test_layouts_convert_through_params_folders(tiny_cfg, tmp_path):
  from jaxstages.model.io import load_params, save_params

  tokens = np.arange(10, dtype=np.int32)[None] % tiny_cfg.vocab_size
  plain = create_model(tiny_cfg, seed=4)
  want = np.asarray(plain(tokens)[0])
  save_params(plain, tmp_path / "plain")
  as_scanned = load_params(tmp_path / "plain", scan_layers=True)
  assert as_scanned.cfg.scan_layers and isinstance(as_scanned.layers.attn.q[...], jax.Array)
  np.testing.assert_allclose(as_scanned(tokens)[0], want, atol=1e-6)
  save_params(as_scanned, tmp_path / "scanned")
  back = load_params(tmp_path / "scanned", scan_layers=False)
  np.testing.assert_allclose(back(tokens)[0], want, atol=1e-6)
  np.testing.assert_allclose(load_params(tmp_path / "scanned")(tokens)[0], want, atol=1e-6)


def test_layouts_convert_through_hf_checkpoints(tiny_cfg, tmp_path):
  pytest.importorskip("safetensors")
  from jaxstages.model.hf import export_hf, import_hf

  tokens = np.arange(10, dtype=np.int32)[None] % tiny_cfg.vocab_size
  scanned = create_model(tiny_cfg.replace(scan_layers=True), seed=6)
  want = np.asarray(scanned(tokens)[0])
  export_hf(scanned, tmp_path / "hf")
  np.testing.assert_allclose(import_hf(tmp_path / "hf")(tokens)[0], want, atol=1e-6)
  again = import_hf(tmp_path / "hf", scan_layers=True)
  assert again.cfg.scan_layers
  np.testing.assert_allclose(again(tokens)[0], want, atol=1e-6)


def test_convert_layers_on_a_mesh_keeps_the_rules(tiny_cfg, devices):
  from jaxstages.sharding import MeshConfig, make_mesh

  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
  plain = create_model(tiny_cfg, seed=3, mesh=mesh)
  scanned = convert_layers(plain, True, mesh)
  q = scanned.layers.attn.q[...]
  assert q.shape[0] == tiny_cfg.num_layers
  assert q.sharding.spec[0] is None and q.sharding.spec[1] == "fsdp"  # [layers, embed, heads, head_dim]
  tokens = jnp.zeros((8, 6), jnp.int32)
  np.testing.assert_allclose(scanned(tokens)[0], plain(tokens)[0], atol=1e-6)


def test_a_stage_checkpoint_loads_into_the_other_layout(tiny_cfg, tmp_path, devices):
  """A stage folder trained with the layer list loads as a scanned model (and back), its config naming the layout
  it was saved in."""
  import dataclasses
  import json
  import shutil
  from pathlib import Path

  import optax

  from jaxstages.checkpoint import Checkpointer
  from jaxstages.model.io import load_model
  from jaxstages.sharding import MeshConfig, make_mesh
  from jaxstages.state import init_train_state

  cfg = tiny_cfg.replace(vocab_size=768)  # at least the committed tokenizer's vocabulary (748)
  committed = Path(__file__).resolve().parents[1] / "experiments/artifacts/toy-sft/tokenizer"
  shutil.copytree(committed, tmp_path / "tokenizer")
  mesh = make_mesh(MeshConfig(8, 1, 1))
  tokens = np.arange(12, dtype=np.int32)[None] % cfg.vocab_size
  for saved_scanned in (False, True):
    folder = tmp_path / f"stage-{saved_scanned}"
    folder.mkdir()
    shutil.copytree(tmp_path / "tokenizer", folder / "tokenizer")
    saved_cfg = cfg.replace(scan_layers=saved_scanned)
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(saved_cfg)}))
    model = create_model(saved_cfg, seed=7, mesh=mesh)
    want = np.asarray(model(tokens)[0])
    _, state, _ = init_train_state(model, optax.sgd(1.0), mesh)
    ckpt = Checkpointer(folder / "checkpoints", save_every=1)
    ckpt.save(type(state)(state.params, state.opt_state, state.step + 1, state.rng))
    ckpt.wait()
    ckpt.close()
    other = load_model(folder, make_mesh(MeshConfig(2, 2, 2)), model_cfg=cfg.replace(scan_layers=not saved_scanned))
    assert other.cfg.scan_layers == (not saved_scanned)
    np.testing.assert_allclose(other(tokens)[0], want, atol=1e-6)
