"""Training: the pure train step (step.py), the loop with shardings, resume and logging (loop.py), adapter and
resume checkpoints (checkpoint.py), metrics.jsonl + TensorBoard (metrics_log.py), validation during training and the
best adapters (validation.py), optional Weights & Biases logging (wandb_log.py)."""
