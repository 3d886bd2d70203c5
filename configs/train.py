"""Single-stage training configs: `jaxstages train --config configs/train.py:pretrain-toy --workdir runs/pre`.

A config has five blocks: `stage` (jaxstages.train.StageConfig), `model` (jaxstages.model.ModelConfig; vocab_size 0
means "the tokenizer's, rounded up to 128"), `data` (jaxstages.data.pipeline.DataConfig), `optim`
(jaxstages.optim.OptimConfig) and `mesh` (jaxstages.sharding.MeshConfig), plus the options block of stage kinds that
have one (`dpo`: jaxstages.stages.dpo.DPOConfig, `distill`: jaxstages.stages.distill.DistillConfig). Every key is
checked; override any of them on the command line with `--config.optim.lr=1e-3`.
"""

import dataclasses

import ml_collections

from jaxstages.config import load_config
from jaxstages.data.pipeline import data_config
from jaxstages.optim import OptimConfig
from jaxstages.sharding import MeshConfig
from jaxstages.stages.distill import DistillConfig
from jaxstages.stages.dpo import DPOConfig
from jaxstages.train import StageConfig


def _config(stage, model, data, optim, mesh=None, **objective):
  """Every block spelled out in full (defaults included), so any key can be overridden from the command line.
  `objective`: the stage kind's own block, e.g. `dpo=DPOConfig(...)`."""
  model = dict(load_config(f"models.py:{model}").to_dict(), vocab_size=0)
  mesh = dataclasses.asdict(MeshConfig(**(mesh or {})))
  mesh.pop("rules")  # the default rule table; set mesh.rules in a config to change it
  return ml_collections.ConfigDict(dict(
      stage=dataclasses.asdict(StageConfig(**stage)), model=model,
      data=dataclasses.asdict(data_config(f"data.py:{data}")), optim=dataclasses.asdict(OptimConfig(**optim)),
      mesh=mesh, **{k: dataclasses.asdict(v) for k, v in objective.items()}))


def get_config(name: str = "pretrain-toy") -> ml_collections.ConfigDict:
  if name == "pretrain-toy":
    # the ~1M toy model on the symbolic task world (context p, with q seeded at 1% at op 2)
    # many small steps at a constant lr (WSD) learn the task world fastest in ~9 CPU minutes (README, "Learnability")
    cfg = _config(dict(name="pretrain", kind="pretrain", steps=2800, log_every=50, checkpoint_every=700,
                       eval_every=700, eval_batches=8),
                  "toy", "pretrain-symbolic",
                  dict(lr=2e-3, schedule="wsd", warmup_fraction=0.05, decay_fraction=0.2, end_lr_ratio=0.1,
                       weight_decay=0.1))
    cfg.data.seq_len, cfg.data.batch_size = 256, 8
    return cfg
  if name == "midtrain-toy":
    # from pre-training's final checkpoint: the new context q at growing share, with replay; re-warmed lr
    cfg = _config(dict(name="midtrain", kind="midtrain", steps=500, log_every=20, checkpoint_every=250,
                       eval_every=250, eval_batches=8, init_from="runs/pretrain-toy"),
                  "toy", "midtrain-symbolic",
                  dict(lr=1e-3, schedule="cosine", warmup_fraction=0.15, init_lr=3e-4, end_lr_ratio=0.1))
    cfg.data.seq_len, cfg.data.batch_size = 256, 32
    return cfg
  if name == "sft-toy":
    # chats with the think on / off / plain mix, loss on the assistant turns, from pre-training's final checkpoint
    cfg = _config(dict(name="sft", kind="sft", steps=400, log_every=20, checkpoint_every=200, eval_every=200,
                       eval_batches=8, init_from="runs/pretrain-toy"),
                  "toy", "sft-symbolic",
                  dict(lr=1e-3, schedule="cosine", warmup_fraction=0.05, end_lr_ratio=0.1, weight_decay=0.1))
    cfg.data.seq_len = 256
    return cfg
  if name == "dpo-toy":
    # sigmoid DPO on gold vs. one-step-perturbed solutions, from the SFT checkpoint (the reference)
    cfg = _config(dict(name="dpo", kind="dpo", steps=200, log_every=10, checkpoint_every=100, eval_every=50,
                       eval_batches=4, init_from="runs/sft-toy"),
                  "toy", "preference-symbolic", dict(lr=1e-4, schedule="constant", warmup_fraction=0.05,
                                                     weight_decay=0.0),
                  dpo=DPOConfig(loss="sigmoid", beta=0.1))
    return cfg
  if name == "distill-toy":
    # the toy SFT model as teacher of a half-size student, off-policy on the SFT data (forward KL)
    cfg = _config(dict(name="distill", kind="distill", steps=400, log_every=20, checkpoint_every=200,
                       eval_every=200, eval_batches=8),
                  "toy-small", "sft-symbolic",
                  dict(lr=2e-3, schedule="cosine", warmup_fraction=0.05, end_lr_ratio=0.1, weight_decay=0.1),
                  distill=DistillConfig(teacher="runs/sft-toy", divergence="forward_kl"))
    cfg.data.seq_len = 256
    return cfg
  import difflib
  names = ["pretrain-toy", "midtrain-toy", "sft-toy", "dpo-toy", "distill-toy"]
  raise KeyError(f"unknown training config {name!r}; did you mean {difflib.get_close_matches(name, names)}? "
                 f"Known: {names}")
