"""Expert-axis surgery for adding domains to a trained MoA: grow the stacked expert and router arrays from E_old to
E = E_old + E_new, and an optimiser wrapper that keeps the first E_old experts bit-identical while the rest train.

Where the expert axis is in each trainable leaf (scanned layers put L first):
  lora_a [L, E, Din, R], lora_b [L, E, R, Dout]   expert axis 1
  router kernel [L, D, E] (linear), router out/kernel [L, Hr, E] (mlp)   expert axis -1 (the router's outputs)
  router hidden/kernel [L, D, Hr] (mlp)   no expert axis: kept as it is
Growing concatenates the old leaf with the tail (experts E_old..E-1) of a donor tree of the grown shape (fresh
init: lora_a random, lora_b zero, new router columns random), so old expert k stays expert k.

Why a wrapper and not optax.masked: optax masks whole leaves, but old and new experts share each leaf. The wrapper
zeroes the old experts' gradients (so global-norm clipping sees only what trains), runs the inner optimiser, puts
the old experts' optimiser moments back (AdamW's moments would otherwise decay towards zero) and replaces their
updates (learning-rate step and weight decay alike) with -0.0: x + (-0.0) == x bit for bit for every float x,
including -0.0, which adding +0.0 would turn into +0.0.

Shape glossary: L layers, E experts (E_old kept, E_new added), D width, Din/Dout projection sides, R rank, Hr router
hidden width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

EXPERT_LEAVES = ("lora_a", "lora_b")


def expert_axis(path: tuple, shape: tuple) -> int | None:
    """The expert axis of the trainable leaf at `path` (names), or None when it has none."""
    if path[-1] in EXPERT_LEAVES:
        return 1
    if "router" in path and not (len(path) >= 2 and path[-2] == "hidden"):
        return len(shape) - 1
    return None


def grow_trainable(old: Any, donor: Any, num_old: int) -> dict:
    """Old tree (E_old experts) + a donor tree of the grown shape -> the grown tree: each leaf is the old leaf
    followed, along its expert axis, by the donor's experts num_old.. . Leaves without an expert axis stay old."""
    flat_old, flat_donor = traverse_util.flatten_dict(old), traverse_util.flatten_dict(donor)
    if set(flat_old) != set(flat_donor):
        raise ValueError(f"grow_trainable: trees differ: {sorted(map('/'.join, set(flat_old) ^ set(flat_donor)))[:6]}")
    out = {}
    for key, a in flat_old.items():
        a, d = np.asarray(a), np.asarray(jax.device_get(flat_donor[key]))
        axis = expert_axis(key, a.shape)
        if axis is None:
            if a.shape != d.shape:
                raise ValueError(f"grow_trainable: {'/'.join(key)} has no expert axis but shapes {a.shape} != "
                                 f"{d.shape}")
            out[key] = a
            continue
        if a.shape[axis] != num_old:
            raise ValueError(f"grow_trainable: {'/'.join(key)} has {a.shape[axis]} experts on axis {axis}, expected "
                             f"{num_old}")
        tail = np.take(d, np.arange(num_old, d.shape[axis]), axis=axis).astype(a.dtype)
        out[key] = np.concatenate([a, tail], axis=axis)
    return traverse_util.unflatten_dict(out)


def old_experts(tree: Any, num_old: int) -> dict:
    """The first num_old experts of every expert leaf (lora_a/lora_b) as a flat {path: array} dict."""
    flat = traverse_util.flatten_dict(tree)
    return {k: np.asarray(jax.device_get(v))[:, :num_old] for k, v in flat.items() if k[-1] in EXPERT_LEAVES}


def same_old_experts(a: Any, b: Any, num_old: int) -> list[str]:
    """Paths of expert leaves whose first num_old experts differ between trees a and b ([] = bit-identical)."""
    ea, eb = old_experts(a, num_old), old_experts(b, num_old)
    return sorted("/".join(k) for k in ea if not np.array_equal(ea[k], eb[k]) or ea[k].dtype != eb[k].dtype)


def _names(path) -> tuple:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def _old_mask(names: tuple, leaf, num_old: int, routers: bool = False):
    """Boolean array broadcastable to `leaf`, True on the old experts of an expert leaf (with `routers`, also on
    the old outputs of a router leaf, and everywhere on an mlp router's shared hidden layer); None elsewhere."""
    if not names or getattr(leaf, "ndim", 0) < 2:
        return None
    if names[-1] in EXPERT_LEAVES:
        axis = 1
    elif routers and "router" in names:
        axis = expert_axis(names, leaf.shape)
        if axis is None:   # every old output reads the mlp router's hidden layer
            return jnp.ones((1,) * leaf.ndim, bool)
    else:
        return None
    shape = [1] * leaf.ndim
    shape[axis] = leaf.shape[axis]
    return (jnp.arange(leaf.shape[axis]) < num_old).reshape(shape)


def _where_old(new, old, num_old: int, fill=None, routers: bool = False):
    """Tree map: on old experts (and old router outputs) take `old` (or the constant `fill`), elsewhere `new`."""
    def pick(path, n, o):
        mask = _old_mask(_names(path), n, num_old, routers)
        if mask is None:
            return n
        return jnp.where(mask, jnp.asarray(fill, n.dtype) if fill is not None else o, n)
    return jax.tree_util.tree_map_with_path(pick, new, old)


def freeze_old_experts(inner: optax.GradientTransformation, num_old: int,
                       routers: bool = False) -> optax.GradientTransformation:
    """`inner` restricted to experts num_old.. of every lora_a/lora_b leaf (and to the other leaves as `inner`
    treats them): the old experts get no update, no weight decay and no change of optimiser state. With `routers`
    the routers' old outputs are frozen the same way (only the new domains' outputs train)."""
    def update(grads, state, params=None):
        grads = _where_old(grads, grads, num_old, fill=0.0, routers=routers)
        updates, new_state = inner.update(grads, state, params)
        new_state = _where_old(new_state, state, num_old, routers=routers)   # optimiser moments nest the params
        return _where_old(updates, updates, num_old, fill=-0.0, routers=routers), new_state
    return optax.GradientTransformation(inner.init, update)
