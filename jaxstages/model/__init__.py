from jaxstages.model.config import ModelConfig, model_config, param_count
from jaxstages.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "model_config", "param_count"]
