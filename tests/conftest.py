"""Shared pytest setup: 8 forced CPU devices for the sharding tests.

XLA_FLAGS must be set before jax is first imported, so it comes first in this file.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
