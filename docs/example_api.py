"""The load_model example of docs/api.md: load the embedded SmolLM2-135M-Instruct with 4 fresh LoRA experts, get
logits under three routings, and generate for two prompts with the routers choosing the expert.

    python docs/example_api.py        # about half a minute on 2 CPU cores; no download

Fresh experts start with lora_b = 0, so every routing gives the base model's logits (printed as 0.0) and the
text is the base model's; a trained run loads with `moa_jax.load_run(<workdir>)` (docs/api.md, "Use a finished
run").
"""
import numpy as np

import moa_jax

model = moa_jax.load_model("smollm2-135m-instruct",
                           moa=moa_jax.MoAConfig(num_experts=4, rank=8, targets=("q", "v")))

ids = np.array([model.encode_prompt("What is 12 + 30?")])                  # [B=1, T]
forced = model.logits(ids, routing="forced", expert=2)                      # [1, T, V], expert 2 at every layer
base = model.logits(ids, routing="base")                                    # adapters off
routed = model.logits(ids, routing="router")                                # the routers pick the expert
print(f"logits (forced, expert 2): {forced.shape}")
print(f"max |forced - base| = {np.max(np.abs(forced - base))}")
print(f"max |router - base| = {np.max(np.abs(routed - base))}")

for out in model.generate(["What is 12 + 30?", "Reverse the words: blue red green"], max_new_tokens=8):
    print(f"[expert {out.expert}] {out.text!r}")
