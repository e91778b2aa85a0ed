"""moa_jax: Mixture-of-LoRAs (MoA) multitask tuning of LLMs in JAX/Flax."""
from moa_jax.config import ConfigError, MeshConfig, ModelConfig, MoAConfig, RopeScaling

__all__ = ["ConfigError", "MeshConfig", "ModelConfig", "MoAConfig", "RopeScaling"]
__version__ = "0.1.0"
