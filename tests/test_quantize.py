"""int8 frozen base (moa_jax/nn/quantize.py): quantization error bound, the abstract tree, model logits against the
float model, training, generation, sharding, the HF loader's int8 path, parameter bytes and bad settings.

Tiny models built on the fly: D=32, F=64, L=2, H=4 over K=2, V=64 (tests/train_helpers.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import moa_jax
from moa_jax.train.checkpoint import load_adapters
from moa_jax.config import PROJECTIONS, ConfigError, ExperimentConfig, MeshConfig, ModelConfig, replace
from moa_jax.generate.decode import generate_tokens
from moa_jax.loading.tree import expected_shapes
from moa_jax.nn.model import MoATransformer
from moa_jax.overrides import apply_overrides
from moa_jax.params import merge_params, param_shapes, split_params
from moa_jax.nn.quantize import (SCALE_LEAF, dequantize, int8_matmul, is_quantized_kernel, param_bytes,
                              quantize_frozen, quantize_int8)
from moa_jax.sharding import leaf_placer, make_mesh, param_shardings, put_params
from moa_jax.train.loop import train_stage
from tests.train_helpers import (SyntheticSource, config_dict, flat_np, init_trees, make_train_config, tiny_cfg,
                                 tiny_moa)

INT8 = replace(tiny_cfg(), quantize="int8")
MOA = tiny_moa(num_experts=2, targets=PROJECTIONS)


def _dequantized(frozen_q):
    """The float tree an int8 tree stands for: every kernel = q * scale (what the int8 model must compute with)."""
    flat = traverse_util.flatten_dict(frozen_q)
    out = {k: (dequantize(np.asarray(v), np.asarray(flat[k[:-1] + (SCALE_LEAF,)]), np.float32)
               if is_quantized_kernel(k) else v) for k, v in flat.items() if k[-1] != SCALE_LEAF}
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def trees():
    """(float frozen, int8 frozen, trainable) of the tiny model, lora_b non-zero so adapters matter."""
    frozen, trainable = init_trees(tiny_cfg(), MOA)
    return frozen, quantize_frozen(frozen), trainable


def test_round_trip_error_is_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 12)) * rng.uniform(1e-3, 10.0, (3, 1, 12))   # channels of very different size
    w[1, :, 5] = 0.0                                                               # an all-zero channel stays exact
    w = w.astype(np.float32)
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == w.shape and scale.shape == (3, 12)
    np.testing.assert_allclose(scale, np.where(w.__abs__().max(1) > 0, np.abs(w).max(1) / 127, 1.0), rtol=1e-6)
    err = np.abs(dequantize(q, scale, np.float32) - w)                                    # (3, 40, 12)
    assert np.all(err <= scale[:, None, :] * (0.5 + 1e-5))
    assert np.all(err[1, :, 5] == 0) and np.abs(q).max() == 127
    qj, sj = quantize_int8(jnp.asarray(w))                                         # jax path == numpy path
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), scale)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(int8_matmul(jnp.asarray(x), qj[0], sj[0])),
                               x @ dequantize(q[0], scale[0], np.float32), rtol=1e-5, atol=1e-5)


def test_abstract_quantized_tree_matches_the_int8_model():
    """jax.eval_shape(quantize_frozen, abstract float base) == the int8 model's own frozen tree == the loaders'
    expected shapes; projection kernels int8, everything else unchanged."""
    frozen_f = split_params(param_shapes(replace(tiny_cfg(), param_dtype="bfloat16"), MOA))[0]
    abstract = jax.eval_shape(quantize_frozen, frozen_f)
    model_tree = split_params(param_shapes(replace(INT8, param_dtype="bfloat16"), MOA))[0]
    got = {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(abstract).items()}
    want = {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(model_tree).items()}
    assert got == want
    assert {k: s for k, (s, _) in got.items()} == expected_shapes(INT8)
    for k, (shape, dtype) in got.items():
        expected = (jnp.int8 if is_quantized_kernel(k) else jnp.float32 if k[-1] == SCALE_LEAF else jnp.bfloat16)
        assert dtype == expected, k
    assert sum(is_quantized_kernel(k) for k in got) == 7 and ("embed", "embedding") in got


def test_int8_model_computes_with_the_dequantized_weights(trees):
    """Logits of the int8 model == the float model run on q * scale (1e-5), in every routing mode, and close to
    the original float model (int8 rounding only)."""
    frozen, frozen_q, trainable = trees
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    float_model, int8_model = MoATransformer(tiny_cfg(), MOA), MoATransformer(INT8, MOA)
    for routing in ("base", "fixed", "soft"):
        kw = dict(routing=routing, expert_idx=jnp.asarray([0, 1]))
        got = int8_model.apply({"params": merge_params(frozen_q, trainable)}, tokens, **kw)[0]
        ref = float_model.apply({"params": merge_params(_dequantized(frozen_q), trainable)}, tokens, **kw)[0]
        orig = float_model.apply({"params": merge_params(frozen, trainable)}, tokens, **kw)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
        drift = float(jnp.max(jnp.abs(got - orig)))
        assert 0 < drift < 0.05 * float(jnp.max(jnp.abs(orig))), (routing, drift)


@pytest.mark.parametrize("num_experts", [1, 2], ids=["one_expert_merged_gemm", "top1"])
def test_int8_gradients_equal_the_dequantized_float_model(num_experts):
    """d loss / d trainable on the int8 base == on the float model with q * scale (E=1 takes the merged-GEMM path
    of AdaptedDense at this token count, E=2 the top-1 gather)."""
    moa = tiny_moa(num_experts=num_experts, targets=PROJECTIONS)
    frozen, trainable = init_trees(tiny_cfg(), moa)
    frozen_q = quantize_frozen(frozen)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (4, 32)), jnp.int32)

    def grads(cfg, base):
        def loss(tr):
            logits = MoATransformer(cfg, moa).apply({"params": merge_params(base, tr)}, tokens, routing="fixed",
                                                    expert_idx=jnp.arange(4) % num_experts)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        return jax.grad(loss)(trainable)

    got, ref = grads(INT8, frozen_q), grads(tiny_cfg(), _dequantized(frozen_q))
    for k, v in flat_np(ref).items():
        np.testing.assert_allclose(flat_np(got)[k], v, atol=1e-5, rtol=1e-4, err_msg=k)


def test_no_full_precision_copy_of_the_kernels_is_compiled():
    """The compiled train-step gradient of an int8 model (bf16 compute, 8 layers) needs temporary memory of a few
    layers, not the float copy of all kernels that a convert hoisted out of the layer scan would cost."""
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4,
                      num_kv_heads=4, dtype="bfloat16", param_dtype="bfloat16", quantize="int8")
    moa = tiny_moa(num_experts=2, targets=PROJECTIONS)
    frozen, trainable = split_params(param_shapes(cfg, moa))
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)

    def loss(tr, fr, tok):
        return jnp.mean(MoATransformer(cfg, moa).apply({"params": merge_params(fr, tr)}, tok, routing="fixed",
                                                       expert_idx=jnp.zeros((1,), jnp.int32))[0])
    temp = jax.jit(jax.grad(loss)).lower(trainable, frozen, tokens).compile().memory_analysis().temp_size_in_bytes
    kernels = sum(v.size for k, v in traverse_util.flatten_dict(frozen).items() if is_quantized_kernel(k))
    assert kernels == 8 * (4 * 256 * 256 + 3 * 256 * 1024)
    assert temp < 0.25 * 4 * kernels, (temp, kernels)     # a float32 copy of all kernels would be 4 * kernels


def test_param_bytes_shrink(trees):
    """Projection kernels: 4 bytes -> 1 byte per weight plus 4 bytes per output channel per layer."""
    frozen, frozen_q, _ = trees
    flat = traverse_util.flatten_dict(frozen)
    kernels = sum(v.size for k, v in flat.items() if is_quantized_kernel(k))
    channels = sum(v.shape[0] * v.shape[-1] for k, v in flat.items() if is_quantized_kernel(k))
    assert param_bytes(frozen_q) == param_bytes(frozen) - 3 * kernels + 4 * channels
    assert param_bytes(frozen_q) < 0.5 * param_bytes(frozen)


def test_train_stage_on_an_int8_base(tmp_path, trees):
    """Stage 2 on the int8 base, sharded over 2 devices with FSDP: the loss falls, every trainable leaf moves, and
    the frozen int8 base is bit-identical afterwards."""
    _, frozen_q, trainable = trees
    mesh = make_mesh(MeshConfig(data=2, expert=1, fsdp=True), jax.devices()[:2])
    shardings = param_shardings(mesh, frozen_q, fsdp=True)
    frozen_dev = put_params(frozen_q, shardings)
    tcfg = make_train_config(steps=12, learning_rate=1e-2)
    final, history = train_stage(model=MoATransformer(INT8, MOA), tcfg=tcfg, mesh=mesh, frozen=frozen_dev,
                                 trainable=trainable, source=SyntheticSource(pool=1), workdir=str(tmp_path),
                                 config=config_dict(INT8, MOA, tcfg), domain_names=["d0", "d1"],
                                 frozen_shardings=shardings, progress=False)
    losses = [h["lm_loss"] for h in history]
    assert losses[-1] < 0.8 * losses[0], losses
    before, after = flat_np(trainable), flat_np(final)
    assert before.keys() == after.keys()
    assert all(np.any(before[k] != after[k]) for k in before)
    for k, v in flat_np(frozen_q).items():
        np.testing.assert_array_equal(np.asarray(flat_np(frozen_dev)[k]), v)
    assert flat_np(frozen_dev)["layers/attn/q_proj/kernel"].dtype == np.int8
    saved, _ = load_adapters(str(tmp_path / "adapters"))         # the artifact holds the adapters only
    assert flat_np(saved).keys() == before.keys()


def test_generate_on_an_int8_base_matches_the_dequantized_float_model(trees):
    _, frozen_q, trainable = trees
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 8)), jnp.int32)
    mask = jnp.ones_like(tokens)
    got, idx, _ = generate_tokens(INT8, MOA, merge_params(frozen_q, trainable), tokens, mask, routing="router",
                                  max_new_tokens=6, eos_ids=(0,))
    ref, ref_idx, _ = generate_tokens(tiny_cfg(), MOA, merge_params(_dequantized(frozen_q), trainable), tokens,
                                      mask, routing="router", max_new_tokens=6, eos_ids=(0,))
    assert got.shape == (2, 6)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(idx, ref_idx)


def test_hf_loader_quantizes_per_layer_and_places_each_leaf(tmp_path):
    """A sharded HF checkpoint loaded with quantize='int8' and a leaf placer (FSDP over 4 devices) equals
    quantize_frozen of the float load, and arrives as sharded device arrays."""
    from tests._load_memory_worker import write_random_llama
    write_random_llama(tmp_path, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64,
                       dtype="float32", shards=3)
    cfg_f, float_tree = moa_jax.loading.load_checkpoint(str(tmp_path))
    mesh = make_mesh(MeshConfig(data=4, expert=1), jax.devices()[:4])
    cfg_q, placed = moa_jax.loading.load_checkpoint(str(tmp_path), quantize="int8", place=leaf_placer(mesh, True))
    assert cfg_q == replace(cfg_f, quantize="int8")
    want = flat_np(quantize_frozen(float_tree))
    got = traverse_util.flatten_dict(placed)
    assert {"/".join(k) for k in got} == set(want)
    for k, v in got.items():
        assert isinstance(v, jax.Array) and len(v.sharding.device_set) == 4
        np.testing.assert_array_equal(np.asarray(v), want["/".join(k)])


def test_bad_quantize_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"quantize='int4' is not supported; valid: \['none', 'int8'\]"):
        moa_jax.load_model("tiny-random", quantize="int4")
    with pytest.raises(ConfigError, match=r"ExperimentConfig.quantize='fp8' not in \('none', 'int8'\)"):
        apply_overrides(ExperimentConfig(), ["quantize=fp8"])
    with pytest.raises(ConfigError, match="ModelConfig.quantize"):
        replace(tiny_cfg(), quantize="int4")
    assert apply_overrides(ExperimentConfig(), ["quantize=int8"]).quantize == "int8"


def test_load_model_int8_generates(tmp_path):
    """The API path: load_model(..., quantize='int8') on the smoke experiment's tiny random base."""
    model = moa_jax.load_model("tiny-random", moa=MOA, quantize="int8")
    assert model.config.quantize == "int8"
    assert model.params["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.int8
    assert model.params["layers"]["mlp"]["up_proj"][SCALE_LEAF].shape == (2, 128)
    out = model.generate(["What is 2 + 3?"], max_new_tokens=4)
    assert len(out) == 1 and len(out[0].token_ids) <= 4
