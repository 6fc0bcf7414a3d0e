"""The configurable transformer: config, modules, KV cache."""

from llmctl.core.model.cache import KVCache
from llmctl.core.model.config import ModelConfig
from llmctl.core.model.transformer import ModelOutput, Transformer

__all__ = ["KVCache", "ModelConfig", "ModelOutput", "Transformer"]
