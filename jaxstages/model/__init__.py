from jaxstages.model.config import ModelConfig, model_config, param_count
from jaxstages.model.transformer import KVCache, Transformer, create_model

__all__ = ["KVCache", "ModelConfig", "Transformer", "create_model", "model_config", "param_count"]
