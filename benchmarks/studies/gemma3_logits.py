"""Gemma 3 270M (Q4_K_M GGUF): our float32 logits against transformers loading the same file, on 20 real prompts.

  bash scripts/setup_env.sh --gemma3-270m        # once: the optional model (~240 MB; Gemma terms apply)
  python -m benchmarks.studies.gemma3_logits [--out gemma3_logits.json]

Both sides dequantise the same GGUF tensors (Q4_K, Q6_K, Q5_0, Q8_0, F32) to float32: ours with moa_jax.loading
(norms stored 1 + w by llama.cpp, sliding/global layers, the 262k-entry tied head), transformers with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, torch float32. The prompts are tokenised once (our
GGUF tokenizer, bos first) and fed to both; ours run as right-padded batches (causal: padding after a row's last
token cannot change its logits), transformers one prompt at a time. Reported, over every real token of every
prompt: max |diff| and mean |diff| of the logits, the largest |logit| (for scale), greedy next-token agreement at
every position and at each prompt's last position (the token a generation would emit first).
Prints one JSON object (and writes it to --out). Expected runtime on the 2-core CPU: about 2 minutes.

Shape glossary: B batch, T tokens, V vocab.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The three primary colors are red, blue and",
    "Question: What is 12 plus 30?\nAnswer:",
    "In 1969, the first humans to walk on the Moon were",
    "import numpy as np\nx = np.arange(10)\nprint(x.",
    "Photosynthesis is the process by which plants",
    "Translate to French: Good morning, how are you?\nFrench:",
    "The largest planet in our solar system is",
    "Once upon a time, in a small village by the sea,",
    "SELECT name, age FROM users WHERE",
    "The chemical symbol for gold is",
    "List of prime numbers: 2, 3, 5, 7, 11,",
    "Der schnelle braune Fuchs springt über",
    "To make a cup of tea, first boil the water, then",
    "The Pythagorean theorem states that",
    "东京是日本的",
    "My favourite programming language is Python because",
    "Monday, Tuesday, Wednesday,",
]
BATCH = 5   # rows per forward: 5 x ~20 tokens x 262k vocab f32 logits is ~100 MB


def our_logits(cfg, params, seqs: list[list[int]]) -> list[np.ndarray]:
    from moa_jax.nn.model import MoATransformer
    model = MoATransformer(cfg)
    forward = jax.jit(lambda p, tokens, mask: model.apply({"params": p}, tokens, attention_mask=mask,
                                                          routing="base")[0])
    width = max(map(len, seqs))
    out = []
    for start in range(0, len(seqs), BATCH):
        rows = seqs[start:start + BATCH]
        tokens = np.zeros((BATCH, width), np.int32)
        mask = np.zeros_like(tokens)
        for r, s in enumerate(rows):
            tokens[r, :len(s)], mask[r, :len(s)] = s, 1
        logits = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)))        # (B, T, V)
        out += [logits[r, :len(s)] for r, s in enumerate(rows)]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    import torch
    import transformers
    from moa_jax.loading import load_gguf, load_tokenizer, resolve_source
    torch.set_num_threads(os.cpu_count() or 1)

    path = resolve_source("gemma3-270m")[1]
    t0 = time.perf_counter()
    cfg, params = load_gguf(path)
    tok = load_tokenizer(path)
    load_s = time.perf_counter() - t0
    seqs = [tok(p)["input_ids"] for p in PROMPTS]
    t0 = time.perf_counter()
    ours = our_logits(cfg, jax.device_put(params), seqs)
    ours_s = time.perf_counter() - t0
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    max_diff, sum_diff, count, agree, last_agree, scale, rows = 0.0, 0.0, 0, 0, 0, 0.0, []
    for prompt, s, mine in zip(PROMPTS, seqs, ours):
        with torch.no_grad():
            ref = theirs_model(torch.as_tensor([s])).logits[0].float().numpy()                # (T, V)
        d = np.abs(mine.astype(np.float64) - ref)
        same = mine.argmax(-1) == ref.argmax(-1)
        max_diff, sum_diff, count = max(max_diff, float(d.max())), sum_diff + float(d.mean()) * len(s), count + len(s)
        agree, last_agree = agree + int(same.sum()), last_agree + int(same[-1])
        scale = max(scale, float(np.abs(ref).max()))
        rows.append({"prompt": prompt, "tokens": len(s), "max_abs_diff": float(d.max()),
                     "next_token": tok.decode([int(mine[-1].argmax())]), "next_token_agrees": bool(same[-1])})
    result = {"model": "gemma3-270m", "file": os.path.basename(path), "prompts": len(PROMPTS), "tokens": count,
              "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / count, "max_abs_logit": scale,
              "greedy_agreement_all_positions": agree / count,
              "greedy_agreement_last_position": last_agree / len(PROMPTS),
              "load_s": round(load_s, 1), "our_forward_s": round(ours_s, 1), "per_prompt": rows}
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    return result


if __name__ == "__main__":
    main()
