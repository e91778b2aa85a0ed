"""Parameter trees without allocation (`param_shapes` = jax.eval_shape): exact leaf shapes and dtypes and
parameter counts for real model shapes (SmolLM2-135M with ten experts, Llama-2-7B), computed by hand."""

import jax.numpy as jnp
import pytest
from flax import traverse_util

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.params import count_params, param_shapes, split_params
from tests.conftest import make_tiny_cfg, make_tiny_moa

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, tie_word_embeddings=False)


def _shapes(tree):
    return {"/".join(k): (tuple(v.shape), v.dtype) for k, v in traverse_util.flatten_dict(tree).items()}


def test_param_tree_smollm2_135m_with_ten_experts():
    moa = MoAConfig(num_experts=10, rank=16)
    f32 = jnp.dtype("float32")
    proj = {"attn/q_proj": (576, 576), "attn/k_proj": (576, 192), "attn/v_proj": (576, 192),
            "attn/o_proj": (576, 576), "mlp/gate_proj": (576, 1536), "mlp/up_proj": (576, 1536),
            "mlp/down_proj": (1536, 576)}
    expected = {"embed/embedding": ((49152, 576), f32), "final_norm/scale": ((576,), f32),
                "layers/input_norm/scale": ((30, 576), f32), "layers/post_attn_norm/scale": ((30, 576), f32),
                "layers/router/kernel": ((30, 576, 10), f32)}
    for name, (din, dout) in proj.items():
        expected[f"layers/{name}/kernel"] = ((30, din, dout), f32)
        expected[f"layers/{name}/lora_a"] = ((30, 10, din, 16), f32)
        expected[f"layers/{name}/lora_b"] = ((30, 10, 16, dout), f32)
    shapes = param_shapes(SMOLLM2, moa)
    assert _shapes(shapes) == expected
    frozen, trainable = split_params(shapes)
    # per layer and expert r*(Din+Dout): q,o 16*1152, k,v 16*768, gate,up,down 16*2112 = 162,816;
    # x 10 experts + router 576*10 = 1,633,920 per layer; x 30 layers:
    assert count_params(trainable) == 49_017_600
    assert count_params(frozen) == 134_515_008        # SmolLM2-135M's published parameter count


def test_param_tree_llama2_7b_base():
    shapes = param_shapes(LLAMA2_7B, None)
    f32 = jnp.dtype("float32")
    expected = {"embed/embedding": ((32000, 4096), f32), "lm_head/kernel": ((4096, 32000), f32),
                "final_norm/scale": ((4096,), f32), "layers/input_norm/scale": ((32, 4096), f32),
                "layers/post_attn_norm/scale": ((32, 4096), f32)}
    for name in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"):
        expected[f"layers/{name}/kernel"] = ((32, 4096, 4096), f32)
    expected["layers/mlp/gate_proj/kernel"] = expected["layers/mlp/up_proj/kernel"] = ((32, 4096, 11008), f32)
    expected["layers/mlp/down_proj/kernel"] = ((32, 11008, 4096), f32)
    assert _shapes(shapes) == expected
    # 2 * V*D (embed, head) + L * (4 D^2 + 3 D F + 2 D) + D
    assert count_params(shapes) == 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert count_params(shapes) == 6_738_415_616
    # and its adapters: q,v only, E=2, r=8: 32 layers * 2 experts * 2 projections * 8*(4096+4096) + routers
    frozen, trainable = split_params(param_shapes(LLAMA2_7B, MoAConfig(num_experts=2, rank=8, targets="q,v")))
    assert count_params(frozen) == 6_738_415_616
    assert count_params(trainable) == 32 * 2 * 2 * 8 * 8192 + 32 * 4096 * 2


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_param_dtypes_follow_param_dtype_and_adapter_dtype(adapter_dtype):
    """Frozen base weights are stored in ModelConfig.param_dtype, experts and routers in MoAConfig.adapter_dtype."""
    cfg = make_tiny_cfg(tie_word_embeddings=True, attention_bias=True, param_dtype="bfloat16")
    moa = make_tiny_moa(adapter_dtype=adapter_dtype)
    flat = traverse_util.flatten_dict(param_shapes(cfg, moa))
    for k, v in flat.items():
        trainable = k[-1] in ("lora_a", "lora_b") or "router" in k
        assert v.dtype == jnp.dtype(adapter_dtype if trainable else "bfloat16"), k
