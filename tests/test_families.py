"""Qwen3 and Gemma 3 text against transformers + torch + PEFT (float32), on tiny random checkpoints built on the fly.

Each family is one tiny Hugging Face checkpoint (3 layers, D 64, 4 query heads over 2 kv heads, head_dim 24 != D/H,
random norm scales so a norm mix-up shows): Qwen3 untied with its q/k norms; Gemma 3 tied, layer_types sliding /
full / sliding with a window of 8 < T = 32, its own RoPE base per kind (linear scaling on the global layer only),
query_pre_attn_scalar 20 != head_dim. Every test is parametrized over both; what each checks:
  logits      our base model and fresh MoA experts ('fixed': lora_b = 0) = transformers, past the window
              (and the window really changes transformers' logits, so the sequence is longer than it);
  decode      prefill + one token at a time through the KV cache, past the window = the full forward;
  gradients   stage-1 and stage-2 losses have finite gradients reaching every expert and router, and the
              stage-2 backward keeps no T x T residual;
  int8        the int8 base = the float model on its dequantised weights;
  peft        export_peft -> PEFT on the torch model = ours with each expert forced; from_peft of those adapters
              gives the same logits; export_merged of one -> AutoModelForCausalLM = ours forced;
  fsdp        the base split over 8 (forced CPU) devices gives the one-device logits.
Tolerance 1e-4 (f32, 3 layers, logits of order 3; measured ~3e-6).

Shape glossary: B batch, T tokens, V vocab, E experts, L layers.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import peft
import transformers
from flax import traverse_util

import moa_jax
from moa_jax.config import MeshConfig, MoAConfig, TrainConfig, replace
from moa_jax.export import export_peft
from moa_jax.loading import load_hf_checkpoint
from moa_jax.nn.model import MoATransformer, init_cache
from moa_jax.nn.quantize import SCALE_LEAF, dequantize, quantize_frozen
from moa_jax.params import init_trainable, merge_params
from moa_jax.sharding import make_mesh, param_shardings, put_params
from moa_jax.train.step import loss_fn

torch.set_num_threads(2)
TOL = 1e-4
T, WINDOW, V = 32, 8, 96
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=256, initializer_range=0.1)
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
FAMILIES = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(tie_word_embeddings=False)),
    "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
                    dict(sliding_window=WINDOW, query_pre_attn_scalar=20, rope_parameters=GEMMA_ROPE,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
MOA = MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, targets="all")
TOKENS = np.random.default_rng(0).integers(0, V, (2, T)).astype(np.int32)


def write_tiny(family: str, path, tokenizer: bool = True) -> None:
    """A tiny random checkpoint of `family` at `path` (safetensors; with a word-level tokenizer unless not)."""
    model_cls, config_cls, overrides = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**BASE, **overrides))
    with torch.no_grad():  # norm weights start at 1 (Qwen) or 0 (Gemma's 1 + w): randomised, so a mix-up shows
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0").save_pretrained(path)


def torch_model(family: str, path, **changes):
    model_cls = FAMILIES[family][0]
    config = transformers.AutoConfig.from_pretrained(path, **changes)
    return model_cls.from_pretrained(path, config=config, attn_implementation="eager", dtype=torch.float32).eval()


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def max_diff(a, b) -> float:
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    print(f"[families] max|diff| = {diff:.2e}")
    return diff


def randomise(tree, seed: int):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(family, checkpoint dir, torch model, our ModelConfig, our params as jax arrays)."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    write_tiny(family, path)
    cfg, params = load_hf_checkpoint(str(path))
    assert cfg.name == family and cfg.qk_norm and cfg.head_dim == 24
    assert cfg.tie_word_embeddings == (family == "gemma3_text")
    return family, str(path), torch_model(family, path), cfg, jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def forward(cfg):
    """The MoA model's forward with forced experts: the one program (per config) the tests share."""
    model = MoATransformer(cfg, MOA)
    return jax.jit(lambda params, tokens, idx: model.apply({"params": params}, tokens, routing="fixed",
                                                          expert_idx=idx)[0])


def ours(cfg, params, experts=(0, 0)):
    """Logits [B, T, V] of TOKENS with row b on expert experts[b]; `params` with experts (see with_experts)."""
    return np.asarray(forward(cfg)(params, jnp.asarray(TOKENS), jnp.asarray(experts, jnp.int32)))


@functools.lru_cache(maxsize=None)
def fresh_experts(cfg):
    """Fresh experts and routers of cfg's model (init_trainable compiles the model's init at every call)."""
    return init_trainable(replace(cfg, quantize="none"), MOA, jax.random.PRNGKey(0))


def with_experts(cfg, frozen, seed=None):
    """frozen + MoA experts: fresh (lora_b = 0: the base model exactly) or, with a seed, random."""
    trainable = fresh_experts(replace(cfg, quantize="none"))
    return merge_params(frozen, trainable if seed is None else randomise(trainable, seed))


