"""moa_jax: Mixture-of-LoRAs (MoA) multitask tuning of LLMs in JAX/Flax.

The package face is lazy: `import moa_jax` (or any leaf module such as `moa_jax.routing`) imports neither jax nor
the model; each name below is imported on first use.

    model = moa_jax.load_run("runs/moa_10task")          # a trained run's final model
    model.generate(["What is 12 + 7?"])                  # routed answers
    model.save_pretrained("my-moa"); moa_jax.from_pretrained("my-moa")   # one folder, rebuilt bit for bit
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Generation": "moa_jax.api", "MoAModel": "moa_jax.api", "from_peft": "moa_jax.api",
    "from_pretrained": "moa_jax.api", "load_model": "moa_jax.api", "load_run": "moa_jax.api",
    "ConfigError": "moa_jax.config", "MeshConfig": "moa_jax.config", "ModelConfig": "moa_jax.config",
    "MoAConfig": "moa_jax.config", "RopeScaling": "moa_jax.config",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moa_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
