"""Single-stage training configs: `jaxstages train --config configs/train.py:pretrain-toy --workdir runs/pre`.

A config has five blocks: `stage` (jaxstages.train.StageConfig), `model` (jaxstages.model.ModelConfig; vocab_size 0
means "the tokenizer's, rounded up to 128"), `data` (jaxstages.data.pipeline.DataConfig), `optim`
(jaxstages.optim.OptimConfig) and `mesh` (jaxstages.sharding.MeshConfig), plus the options block of stage kinds that
have one (`dpo`: jaxstages.stages.dpo.DPOConfig, `distill`: jaxstages.stages.distill.DistillConfig, `grpo` and
`ppo`: jaxstages.stages.rl.RLConfig). Every key is
checked; override any of them on the command line with `--config.optim.lr=1e-3`.
"""

import dataclasses

import ml_collections

from jaxstages.config import HASH_NEUTRAL, load_config
from jaxstages.data.pipeline import data_config
from jaxstages.model.config import ModelConfig
from jaxstages.optim import OptimConfig
from jaxstages.sharding import MeshConfig
from jaxstages.stages.distill import DistillConfig
from jaxstages.stages.dpo import DPOConfig
from jaxstages.stages.rl import AdvantageConfig, KLConfig, PolicyLossBlock, RewardConfig, RLConfig, RolloutConfig
from jaxstages.train import StageConfig


# The accelerator presets (interplay, Qwen2.5 shapes) on 8 x 80 GB devices: FSDP over every device; bf16 compute
# (the model size's dtype) over float32 master weights; the platform's fused attention (`auto`); log-probs in
# 1,024-position chunks; layers scanned (compile time flat in depth) and rematerialised. What each compiles to per
# device is in benchmarks/RESULTS.md (`benchmarks/plan_memory.py`).
ACCELERATOR_MESH = dict(data=1, fsdp=-1)
ACCELERATOR_MODEL = dict(attention="auto", logits_chunk=1024, scan_layers=True, remat=True)


