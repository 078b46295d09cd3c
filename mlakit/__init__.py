"""mlakit: DeepSeek's Multi-Head Latent Attention for the models you already have."""

from mlakit.cache import KVCache, LatentCache, ModelCache
from mlakit.config import ModelConfig, preset
from mlakit.errors import MlakitError
from mlakit.model import Transformer

__version__ = "0.1.0"

__all__ = ["KVCache", "LatentCache", "MlakitError", "ModelCache", "ModelConfig", "Transformer", "preset"]