def test_logits_match_transformers_past_the_window(tiny):
    family, path, model, cfg, params = tiny
    ref = torch_logits(model, TOKENS)
    assert max_diff(ours(cfg, with_experts(cfg, params), experts=(2, 0)), ref) <= TOL   # fresh experts = base
    if family == "gemma3_text":  # the window acts in transformers at T = 32, so the check above covers it
        unwindowed = torch_logits(torch_model(family, path, sliding_window=T), TOKENS)
        assert max_diff(unwindowed[:, WINDOW:], ref[:, WINDOW:]) > 100 * TOL
        assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")


def test_kv_cache_decode_matches_full_forward(tiny):
    """All 32 tokens fed one at a time through the KV cache (past the window of 8; one compiled step), experts
    randomised, rows on different experts = the full forward."""
    _, _, _, cfg, params = tiny
    full_params = with_experts(cfg, params, seed=2)
    model = MoATransformer(cfg, MOA)
    experts = jnp.array([1, 2], jnp.int32)
    step = jax.jit(lambda p, tok, cache: model.apply({"params": p}, tok, routing="fixed", cache=cache,
                                                     expert_idx=experts))
    full = ours(cfg, full_params, experts=(1, 2))
    cache, pieces = init_cache(cfg, 2, T), []
    for t in range(T):
        logits, aux = step(full_params, jnp.asarray(TOKENS[:, t:t + 1]), cache)
        cache = aux["cache"]
        pieces.append(np.asarray(logits))
    assert max_diff(np.concatenate(pieces, axis=1), full) <= TOL


def test_stage_gradients_are_finite_and_reach_every_expert(tiny):
    _, _, _, cfg, params = tiny
    trainable = randomise(fresh_experts(cfg), seed=3)
    rng = np.random.default_rng(1)
    mask = np.ones((2, T), np.int32)
    prompt = (np.arange(T)[None] < 12).astype(np.int32) * mask
    batch = {"tokens": jnp.asarray(TOKENS), "attention_mask": jnp.asarray(mask), "prompt_mask": jnp.asarray(prompt),
             "loss_mask": jnp.asarray(mask - prompt), "domain": jnp.asarray(rng.permutation(3)[:2], jnp.int32),
             "valid": jnp.ones((2,), jnp.int32)}

    def both(trainable):  # one program for both stages: the compile is most of this test's time
        return [jax.value_and_grad(functools.partial(loss_fn, model=MoATransformer(cfg, MOA),
                                                     tcfg=TrainConfig(stage=stage), num_domains=3), has_aux=True)(
            trainable, params, batch, jax.random.PRNGKey(0)) for stage in ("stage1", "stage2")]

    for stage, ((loss, _), grads) in zip(("stage1", "stage2"), jax.jit(both)(trainable)):
        flat = traverse_util.flatten_dict(grads)
        assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in flat.values()), stage
        used = np.asarray(batch["domain"])
        for path, g in flat.items():
            if path[-1] == "lora_a":   # the experts of the batch's domains get a gradient in every layer
                assert np.all(np.abs(np.asarray(g))[:, used].sum(axis=(2, 3)) > 0), (stage, path)
        routers = [g for path, g in flat.items() if "router" in path]
        assert routers and (stage == "stage1") == all(float(jnp.max(jnp.abs(g))) == 0 for g in routers), stage


def test_no_t_squared_residuals(tiny, monkeypatch):
    """The stage-2 backward keeps nothing of T x T size (the check of test_attention_loss_scale, on this family's
    features at widths under its T = 24, so only a T x T residual has two axes >= 24; query blocks of 8)."""
    from moa_jax.nn import layers
    from tests.test_attention_loss_scale import T as T_CHECK, _square_residuals
    monkeypatch.setattr(layers, "ATTENTION_QUERY_BLOCK", 8)
    cfg = replace(tiny[3], vocab_size=20, hidden_size=16, intermediate_size=20, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim_override=10,
                  layer_types=tiny[3].layer_types and ("sliding_attention", "full_attention"))
    for remat in ("full", "projections"):
        assert _square_residuals(replace(cfg, remat=remat), T_CHECK) == [], remat


def test_int8_base_equals_the_dequantized_float_model(tiny):
    _, _, _, cfg, params = tiny
    quantized = quantize_frozen(jax.device_get(params))
    flat = traverse_util.flatten_dict(quantized)
    deq = {}
    for k, v in flat.items():
        scale = flat.get(k[:-1] + (SCALE_LEAF,))
        if k[-1] != SCALE_LEAF:
            deq[k] = dequantize(v, scale) if k[-1] == "kernel" and scale is not None else v
    int8_cfg = replace(cfg, quantize="int8")
    int8 = ours(int8_cfg, with_experts(int8_cfg, jax.tree.map(jnp.asarray, quantized)))
    ref = ours(cfg, with_experts(cfg, jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(deq))))
    assert np.all(np.isfinite(int8)) and max_diff(int8, ref) <= TOL
    assert max_diff(int8, ours(cfg, with_experts(cfg, params))) > 1e-4   # quantisation really happened


