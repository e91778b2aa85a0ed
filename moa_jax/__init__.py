"""moa_jax: Mixture-of-LoRAs (MoA) multitask tuning of LLMs in JAX/Flax."""
from moa_jax.api import Generation, MoAModel, from_peft, load_model, load_run
from moa_jax.config import ConfigError, MeshConfig, ModelConfig, MoAConfig, RopeScaling

__all__ = ["ConfigError", "Generation", "MeshConfig", "ModelConfig", "MoAConfig", "MoAModel", "RopeScaling",
           "from_peft", "load_model", "load_run"]
__version__ = "0.1.0"
