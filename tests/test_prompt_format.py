"""DataConfig.prompt_format (moa_jax/data/prompt_format.py) on tiny tokenizers built on the fly:
  - plain: bos, system prompt + blank line, user text + newline, then response + eos; the loss mask covers the
    response and eos only;
  - auto is chat with a chat template and plain without; chat without a template, an unknown value and a template
    that refuses a system turn are one-line ConfigErrors naming the field;
  - a stage config records the resolved format, load_run / load_model(adapters=) read it back and format prompts
    with it (a recorded plain stays plain on a tokenizer with a template; a config without the field is chat);
  - training tokenisation, MoAModel.encode_prompt and the exported reference_router.py give the same prompt ids,
    router logits and expert for plain, chat and a Gemma-style chat template that folds the system prompt into
    the first user turn.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moa_jax.config import ConfigError, DataConfig, ExperimentConfig, MoAConfig, TrainConfig
from moa_jax.data.pipeline import collate
from moa_jax.data.prompt_format import plain_text, resolve_prompt_format
from moa_jax.data.sources import TextSplit
from moa_jax.data.tokenize import tokenize_split
from tests.conftest import make_tiny_cfg
from tests.data_helpers import tiny_tokenizer

SYSTEM = "Be brief."
EXAMPLES = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "response": "5"},
            {"messages": [{"role": "system", "content": "Own rule."}, {"role": "user", "content": "Spell cat"}],
             "response": "tac"},
            {"messages": [{"role": "user", "content": "Sort 3 1 2"}], "response": "1 2 3"}]
# Gemma 3's shape: no system role, the system message is folded into the first user turn.
GEMMA_STYLE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
               "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
               "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
               "{% for m in turns %}<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
               "{{ (prefix if loop.first else '') + m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")


def _tokenizer(template="none", bos=True):
    """The tiny tokenizer with another chat template ("none": a base model's tokenizer, without one)."""
    tok = tiny_tokenizer()
    tok.chat_template = {"none": None, "gemma": GEMMA_STYLE, "no_system": NO_SYSTEM}.get(template, tok.chat_template)
    if bos:
        tok.bos_token = "<|im_start|>"   # any special token: the tiny vocabulary has no <bos>
    return tok


def _split():
    return TextSplit("t:test", ("d",), {"d": [dict(e) for e in EXAMPLES]})


def test_plain_tokens_and_loss_mask_without_a_chat_template():
    tok = _tokenizer()
    data = tokenize_split(_split(), tok, max_len=256, system_prompt=SYSTEM)     # prompt_format auto -> plain
    bos, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    texts = ["<|im_start|>Be brief.\n\nWhat is 2 + 3?\n", "<|im_start|>Own rule.\n\nSpell cat\n",
             "<|im_start|>Be brief.\n\nSort 3 1 2\n"]
    for i, (text, ex) in enumerate(zip(texts, EXAMPLES)):
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        response = tok(ex["response"], add_special_tokens=False)["input_ids"]
        assert prompt[0] == bos and data.prompt_len[i] == len(prompt)
        assert data.tokens(i).tolist() == prompt + response + [eos]
    batch = collate(data, np.arange(3), 64)
    for i in range(3):
        p, n = int(data.prompt_len[i]), len(data.tokens(i))
        assert batch["loss_mask"][i].tolist() == [0] * p + [1] * (n - p) + [0] * (64 - n)   # response + eos
        assert batch["prompt_mask"][i].tolist() == [1] * p + [0] * (64 - p)
    # no bos, no system prompt: the user text and a newline; an empty system message adds nothing
    assert plain_text([{"role": "user", "content": "q"}], None) == "q\n"
    assert plain_text([{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}], "<s>") == "<s>q\na\nr\n"


def test_auto_is_chat_with_a_template_and_plain_without():
    with_template, without = tiny_tokenizer(), _tokenizer()
    assert resolve_prompt_format("auto", with_template) == "chat"
    assert resolve_prompt_format("auto", without) == "plain"
    assert resolve_prompt_format("plain", with_template) == "plain"
    assert DataConfig().prompt_format == "auto"
    # with a template, auto tokenises exactly as chat: the default stays what it was
    auto = tokenize_split(_split(), with_template, max_len=256, system_prompt=SYSTEM)
    chat = tokenize_split(_split(), with_template, max_len=256, system_prompt=SYSTEM, prompt_format="chat")
    assert auto.flat.tolist() == chat.flat.tolist() and auto.prompt_len.tolist() == chat.prompt_len.tolist()
    assert tiny_tokenizer().decode(auto.tokens(0)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_chat_without_a_template_and_bad_values_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"data\.prompt_format=chat but the tokenizer has no chat template.*"
                                          r"data\.prompt_format=plain") as e:
        tokenize_split(_split(), _tokenizer(), max_len=256, prompt_format="chat")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"DataConfig\.prompt_format='xml' not in \('auto', 'chat', 'plain'\)"):
        DataConfig(prompt_format="xml")
    with pytest.raises(ConfigError, match=r"refuses the prompt \(System role not supported\).*"
                                          r"data\.system_prompt=None") as e:
        tokenize_split(_split(), _tokenizer("no_system"), max_len=256, system_prompt=SYSTEM)
    assert "\n" not in str(e.value)
    no_system = [{"messages": [{"role": "user", "content": "q"}], "response": "a"}]
    assert len(tokenize_split(TextSplit("t", ("d",), {"d": no_system}), _tokenizer("no_system"), max_len=64)) == 1


