"""jaxstages: train decoder LLMs through pretrain, mid-train, SFT, RL, DPO and distillation, in JAX.

The modules form layers: each imports only from its own layer or the ones below it, the imports within a layer form
no cycle, and no module imports inside a function, except the optional heavy dependencies (`OPTIONAL_IMPORTS`:
torch, transformers, tokenizers, matplotlib, tensorboardX), which load only when used. `tests/test_layers.py` reads
the table below and enforces it. Bottom to top:

  layer  name        modules
  1      base        host, config, metrics, runfolder, sharding, state, optim, checkpoint
  2      data        data, data.tasks, data.tokenizer, data.pipeline, rewards
  3      model       model, model.config, model.attention, model.transformer, model.hf, model.io, flops, losses
  4      forwards    sampling, apply
  5      evaluation  evaluation
  6      stages      stages, stages.objective, stages.lm, stages.sft, stages.grpo, stages.ppo, stages.rl, stages.dpo,
                     stages.distill
  7      loop        train
  8      drivers     schedule, smoke
  9      cli         cli

- base: the host's C allocator set up for XLA:CPU (`host`, run on import), configs, metrics files and progress, run
  folders (one writer's lock, safe names, a failed start undone), meshes and shardings, the train state, the
  optimizer, and checkpoints of train states (orbax; a stage's params alone for the hand-off, `restore_params`,
  checked against their manifests).
- data: the synthetic task world, tokenizers, grain pipelines, and the verifier's rewards.
- model: the decoder, HF import / export, and loading any model folder (`model.io`: `load_model`, `load_stage`,
  `export_stage`); FLOP counts of a model; every loss building block and divergence (`losses`: token log-probs,
  KL estimators, forward / reverse KL, JSD).
- forwards: the sampler and jitted forwards over a batch (`apply.make_apply`: log-probs, values).
- evaluation: pass@k tables and the KL drift of a policy from a reference.
- stages: one objective each (`stages.OBJECTIVES`), built on the layers below, never on the loop.
- loop: the train step and `run_stage`; then the pipeline of stages with its report card (`schedule`), the smoke
  run, and the command line.

A package's `__init__` may import its own modules (the package re-exports them); importing `jaxstages.x.y` runs the
`__init__`s above it, which is no edge of the table. This one re-exports the model.
"""

__version__ = "0.1.0"
from jaxstages import host

host.keep_freed_memory()  # before XLA's threads first allocate: see jaxstages/host.py

from jaxstages.model.config import ModelConfig, model_config, param_count
from jaxstages.model.transformer import KVCache, Transformer, create_model

OPTIONAL_IMPORTS = ("torch", "transformers", "tokenizers", "matplotlib", "tensorboardX")

__all__ = ["KVCache", "ModelConfig", "Transformer", "create_model", "model_config", "param_count"]