def test_peft_export_import_and_merged_export(tiny, tmp_path):
    """export_peft -> PEFT on torch = ours forced, per expert; from_peft(those dirs) = ours; export_merged of
    expert 1 loaded by AutoModelForCausalLM = ours forced to it."""
    family, path, model, cfg, params = tiny
    trainable = randomise(fresh_experts(cfg), seed=4)
    names = ["a", "b", "c"]
    dirs = export_peft(trainable, cfg, MOA, str(tmp_path / "peft"), expert_names=names, base_model=path)
    full = merge_params(params, trainable)
    mine = [ours(cfg, full, experts=(e, e)) for e in range(3)]
    assert max_diff(mine[0], mine[1]) > 1e-3   # the experts differ, so a wrong expert index would fail below
    peft_model = peft.PeftModel.from_pretrained(model, dirs[0], adapter_name="a")
    for name, d in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(d, adapter_name=name)
    for e, name in enumerate(names):
        peft_model.set_adapter(name)
        assert max_diff(mine[e], torch_logits(peft_model, TOKENS)) <= TOL, name
    peft_model.unload()   # the module-scoped torch model gets its plain layers back
    imported = moa_jax.from_peft(path, dirs, dtype="float32")
    assert imported.domains == tuple(names)
    for e in range(3):
        assert max_diff(imported.logits(TOKENS, routing="forced", expert=e), mine[e]) <= TOL
    merged = imported.export_merged("b", str(tmp_path / "merged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(hf).__name__ == type(model).__name__
    assert max_diff(torch_logits(hf, TOKENS), mine[1]) <= TOL


def test_fsdp_on_8_devices_matches_one_device(tiny):
    _, _, _, cfg, params = tiny
    mesh = make_mesh(MeshConfig(data=8, expert=1, fsdp=True), jax.devices()[:8])
    full = jax.device_get(with_experts(cfg, params, seed=5))
    sharded = put_params(full, param_shardings(mesh, full, fsdp=True))
    split = [k for k, v in traverse_util.flatten_dict(sharded).items() if len(v.sharding.device_set) == 8
             and not v.sharding.is_fully_replicated]
    assert ("layers", "attn", "q_norm", "scale") in split and ("embed", "embedding") in split
    assert max_diff(ours(cfg, sharded, (0, 2)), ours(cfg, jax.tree.map(jnp.asarray, full), (0, 2))) <= 1e-5


def test_checkpoint_without_tokenizer_loads_for_logits(tmp_path):
    """Weights and config but no tokenizer files: load_model computes logits, generate() names what is missing."""
    write_tiny("qwen3", tmp_path, tokenizer=False)
    model = moa_jax.load_model(str(tmp_path), dtype="float32")
    assert model.tokenizer is None
    assert max_diff(model.logits(TOKENS, routing="base"), torch_logits(torch_model("qwen3", tmp_path), TOKENS)) <= TOL
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate(["hi"])


def test_family_config_json_round_trips(tiny, tmp_path):
    """The config.json a merged export of a GGUF-sourced base would carry reads back to the same ModelConfig."""
    import json
    from moa_jax.loading.hf import family_config_json, load_hf_config
    cfg = tiny[3]
    (tmp_path / "config.json").write_text(json.dumps(family_config_json(cfg)))
    assert load_hf_config(str(tmp_path)) == cfg


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma2"}, "model_type 'gemma2'"),
    ({"layer_types": ["chunked_attention", "full_attention", "sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ({"hidden_act": "relu"}, "hidden_act"),
])
def test_unsupported_config_fields_are_one_line_errors(tmp_path, change, field):
    """Each a UserError (one `error:` line at the command line) naming the field."""
    import json
    from moa_jax.errors import UserError
    from moa_jax.loading.hf import load_hf_config
    write_tiny("qwen3", tmp_path, tokenizer=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=field) as info:
        load_hf_config(str(tmp_path))
    assert len(str(info.value).splitlines()) == 1


def test_multimodal_gemma3_checkpoint_loads_its_text_tower(tmp_path):
    """A `gemma3` (image-text) directory: config.json's text_config, keys under model.language_model., the vision
    tower's tensors left unread. Same ModelConfig and weights as the text-only checkpoint."""
    import json
    from safetensors.numpy import load_file, save_file
    path = str(tmp_path / "text")
    write_tiny("gemma3_text", path, tokenizer=False)
    cfg, params = load_hf_checkpoint(path)
    tmp_path = tmp_path / "multimodal"
    tmp_path.mkdir()
    text = json.load(open(os.path.join(path, "config.json")))
    json.dump({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text},
              open(tmp_path / "config.json", "w"))
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    mm_cfg, mm_params = load_hf_checkpoint(str(tmp_path))
    assert mm_cfg == cfg
    flat, mm_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mm_params)
    assert flat.keys() == mm_flat.keys() and all(np.array_equal(flat[k], mm_flat[k]) for k in flat)