def _config(stage, model, data, optim, mesh=None, model_overrides=None, **objective):
  """Every block spelled out in full (defaults included), so any key can be overridden from the command line
  (`--config.model.dtype=bfloat16`, `--config.model.remat=True` on every preset). `objective`: the stage kind's own
  block, e.g. `dpo=DPOConfig(...)`; `model_overrides`: changes to the named model size (vocab_size 0: the
  tokenizer's)."""
  size = load_config(f"models.py:{model}").to_dict()
  # every ModelConfig field the size leaves out, at its default (head_dim stays None: derived from the shape, so an
  # overridden hidden_size or num_heads changes it too); these defaults are hash-neutral (jaxstages.config), so runs
  # named by their config's hash keep their names
  defaults = {k: v for k, v in HASH_NEUTRAL.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
  model = defaults | size | dict(vocab_size=0)
  model.update(model_overrides or {})
  mesh = dataclasses.asdict(MeshConfig(**(mesh or {})))
  mesh.pop("rules")  # the default rule table; set mesh.rules in a config to change it
  return ml_collections.ConfigDict(dict(
      stage=dataclasses.asdict(StageConfig(**stage)), model=model,
      data=dataclasses.asdict(data_config(f"data.py:{data}")), optim=dataclasses.asdict(OptimConfig(**optim)),
      mesh=mesh, **{k: dataclasses.asdict(v) for k, v in objective.items()}))


def get_config(name: str = "pretrain-toy") -> ml_collections.ConfigDict:
  if name == "pretrain-toy":
    # the ~1M toy model on the symbolic task world (context p, with q seeded at 1% at op 2)
    # many small steps at a constant lr (WSD) learn the task world fastest in ~9 CPU minutes (docs/learnability.md)
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
  if name in ("grpo-toy", "ppo-toy"):
    # online RL from the committed SFT model on op-1 prompts (strict pass@1 about a third, greedy): the strict
    # (process-verified) reward, G = 8, a held-out greedy evaluation every 20 steps. configs/recipes/rl.py has the
    # published recipes at this scale and at the interplay study's.
    kind = name.split("-")[0]
    cfg = _config(dict(name=kind, kind=kind, steps=60, log_every=5, checkpoint_every=20, eval_every=20,
                       init_from="experiments/artifacts/toy-sft"),
                  "toy", "rl-toy", dict(lr=3e-4, schedule="constant", warmup_fraction=0.0, weight_decay=0.0),
                  **{kind: RLConfig(rollout=RolloutConfig(group_size=8, max_new_tokens=40),
                                    reward=RewardConfig(score="strict"),
                                    advantage=AdvantageConfig(estimator="gae" if kind == "ppo" else "grpo"),
                                    eval_problems=64)})
    return cfg
  if name in ("pretrain-interplay", "midtrain-interplay"):
    # the interplay study's pre-training (~10B tokens, op 2-10) and CPT (80% op 11-14): the ~100M Qwen2-shape model,
    # lr 1e-4 cosine to 3e-5, warmup 5% (CPT 15%), weight decay 0.1, clip 1.0 (shared REFERENCES); steps for
    # 512k-token steps: 19,000 = ~10B tokens, 2,000 = ~1B tokens of CPT
    pre = name == "pretrain-interplay"
    cfg = _config(dict(name=name.split("-")[0], kind=name.split("-")[0], steps=19_000 if pre else 2_000,
                       log_every=10, checkpoint_every=1000, eval_every=1000, eval_batches=8,
                       init_from=None if pre else "runs/interplay/pretrain"),
                  "interplay-100m", name,
                  dict(lr=1e-4, schedule="cosine", warmup_fraction=0.05 if pre else 0.15, end_lr_ratio=0.3,
                       weight_decay=0.1, clip_norm=1.0),
                  mesh=ACCELERATOR_MESH, model_overrides=ACCELERATOR_MODEL)
    return cfg
  if name == "grpo-interplay":
    # the interplay study's RL stage (shared REFERENCES): the ~100M Qwen2-shape model after mid-training, GRPO on
    # the edge range op 11-14, 1024 prompts x 6, 4 minibatches, token-mean, KL loss 1e-3 (k3), clip 0.2, dual-clip
    # 3, lr 1e-6 constant, ~200 steps; set stage.init_from to the mid-trained stage folder
    # 4 micro-batches per update: 1,536 rows of 2,048 tokens per update would compile to ~87 GiB per device on 8
    # devices in one piece (benchmarks/RESULTS.md)
    cfg = _config(dict(name="grpo", kind="grpo", steps=200, log_every=1, checkpoint_every=20, eval_every=20,
                       init_from="runs/interplay/midtrain", micro_batches=4),
                  "interplay-100m", "rl-interplay", dict(lr=1e-6, schedule="constant", warmup_fraction=0.0,
                                                         weight_decay=0.1, clip_norm=1.0),
                  mesh=ACCELERATOR_MESH, model_overrides=ACCELERATOR_MODEL,
                  grpo=RLConfig(rollout=RolloutConfig(group_size=6, max_new_tokens=1024, temperature=1.0),
                                policy_loss=PolicyLossBlock(loss_agg="token-mean", clip_low=0.2, clip_high=0.2,
                                                            dual_clip=3.0),
                                kl=KLConfig(coef=1e-3, placement="loss", estimator="k3"),
                                minibatches=4, epochs=1, eval_problems=128))
    return cfg
  if name.startswith("pretrain-qwen2.5-"):
    # a Qwen2.5 shape pre-trained from scratch on the story task world at 4,096-token rows, one row per device of
    # 8 x 80 GB (`ACCELERATOR_MODEL`: chunked log-probs never hold the [rows, 4096, 151936] logits); the model keeps
    # Qwen's vocabulary size
    size = name.removeprefix("pretrain-")
    cfg = _config(dict(name="pretrain", kind="pretrain", steps=10_000, log_every=10, checkpoint_every=1000,
                       eval_every=1000, eval_batches=4),
                  size, "pretrain-interplay",
                  dict(lr=3e-4, schedule="cosine", warmup_fraction=0.02, end_lr_ratio=0.1, weight_decay=0.1,
                       clip_norm=1.0),
                  mesh=ACCELERATOR_MESH,
                  model_overrides=dict(ACCELERATOR_MODEL, vocab_size=load_config(f"models.py:{size}").vocab_size))
    cfg.stage.name = name
    cfg.data.seq_len, cfg.data.batch_size = 4096, 8
    return cfg
  if name.startswith("grpo-qwen2.5-"):
    # GRPO at a Qwen2.5 shape (its 151,936-token vocabulary) on the interplay RL prompts (1,024 tokens): 8 prompts x
    # 8 samples of up to 1,024 new tokens, one update per rollout in 8 micro-batches, KL to the reference in the loss,
    # log-probs in chunks of 256 positions.
    # What `jaxstages plan` sizes for the RL step's memory (benchmarks/RESULTS.md); set stage.init_from to a model
    # of that shape (e.g. hf:FOLDER) to train it
    cfg = get_config("grpo-interplay")
    cfg.model = get_config(f"pretrain-{name.removeprefix('grpo-')}").model
    cfg.model.logits_chunk = 256  # a quarter of the completion's logits at a time
    cfg.stage.name, cfg.stage.micro_batches, cfg.stage.init_from = name, 8, None
    cfg.data.batch_size = 8
    cfg.grpo.rollout.group_size, cfg.grpo.rollout.max_new_tokens, cfg.grpo.minibatches = 8, 1024, 1
    return cfg
  import difflib
  names = ["pretrain-toy", "midtrain-toy", "sft-toy", "dpo-toy", "distill-toy", "grpo-toy", "ppo-toy",
           "pretrain-interplay", "midtrain-interplay", "grpo-interplay", "pretrain-qwen2.5-0.5b",
           "pretrain-qwen2.5-1.5b", "pretrain-qwen2.5-7b", "grpo-qwen2.5-0.5b", "grpo-qwen2.5-1.5b",
           "grpo-qwen2.5-7b"]
  raise KeyError(f"unknown training config {name!r}; did you mean {difflib.get_close_matches(name, names)}? "
                 f"Known: {names}")
