"""Shared helpers for the data tests: a tiny chat tokenizer built on the fly (nothing downloaded) and JSONL writers."""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(corpus=(), vocab_size=400):
    """Byte-level BPE (any text encodes, no unknown tokens) with a ChatML-style template; eos = <|im_end|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["the quick brown fox jumps over the lazy dog 0123456789", "user assistant system Reply answer"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(base) + list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def make_jsonl_dir(root, n_per_domain=(30, 12, 6), long_every=0):
    """Flat dir with three domains of different sizes; every `long_every`-th 'alpha' row is very long."""
    for name, n in zip(("alpha", "beta", "gamma"), n_per_domain):
        rows = []
        for i in range(n):
            prompt = f"{name} question number {i}: what is {i} plus {i}?" + " and then" * (12 if i % 7 == 0 else 0)
            if long_every and name == "alpha" and i % long_every == 0:
                prompt += " filler" * 200
            rows.append({"prompt": prompt, "response": f"{2 * i}"} if i % 2 else
                        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(2 * i)}]})
        write_jsonl(os.path.join(root, f"{name}.jsonl"), rows)
    return str(root)


def make_census_dir(root):
    """Split folders with line-level domains and two typos: train/math.jsonl holds 120 'math' lines and 1 'mth'
    (< 1% of the 204 lines), train/code.jsonl 60 'code' and 3 'cdoe' (only inside another domain's file), and
    train/mixed.jsonl 20 'chat' lines (a mixed file: not a typo). validation/ and test/ hold 2 lines per domain."""
    def rows(domain, n, tag):
        return [{"domain": domain, "prompt": f"{tag} {domain} question {i}", "response": f"answer {i}"}
                for i in range(n)]
    write_jsonl(os.path.join(root, "train", "math.jsonl"), rows("math", 120, "t") + rows("mth", 1, "t"))
    write_jsonl(os.path.join(root, "train", "code.jsonl"), rows("code", 60, "t") + rows("cdoe", 3, "t"))
    write_jsonl(os.path.join(root, "train", "mixed.jsonl"), rows("chat", 20, "t"))
    for split in ("validation", "test"):
        write_jsonl(os.path.join(root, split, "all.jsonl"),
                    [r for d in ("math", "mth", "code", "cdoe", "chat") for r in rows(d, 2, split)])
    return str(root)


# A minimal local tfds "catalog" dataset, to test the tfds:NAME source path without TensorFlow or internet.
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402


class MoaTestQa(tfds.core.GeneratorBasedBuilder):
    """Two topics of question/answer pairs (registered as 'moa_test_qa' when this module is imported)."""
    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(), "answer": tfds.features.Text(),
            "topic": tfds.features.ClassLabel(names=["geo", "math"]), "id": tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 20), "test": self._generate_examples(100, 6)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            yield i, {"question": f"question {i}?", "answer": f"answer {i}", "topic": i % 2, "id": i}
