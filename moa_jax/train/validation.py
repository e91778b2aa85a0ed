"""Validation during training: the stage's loss on a fixed sample of the validation split every
TrainConfig.eval_every steps and at the last step, and the adapters with the lowest such loss kept beside the final
ones.

    validator = Validator(model=..., tcfg=..., batches=..., ...)   # batches already on the mesh: [NB, B, ...]
    row = validator(state.trainable, frozen, step)   # {"eval/loss", "eval/lm_loss", "eval/loss/<domain>", ...}

Cost is bounded: TrainConfig.eval_batches batches of data.batch_size rows (moa_jax/data/pipeline.py
ValidationBatches), one padded length, `validation_metrics` (moa_jax/train/step.py) jitted once per stage. It takes
no random key and reads no training batch, so a run trains exactly as it would without validation.

The row's keys are metrics.jsonl keys and TensorBoard tags at once (`eval/<key>`, moa_jax/train/metrics_log.py):
`eval/loss` the stage's objective (what selects the best step), `eval/lm_loss` the mean NLL per response token,
`eval/loss/<domain>` each domain's (in stage 1: each expert's on its own domain), `eval/router_loss` and
`eval/router_acc` where the stage trains routers (stage 2: the routing accuracy on the validation prompts).

Best adapters: <stage>/best_adapters (moa_jax/train/checkpoint.py save_best), rewritten whenever `eval/loss` is
strictly lower than the best so far, its config.json recording {"step", "loss", "metrics"} under "validation". A
resumed run keeps a record written at or before the step it resumes from (a later one came from the steps it
trains again, and is replaced).

Shape glossary: NB validation batches, B batch rows, T tokens, N domains.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax

from moa_jax.config import TrainConfig
from moa_jax.nn.model import MoATransformer
from moa_jax.sharding import gather_to_host, replicated
from moa_jax.train.checkpoint import read_best, save_best
from moa_jax.train.metrics_log import summarize
from moa_jax.train.step import validation_metrics

PREFIX = "eval/"
SELECT_KEY = PREFIX + "loss"   # the value the best step minimises


class Validator:
    """Runs validation on a stage's fixed validation batches and keeps the best adapters (see the module doc)."""

    def __init__(self, *, model: MoATransformer, tcfg: TrainConfig, mesh, batches: dict[str, jax.Array],
                 trainable_shardings: Any, frozen_shardings: Any, domain_names: Sequence[str], stage_dir: str,
                 config: dict, resume_step: int = 0, is_main: bool = True):
        self.tcfg, self.batches, self.domain_names = tcfg, batches, tuple(domain_names)
        self.stage_dir, self.config, self.is_main = stage_dir, config, is_main
        self._fn = jax.jit(functools.partial(validation_metrics, model=model, tcfg=tcfg,
                                             num_domains=len(domain_names)),
                           in_shardings=(trainable_shardings, frozen_shardings, None), out_shardings=replicated(mesh))
        best = read_best(stage_dir)
        self.best: Optional[dict] = best if best is not None and best["step"] <= resume_step else None

    def due(self, step: int) -> bool:
        return step % self.tcfg.eval_every == 0 or step == self.tcfg.steps

    def __call__(self, trainable: Any, frozen: Any, step: int) -> dict[str, float]:
        """Validation metrics of `trainable` after `step` updates (the row's keys prefixed `eval/`); saves the
        adapters as the best when their loss is the lowest so far."""
        host = summarize(self._fn(trainable, frozen, self.batches), 1, self.domain_names)
        host.pop("seq_tokens", None)
        row = {PREFIX + k: v for k, v in host.items()}
        if self.best is None or row[SELECT_KEY] < self.best["loss"]:
            self.best = {"step": step, "loss": row[SELECT_KEY], "metrics": row}
            weights = gather_to_host(trainable)   # every process takes part; the main one writes
            if self.is_main:
                save_best(self.stage_dir, weights, self.config, self.best)
        return row


def validation_line(label: str, step: int, total: int, row: dict[str, float], best_step: int) -> str:
    """A validation row -> one console line, e.g.
    `stage2 validation step 20/40: loss 4.1000 lm_loss 2.5000 router_loss 1.6000 router_acc 0.875 | best step 20`."""
    parts = [f"{k} {row[PREFIX + k]:.4f}" for k in ("loss", "lm_loss", "router_loss", "balance_loss")
             if PREFIX + k in row]
    if PREFIX + "router_acc" in row:
        parts.append(f"router_acc {row[PREFIX + 'router_acc']:.3f}")
    return f"{label} validation step {step}/{total}: {' '.join(parts)} | best step {best_step}"
