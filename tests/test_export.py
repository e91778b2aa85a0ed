"""PEFT export: each exported expert, loaded by Hugging Face PEFT onto the torch model, gives the logits our model
gives with that expert forced."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # test extra (requirements-test.txt)
import peft  # noqa: E402
import transformers  # noqa: E402

from moa_jax.config import MoAConfig  # noqa: E402
from moa_jax.export import export_peft  # noqa: E402
from moa_jax.loading import load_hf_checkpoint  # noqa: E402
from moa_jax.nn.model import MoATransformer  # noqa: E402
from moa_jax.params import init_trainable, merge_params  # noqa: E402


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def _randomise(trainable, seed):
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_exported_expert_matches_peft(tiny_hf, tmp_path):
    torch.set_num_threads(2)
    cfg, frozen = load_hf_checkpoint(str(tiny_hf))
    moa = MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, targets=("q", "v", "down"))
    trainable = _randomise(init_trainable(cfg, moa, jax.random.PRNGKey(0)), seed=1)
    dirs = export_peft(trainable, cfg, moa, str(tmp_path / "export"), expert_names=["a", "b", "c"],
                       base_model=str(tiny_hf))
    assert json.loads((tmp_path / "export" / "router.json").read_text())["experts"] == ["a", "b", "c"]

    tokens = np.array([[1, 5, 9, 22, 40, 7, 3, 60]], np.int32)
    params = merge_params(jax.tree_util.tree_map(jnp.asarray, frozen), trainable)
    model = MoATransformer(cfg, moa)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_hf, torch_dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, dirs[0], adapter_name="a")
    for name, d in zip(("b", "c"), dirs[1:]):
        peft_model.load_adapter(d, adapter_name=name)
    diffs = []
    for e, name in enumerate(("a", "b", "c")):
        ours, _ = model.apply({"params": params}, jnp.asarray(tokens), routing="fixed",
                              expert_idx=jnp.full((1,), e, jnp.int32))
        peft_model.set_adapter(name)
        with torch.no_grad():
            theirs = peft_model(torch.from_numpy(tokens).long()).logits.numpy()
        diffs.append(float(np.max(np.abs(np.asarray(ours) - theirs))))
    assert max(diffs) < 1e-4, diffs
    # the experts really differ, so the check above could fail for a wrong expert index
    ours_a, _ = model.apply({"params": params}, jnp.asarray(tokens), routing="fixed", expert_idx=jnp.zeros((1,), jnp.int32))
    ours_b, _ = model.apply({"params": params}, jnp.asarray(tokens), routing="fixed", expert_idx=jnp.ones((1,), jnp.int32))
    assert float(jnp.max(jnp.abs(ours_a - ours_b))) > 1e-3
