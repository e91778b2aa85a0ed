"""The embedded 10-domain dataset as a tfds builder (array_record; readable without TensorFlow)."""
from moa_jax.data.moa_tasks.moa_tasks_dataset_builder import (
    BUILDER_CONFIGS, MoaTasks, MoaTasksConfig, default_data_dir, prepare, registry_fingerprint)

__all__ = ["BUILDER_CONFIGS", "MoaTasks", "MoaTasksConfig", "default_data_dir", "prepare", "registry_fingerprint"]
