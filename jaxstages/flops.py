"""Model FLOPs from the config (the MFU numerator and, later, the compute ledger's unit).

Counts matmul FLOPs only (2 per multiply-add), as MFU conventionally does: the parameter matmuls and the two
attention matmuls (scores and weighted values). Causal attention is counted at full `seq x seq` size, as in the
PaLM/MaxText convention; norms, softmax and RoPE are ignored. A backward pass costs twice the forward.
"""

from __future__ import annotations

from jaxstages.model.config import ModelConfig, param_count


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a sequence of `seq_len` tokens (prefill / teacher forcing)."""
  matmul_params = param_count(cfg, include_embeddings=False) - cfg.num_layers * 2 * cfg.hidden_size - cfg.hidden_size
  if cfg.qkv_bias:
    matmul_params -= cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  if cfg.tie_embeddings:
    matmul_params += cfg.vocab_size * cfg.hidden_size  # the output projection reuses the embedding table
  attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 2.0 * matmul_params + attention


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per trained token (3x the forward)."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)
