"""Parameter trees: initialisation, the frozen/trainable split and merge, and structure checks.

MoA trains only the experts (`lora_a`, `lora_b`) and the routers; the base model is frozen. The two parts live
in separate pytrees with the same nesting as the full tree, so gradients and optimiser state exist for the
trainable part only, and `merge_params(frozen, trainable)` rebuilds the full tree for `MoATransformer.apply`.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.nn.model import MoATransformer

Params = dict[str, Any]
TRAINABLE_LEAVES = ("lora_a", "lora_b")
TRAINABLE_MODULES = ("router",)


def is_trainable(path: tuple[str, ...]) -> bool:
    """True for expert and router weights: the only parameters MoA updates."""
    return path[-1] in TRAINABLE_LEAVES or any(p in TRAINABLE_MODULES for p in path)


def split_params(params: Params) -> tuple[Params, Params]:
    """full tree -> (frozen, trainable), both nested like the full tree."""
    flat = traverse_util.flatten_dict(params)
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)


def merge_params(frozen: Params, trainable: Params) -> Params:
    """Inverse of split_params. Keys present in both are an error (it would hide a bug)."""
    flat_f, flat_t = traverse_util.flatten_dict(frozen), traverse_util.flatten_dict(trainable)
    overlap = set(flat_f) & set(flat_t)
    if overlap:
        raise ValueError(f"merge_params: keys in both frozen and trainable: {sorted('/'.join(k) for k in overlap)}")
    return traverse_util.unflatten_dict({**flat_f, **flat_t})


def _init_fn(cfg: ModelConfig, moa: Optional[MoAConfig]):
    if moa is not None:   # every parameter tree is built here: the expert count must be a number by now
        moa.check_experts_known()
    model = MoATransformer(cfg, moa)

    def init(rng):
        tokens = jnp.zeros((1, 4), jnp.int32)
        return model.init({"params": rng}, tokens, routing="fixed", expert_idx=jnp.zeros((1,), jnp.int32))["params"]
    return init


def init_params(cfg: ModelConfig, moa: Optional[MoAConfig], rng: jax.Array) -> Params:
    """A full random tree (tests, tiny models). For real checkpoints use `init_trainable` + a loader."""
    return jax.jit(_init_fn(cfg, moa))(rng)


def param_shapes(cfg: ModelConfig, moa: Optional[MoAConfig]) -> Params:
    """ShapeDtypeStruct tree of the full model, without allocating anything (jax.eval_shape)."""
    return jax.eval_shape(_init_fn(cfg, moa), jax.random.PRNGKey(0))


def init_trainable(cfg: ModelConfig, moa: MoAConfig, rng: jax.Array, out_shardings=None) -> Params:
    """Fresh experts + routers only. The base weights that init would create are dead code, removed by XLA."""
    def init(rng):
        return split_params(_init_fn(cfg, moa)(rng))[1]
    return jax.jit(init, out_shardings=out_shardings)(rng)


def check_tree(expected: Params, got: Params, what: str) -> None:
    """Raise naming the first missing/unexpected key or shape mismatch between two trees."""
    fe, fg = traverse_util.flatten_dict(expected), traverse_util.flatten_dict(got)
    missing = sorted("/".join(k) for k in set(fe) - set(fg))
    extra = sorted("/".join(k) for k in set(fg) - set(fe))
    if missing or extra:
        raise ValueError(f"{what}: parameter tree mismatch; missing {missing[:8]}, unexpected {extra[:8]}")
    for k, v in fe.items():
        if tuple(v.shape) != tuple(fg[k].shape):
            raise ValueError(f"{what}: parameter {'/'.join(k)} has shape {tuple(fg[k].shape)}, "
                             f"expected {tuple(v.shape)}")


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
