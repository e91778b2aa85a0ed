"""Top-k / nucleus sampling (moa_jax/generate/sampling.py) and the token stream (moa_jax/generate/stream.py):
  - pick() on a distribution we know: every draw lies in the top-k set / the nucleus, every kept token is drawn,
    at the renormalised frequencies; top_k=1 and a tiny top_p give the argmax (greedy's token);
  - decoding a tiny random model: a tiny top_p equals greedy; sampled tokens lie in the top-k set and the
    nucleus of the model's own (full-forward) distribution (and are not all its argmax);
  - bad values are one SamplingError (a UserError), before anything compiles;
  - incremental detokenisation holds back incomplete UTF-8 characters (byte-level BPE and SentencePiece
    byte fallback) and its pieces concatenate to the full decode;
  - MoAModel.generate_stream's pieces concatenate to generate's text and tokens (greedy, routed), and leaving the
    loop early stops the decoding thread.
The model's vocabulary (300) covers the tokenizer's 256 byte tokens, so random answers hold split characters.
"""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.api import MoAModel
from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.generate import decode
from moa_jax.generate.sampling import SamplingError, check_sampling, pick
from moa_jax.generate.stream import TextStream
from moa_jax.errors import UserError
from tests.train_helpers import randomised_model

CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  name="tiny-sample-test")
MOA = MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0)
NEW = 16
PROMPTS = [[17, 40, 250, 33], [60, 61, 62, 63, 64, 65, 66, 280], [100, 290]]


@pytest.fixture(scope="module")
def model():
    from moa_jax import loading
    tokenizer = loading.load_tokenizer(loading.DEFAULT_MODEL)       # SmolLM2's byte-level BPE, eos id 2
    return MoAModel(CFG, MOA, randomised_model(CFG, MOA, router_scale=2.0), tokenizer, "tiny-sample-test")


def _draws(logits, n: int, temperature: float = 1.0, top_p: float = 1.0, **static) -> np.ndarray:
    """n draws (one per row, one key) from pick() on the same logits [V]."""
    rows = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
    return np.asarray(pick(rows, jax.random.PRNGKey(0), jnp.float32(temperature), jnp.float32(top_p), **static))


def test_pick_draws_only_from_the_top_k_set_and_the_nucleus():
    probs = np.array([0.05, 0.40, 0.02, 0.25, 0.15, 0.08, 0.03, 0.02])
    logits = np.log(probs)
    n = 4000
    assert (_draws(logits, 3, greedy=True) == 1).all()
    top3 = _draws(logits, n, greedy=False, top_k=3)
    assert set(top3.tolist()) == {1, 3, 4}                             # all of the top 3 drawn, nothing else
    want = probs[[1, 3, 4]] / probs[[1, 3, 4]].sum()
    np.testing.assert_allclose([np.mean(top3 == t) for t in (1, 3, 4)], want, atol=0.03)
    # nucleus 0.6: 0.40 + 0.25 = 0.65 reaches it, so {1, 3}; 0.66 needs the 0.15 too
    assert set(_draws(logits, n, top_p=0.6, greedy=False, nucleus=True).tolist()) == {1, 3}
    assert set(_draws(logits, n, top_p=0.66, greedy=False, nucleus=True).tolist()) == {1, 3, 4}
    assert set(_draws(logits, n, top_p=1e-6, greedy=False, nucleus=True).tolist()) == {1}   # at least one token
    # top-k first, then the nucleus of the renormalised top 2: 0.40 / 0.65 = 0.615 < 0.7, so both stay
    both = _draws(logits, n, top_p=0.7, greedy=False, top_k=2, nucleus=True)
    assert set(both.tolist()) == {1, 3}
    # temperature before the filters: at T=4 the distribution flattens and 0.6 needs more than two tokens
    assert len(set(_draws(logits, n, temperature=4.0, top_p=0.6, greedy=False, nucleus=True).tolist())) > 2
    assert set(_draws(logits, n, greedy=False, top_k=1000).tolist()) == set(range(8))   # top_k >= V: all


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(1), (64, 300)) * 3
    argmax = np.asarray(pick(logits, None, 1.0, 1.0, greedy=True))
    for static, top_p in ((dict(top_k=1), 1.0), (dict(nucleus=True), 1e-6), (dict(top_k=5, nucleus=True), 1e-6)):
        for seed in range(3):
            drawn = pick(logits, jax.random.PRNGKey(seed), jnp.float32(1.5), jnp.float32(top_p), greedy=False, **static)
            np.testing.assert_array_equal(drawn, argmax, err_msg=str(static))
    assert (np.asarray(pick(logits, jax.random.PRNGKey(0), 1.5, 1.0, greedy=False)) != argmax).any()


