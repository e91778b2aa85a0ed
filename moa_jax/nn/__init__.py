"""The model: LoRA experts (lora.py), routers (router.py), decoder layers (layers.py), the scanned MoA decoder
(model.py), the blockwise LM head and loss (lm_loss.py) and int8 frozen weights (quantize.py). Depends only on
moa_jax.config."""
