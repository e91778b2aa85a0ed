"""Device mesh and the one sharding rule table.

Mesh axes ('data', 'expert'). The batch is split over ALL devices (both axes), so every device computes; the
expert stacks (lora_a / lora_b, and with them their Adam moments) are split along E over 'expert', ZeRO-style:
each device stores E / n_expert experts and XLA gathers the small weights for compute. The frozen base is
replicated, or with `fsdp=True` split over 'data' along its largest axis (int8 kernels and their
`kernel_scale` [L, Dout] leaves follow the same rule). Model code never names mesh axes: it
names logical axes, and `LOGICAL_RULES` maps them here.

Shape glossary: L layers, E experts, D width, R rank, B batch, T tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moa_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "expert")
# logical axis -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "expert"),
    "expert": "expert",
    "fsdp": "data",
}


def logical_to_spec(logical: tuple[Optional[str], ...]) -> P:
    return P(*(LOGICAL_RULES.get(a) if a is not None else None for a in logical))


def param_logical_axes(path: tuple[str, ...], shape: tuple[int, ...], fsdp: bool = False) -> tuple:
    """Logical axes of one parameter, from its name. Expert stacks: [L, E, ., .] -> expert on axis 1."""
    name = path[-1]
    if name in ("lora_a", "lora_b"):
        return (None, "expert", None, None)
    if fsdp and "router" not in path and len(shape) >= 2:
        axes = [None] * len(shape)
        axes[int(np.argmax(shape))] = "fsdp"
        return tuple(axes)
    return (None,) * len(shape)


def make_mesh(cfg: MeshConfig, devices: Optional[list] = None) -> Mesh:
    """Build the ('data', 'expert') mesh; data=-1 takes all devices left after the expert axis."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if cfg.expert < 1 or n % cfg.expert:
        raise ConfigError(f"MeshConfig.expert={cfg.expert} must be >= 1 and divide the {n} available devices")
    data = n // cfg.expert if cfg.data == -1 else cfg.data
    if data * cfg.expert != n:
        raise ConfigError(f"MeshConfig data={cfg.data} x expert={cfg.expert} = {data * cfg.expert} devices, "
                          f"but {n} are available; use data=-1 to take the rest")
    return Mesh(np.asarray(devices).reshape(data, cfg.expert), MESH_AXES)


def check_experts_divisible(mesh: Mesh, num_experts: int) -> None:
    n_expert = mesh.shape["expert"]
    if num_experts % n_expert:
        raise ConfigError(f"MoAConfig.num_experts={num_experts} is not divisible by the expert mesh size "
                          f"MeshConfig.expert={n_expert}: the expert stacks are split evenly along E")


def check_batch_divisible(mesh: Mesh, batch_size: int) -> None:
    if batch_size % mesh.size:
        raise ConfigError(f"global batch size {batch_size} must be divisible by the {mesh.size} devices "
                          f"of the mesh {dict(mesh.shape)}")


def param_shardings(mesh: Mesh, params: Any, fsdp: bool = False) -> Any:
    """NamedSharding tree for a (possibly abstract) param tree."""
    flat = traverse_util.flatten_dict(params)
    out = {k: NamedSharding(mesh, logical_to_spec(param_logical_axes(k, tuple(v.shape), fsdp)))
           for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over every device."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """One host array -> a global array; each device receives only its shard."""
    return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x[idx]))


def put_params(params: Any, shardings: Any) -> Any:
    """Place a host (numpy) tree with the given shardings; each device gets only its shard."""
    return jax.tree_util.tree_map(_put, params, shardings)


def leaf_placer(mesh: Mesh, fsdp: bool = False):
    """place(path, host_leaf) for the loaders (loading/tree.py): each leaf goes to its `param_shardings` sharding
    as soon as it is built, so the host never holds more than one leaf of the base. It waits for each transfer:
    an asynchronous one would keep its host buffer alive while the next leaves are read."""
    def place(path: tuple[str, ...], x: np.ndarray) -> jax.Array:
        spec = logical_to_spec(param_logical_axes(path, np.shape(x), fsdp))
        return jax.block_until_ready(_put(x, NamedSharding(mesh, spec)))
    return place


def micro_batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Sharding of a [A, B, ...] micro-batch stack: B over every device."""
    return NamedSharding(mesh, P(None, *batch_sharding(mesh, ndim - 1).spec))


def tree_leaf_sharding(mesh, path, leaf) -> NamedSharding:
    """Sharding of one leaf of a tree that nests the param tree (e.g. Adam's mu/nu), from its dict-key path."""
    keys = tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
    if not keys or len(leaf.shape) == 0:
        return replicated(mesh)
    return NamedSharding(mesh, logical_to_spec(param_logical_axes(keys, tuple(leaf.shape))))


def gather_to_host(tree: Any) -> Any:
    """Device tree -> numpy on every process (multi-host safe)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