def test_sampling_against_greedy_and_the_model_distribution(model):
    """A tiny top_p equals greedy; each token drawn with top_k=3 and top_p=0.6 lies in the top 3 of a full forward
    over prompt + answer (no cache) at that temperature, and in the nucleus of those 3. One prompt at a time: the
    greedy program is the one generate([prompt]) uses below."""
    temperature, non_argmax = 2.0, 0
    for prompt in PROMPTS:
        tokens, mask = decode.left_pad([prompt], pad_id=2)

        def generate(**kw):
            return decode.generate_tokens(CFG, MOA, model.params, tokens, mask, routing="forced", expert=1,
                                          max_new_tokens=NEW, eos_ids=(2,), seed=5, **kw)[0]
        np.testing.assert_array_equal(generate(temperature=1.0, top_k=3, top_p=1e-6), generate())
        out = generate(temperature=temperature, top_k=3, top_p=0.6)          # the same program as the line above
        logits = model.logits(np.concatenate([tokens, out], 1), attention_mask=np.concatenate([mask, out * 0 + 1], 1),
                              routing="forced", expert=1)[:, tokens.shape[1] - 1:-1] / temperature   # [1, N, V]
        order = np.argsort(-logits, -1)[..., :3]                            # the top 3, best first [1, N, 3]
        live = np.cumprod(out != 2, 1).astype(bool)                         # up to the first EOS
        assert ((order == out[..., None]).any(-1) | ~live).all()            # every draw in the top 3
        rank = np.argmax(order == out[..., None], -1)                       # [1, N]
        top = np.exp(np.take_along_axis(logits, order, -1) - logits.max(-1, keepdims=True))
        top /= top.sum(-1, keepdims=True)                                   # renormalised over the top 3
        before = np.take_along_axis(np.cumsum(top, -1) - top, rank[..., None], -1)[..., 0]  # better tokens' mass
        assert (before[live] < 0.6 + 1e-4).all(), before                    # every draw in the nucleus
        non_argmax += int((rank[live] > 0).sum())
    assert non_argmax, "every draw was the argmax: the check is vacuous"


def test_bad_sampling_values_are_one_user_error(model):
    for kw, message in ((dict(top_p=0.0), r"top_p=0.0: give a probability in \(0, 1\]"),
                        (dict(top_p=1.5), r"top_p=1.5"), (dict(top_p=float("nan")), r"top_p=nan"),
                        (dict(top_k=-1), r"top_k=-1: give a whole number >= 0"), (dict(top_k=2.5), r"top_k=2.5"),
                        (dict(temperature=0.0, top_k=5), r"top_k=5 filters sampling, but temperature=0.0 decodes "
                                                          r"greedily: give temperature > 0")):
        args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
        with pytest.raises(SamplingError, match=message) as err:
            check_sampling(**args)
        assert isinstance(err.value, UserError)
        with pytest.raises(SamplingError, match=message):
            model.generate(PROMPTS[:1], **args)
        with pytest.raises(SamplingError, match=message):
            model.generate_stream(PROMPTS[0], **args)
    check_sampling(0.0, 0, 1.0)
    check_sampling(0.7, np.int64(40), np.float32(0.9))


def _sentencepiece_tokenizer():
    """A Llama-style SentencePiece BPE with byte fallback: '▁' word starts, <0xNN> tokens for unknown characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "h", "i", "▁h", "▁hi", "o", "k", "▁o", "▁ok"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i"), ("▁", "o"), ("▁o", "k")],
                               byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def test_text_stream_holds_back_incomplete_characters(model):
    text = "hi é ok 日本 🙂 ok"
    for tokenizer in (model.tokenizer, _sentencepiece_tokenizer()):
        ids = getattr(tokenizer.encode(text), "ids", None) or tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        stream = TextStream(tokenizer)
        pieces = [stream.add(i) for i in ids]
        assert "".join(pieces) + stream.flush() == text
        assert not any("\ufffd" in p for p in pieces)
        assert pieces.count("") >= 2, pieces          # é, 日, 本 and 🙂 are split over tokens
    stream = TextStream(model.tokenizer)              # a character that never completes comes out at the end
    lone = model.tokenizer.convert_tokens_to_ids("Ã")   # the byte 0xC3: the start of a 2-byte character
    assert stream.add(lone) == "" and stream.flush() == "\ufffd"


def test_stream_concatenates_to_generate(model):
    held, routed = 0, set()
    for prompt in PROMPTS:
        want = model.generate([prompt], max_new_tokens=NEW)[0]
        pieces = list(model.generate_stream(prompt, max_new_tokens=NEW))
        experts = {p.expert for p in pieces}
        assert "".join(p.text for p in pieces) == want.text and experts == {want.expert}
        assert sum((p.token_ids for p in pieces), ()) == want.token_ids
        held += sum(len(p.token_ids) > 1 for p in pieces)
        routed |= experts
    assert held, "no piece held back a split character: the detokenisation check is vacuous"
    assert len(routed) >= 2, "the routers sent every prompt to one expert"


def test_leaving_the_stream_early_stops_decoding(model):
    """The host's answer ends the decoding loop (the stream program generate_stream compiled above, B = 1);
    closing the generator stops and joins its thread."""
    want = model.generate([PROMPTS[1]], max_new_tokens=NEW)[0].token_ids
    assert len(want) > 3
    tokens, mask = decode.left_pad([PROMPTS[1]], pad_id=model.tokenizer.pad_token_id)
    steps = []
    out, _, _ = decode.generate_tokens(CFG, MOA, model.params, tokens, mask, max_new_tokens=NEW,
                                       eos_ids=decode.eos_ids(model.tokenizer),
                                       on_token=lambda step, new, experts: steps.append(step) or step == 2)
    assert steps == [0, 1, 2] and out[0, :3].tolist() == list(want[:3]) and not out[0, 3:].any()
    stream = model.generate_stream(PROMPTS[1], max_new_tokens=NEW)
    first = next(stream)
    stream.close()
    assert first.text and first.token_ids == want[:len(first.token_ids)]
    assert not [t for t in threading.enumerate() if t.name == "moa_jax-decode-stream"]
    assert decode._LISTENERS == {}
