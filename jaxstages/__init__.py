"""jaxstages: train decoder LLMs through pretrain, mid-train, SFT, RL, DPO and distillation, in JAX."""

__version__ = "0.1.0"