def _tiny_base(tok, moa, directory):
    """A random tiny Llama for `tok` with random routers and zero experts, and the base saved as a transformers
    checkpoint in `directory` (with the tokenizer). -> (cfg, params, trainable)."""
    from moa_jax.export import export_merged
    from moa_jax.params import merge_params
    from tests.train_helpers import init_trees
    cfg = make_tiny_cfg(vocab_size=len(tok), max_position_embeddings=128)
    frozen, trainable = init_trees(cfg, moa)
    trainable = traverse_util.unflatten_dict({k: np.zeros_like(v) if k[-1] == "lora_b" else v
                                              for k, v in traverse_util.flatten_dict(trainable).items()})
    params = merge_params(frozen, trainable)                           # zero experts: the merged model is the base
    export_merged(params, cfg, moa, 0, directory, tokenizer=tok)
    return cfg, params, trainable


def test_the_recorded_format_round_trips_through_adapters_and_load_run(tmp_path):
    import moa_jax
    from moa_jax.train.checkpoint import save_adapters
    from moa_jax.workflows.context import ExperimentContext
    tok, base = tiny_tokenizer(), str(tmp_path / "base")                # a tokenizer with a chat template
    moa = MoAConfig(num_experts=2, rank=2, alpha=4.0, targets=("q_proj",))
    cfg, _, trainable = _tiny_base(tok, moa, base)

    def stage_config(fmt):   # what training writes into <stage>/adapters/config.json
        exp = ExperimentConfig(model=base, moa=moa, data=DataConfig(source="jsonl:x", prompt_format=fmt))
        ctx = ExperimentContext(exp, str(tmp_path), cfg, tok, None, None, None, {}, ("a", "b"))
        return ctx.config_dict("stage2", moa, TrainConfig(stage="stage2"))
    assert stage_config("auto")["data"]["prompt_format"] == "chat"    # resolved, never "auto"
    assert stage_config("plain")["data"]["prompt_format"] == "plain"

    def run_dir(name, config):
        workdir = tmp_path / name
        save_adapters(str(workdir / "stage2" / "adapters"), trainable, config)
        (workdir / "config.json").write_text(json.dumps({"data": config["data"]}))
        return str(workdir)
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = moa_jax.load_run(run_dir("plain", stage_config("plain")))
    assert plain.prompt_format == "plain"                              # recorded plain wins over the template
    ids = plain.encode_prompt("What is 2 + 3?", None)
    assert ids == tok(plain_text(question, tok.bos_token), add_special_tokens=False)["input_ids"]
    direct = moa_jax.load_model(base, adapters=str(tmp_path / "plain" / "stage2" / "adapters"))
    assert direct.prompt_format == "plain" and direct.encode_prompt("What is 2 + 3?", None) == ids
    old = stage_config("auto")
    del old["data"]["prompt_format"]                                   # saved before the field existed: chat
    chat = moa_jax.load_run(run_dir("old", old))
    assert chat.prompt_format == "chat"
    before = tok.apply_chat_template(question, add_generation_prompt=True)   # how encode_prompt tokenised until now
    assert chat.encode_prompt("What is 2 + 3?", None) == list(before["input_ids"] if hasattr(before, "keys") else before)


@pytest.mark.parametrize("template", ["none", "chatml", "gemma"])
def test_reference_router_formats_and_routes_as_moa_jax(template, tmp_path):
    from moa_jax import reference_router
    from moa_jax.api import MoAModel
    from moa_jax.generate.decode import left_pad, route_from_prompt
    tok, out, base = _tokenizer(template), str(tmp_path / "export"), str(tmp_path / "base")
    moa = MoAConfig(num_experts=3, rank=2, alpha=4.0, targets=("q_proj",), route_on="probe")
    cfg, params, _ = _tiny_base(tok, moa, base)
    fmt = "plain" if template == "none" else "chat"
    model = MoAModel(cfg, moa, params, tok, "", domains=("a", "b", "c"), system_prompt=SYSTEM, prompt_format=fmt)
    model.export_peft(out)
    spec = json.load(open(os.path.join(out, "router.json")))["prompt"]
    assert spec["format"] == fmt and (spec["plain"] is None) == (fmt == "chat")

    # training's prompt tokens == encode_prompt == the reference router's
    train = tokenize_split(_split(), tok, max_len=128, system_prompt=SYSTEM, prompt_format=fmt)
    ours = [train.tokens(i)[:train.prompt_len[i]].tolist() for i in range(len(train))]
    prompts = [e["messages"] for e in EXAMPLES]
    assert [model.encode_prompt(p) for p in prompts] == ours
    router = reference_router.load(out, base_model=base)
    assert [router.prompt_ids(p) for p in prompts] == ours
    assert router.prompt_ids("What is 2 + 3?") == ours[0]
    if template == "gemma":   # the system prompt sits in the first user turn, in training as at inference
        assert tok.decode(ours[0]).startswith("<|im_start|><|im_start|>user\nBe brief.\n\nWhat is 2 + 3?")

    tokens, mask = left_pad(ours, 0)
    idx, logits = route_from_prompt(cfg, moa, params, jnp.asarray(tokens), jnp.asarray(mask))
    theirs = np.stack([router.logits(p) for p in prompts], axis=1)     # (L, N, E)
    np.testing.assert_allclose(theirs, np.asarray(logits), atol=1e-4)
    assert [router.route(p) for p in prompts] == [model.domains[int(i)] for i in np.asarray(idx)]
