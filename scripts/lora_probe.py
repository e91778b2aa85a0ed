"""Short single-domain LoRA probe (PyTorch+PEFT on the embedded GGUF) to check a domain is learnable at 135M.

    python scripts/lora_probe.py --domain spell_backward --steps 60 --n-test 50

Setup: r=16 on all projections, lr 5e-4, batch 8, f32, 2 threads; loss on the
response + eos only; greedy eval (max 16 new tokens) on the first n-test test items (the builder's test head),
training on later items of the same stream (never the test prompts).
"""
import argparse
import time

import numpy as np
import torch

from moa_jax.data import tasks
from scripts.measure_domains import gguf_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = gguf_path()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    stream = list(tasks.generate(args.domain, args.n_test + args.steps * 8))
    test, train = stream[:args.n_test], stream[args.n_test:]

    def prompt_ids(e):
        conv = [{"role": "system", "content": tasks.TASK_SYSTEM_PROMPT}, {"role": "user", "content": e["prompt"]}]
        return tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    t0 = time.time()
    for s in range(args.steps):
        seqs, labels = [], []
        for e in train[s * 8:(s + 1) * 8]:
            p = prompt_ids(e)
            r = tok(e["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + r)
            labels.append([-100] * len(p) + r)
        T = max(map(len, seqs))
        ids = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in seqs])
        lab = torch.tensor([x + [-100] * (T - len(x)) for x in labels])
        att = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in seqs])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if s % 10 == 0:
            print(f"step {s} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    tok.padding_side = "left"
    correct = []
    for i in range(0, len(test), 25):
        batch = test[i:i + 25]
        convs = [[{"role": "system", "content": tasks.TASK_SYSTEM_PROMPT}, {"role": "user", "content": e["prompt"]}]
                 for e in batch]
        enc = tok(tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True), return_tensors="pt",
                  padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        preds = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += [tasks.is_correct(args.domain, tasks.extract_answer(p), e) for p, e in zip(preds, batch)]
        print([(e["answer"], tasks.extract_answer(p)) for p, e in zip(preds[:4], batch[:4])])
    print(f"{args.domain}: {args.steps} steps, exact {np.mean(correct):.2f} on {len(test)} test items "
          f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
