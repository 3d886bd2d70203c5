"""The model's hyper-parameters: one frozen dataclass for the Qwen2/Qwen2.5 and Llama families."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxstages.config import ConfigError, from_config, load_config

ROPE_SCALING_TYPES = ("linear", "llama3")
# jaxstages.model.attention
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash", "blocked", "decode")
REMAT_POLICIES = ("full", "dots")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and numerics.

  `head_dim` defaults to `hidden_size // num_heads` (set it explicitly where a checkpoint differs).
  `rope_scaling` is `None` or a tuple of `(key, value)` pairs, e.g. Llama 3.1's
  `(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
  ("original_max_position_embeddings", 8192))`; a tuple keeps the config hashable (it is a static jit argument).
  """

  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  intermediate_size: int = 256
  rope_theta: float = 10_000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  tie_embeddings: bool = True
  max_position_embeddings: int = 2048
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each layer's activations in the backward pass
  # what a rematerialised layer keeps: "full" nothing (recompute the whole layer), "dots" the outputs of its
  # weight matmuls (recompute only norms, RoPE, activations and attention: more memory, less recompute)
  remat_policy: str = "full"
  init_std: float = 0.02
  # attention kernel (jaxstages.model.attention): "auto" picks splash on TPU, cuDNN on GPU, else the blocked
  # flash-style attention (einsum for short sequences, "decode" for one-token decoding on the CPU); "einsum" is the
  # reference
  attention: str = "auto"
  # the largest query block of the blocked attention, splash's block, and (squared) auto's limit for einsum with a cache
  attention_block: int = 512
  # positions per chunk when the losses compute log-probs from hidden states (jaxstages.losses.chunked_logits_map):
  # the `[batch, chunk, vocab]` float32 logits of one chunk are live at a time instead of `[batch, seq, vocab]`;
  # 0 computes all logits at once
  logits_chunk: int = 0
  # layers stored stacked (`[num_layers, ...]` per parameter) and run with `jax.lax.scan`: compile time flat in depth
  scan_layers: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                          "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention_block < 1 or self.logits_chunk < 0:
      raise ConfigError(f"attention_block ({self.attention_block}) must be >= 1 and logits_chunk "
                        f"({self.logits_chunk}) >= 0")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {sorted(DTYPES)}")
    # one canonical, hashable form (the config is a static jit argument) whether given as a mapping, as pairs, or
    # as the lists of lists that pairs come back as from JSON (`model_config.json`)
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    elif self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(sorted(tuple(pair) for pair in self.rope_scaling)))
    if self.rope_scaling is not None:
      kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
      if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: {ROPE_SCALING_TYPES}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes: Any) -> "ModelConfig":
    return from_config(ModelConfig, dataclasses.asdict(self), **changes)


def model_config(spec: str | Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from a named size in `configs/models.py` (e.g. `"toy"`, `"qwen2.5-0.5b"`) or a mapping."""
  if isinstance(spec, str):
    spec = load_config(f"models.py:{spec}")
  return from_config(ModelConfig, spec, where="model config", **overrides)


def param_count(cfg: ModelConfig, include_embeddings: bool = True) -> int:
  """Number of parameters, by formula (tested against the initialised model and HF)."""
  e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  attn = e * h * d + 2 * e * kv * d + h * d * e
  if cfg.qkv_bias:
    attn += h * d + 2 * kv * d
  per_layer = attn + 3 * e * m + 2 * e  # + two RMSNorm scales
  total = cfg.num_layers * per_layer + e  # + final norm
  if include_embeddings:
    total += cfg.vocab_size * e * (1 if cfg.tie_embeddings else 2)
  elif not cfg.tie_embeddings:
    total += cfg.vocab_size * e  # the untied output head is a matmul, not a lookup
  return total


def vocab_size_for(tokenizer_vocab: int, multiple: int = 128) -> int:
  """Embedding rows: the tokenizer's vocabulary rounded up (aligned matmuls, room for added tokens)."""
  return -(-tokenizer_vocab // multiple) * multiple


def stage_model_config(model_block: Mapping[str, Any], tokenizer_vocab: int) -> ModelConfig:
  """The `model` block as a `ModelConfig`; `vocab_size` 0 means the tokenizer's, rounded up."""
  values = dict(model_block)
  if not values.get("vocab_size"):
    values["vocab_size"] = vocab_size_for(tokenizer_vocab)
  cfg = model_config(values)
  if cfg.vocab_size < tokenizer_vocab:
    raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's vocabulary of "
                      f"{tokenizer_vocab} tokens; set model.vocab_size to 0 (the tokenizer's, rounded up) or to at "
                      f"least {tokenizer_vocab}")
  return cfg


def check_positions(model_cfg: ModelConfig, lengths: Mapping[str, int]) -> None:
  """Raises `ConfigError` when a sequence made of `lengths` (config key -> tokens, e.g. `data.prompt_len` and
  `grpo.max_new_tokens`) is longer than the model's `max_position_embeddings`: RoPE computes any position without
  complaint, so the stage would otherwise train or sample at positions the model was not built for."""
  total = sum(lengths.values())
  if total > model_cfg.max_position_embeddings:
    parts = " + ".join(f"{k}={v}" for k, v in lengths.items()) + (f" = {total}" if len(lengths) > 1 else "")
    raise ConfigError(f"{parts} tokens exceed the model's max_position_embeddings={model_cfg.max_position_embeddings}"
                      "; shorten the sequences or raise model.max_position_embeddings")
