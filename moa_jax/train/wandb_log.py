"""Optional Weights & Biases logging: with ExperimentConfig.wandb set to a project name, every row a stage logs
(metrics.jsonl's, validation included) goes to one W&B run per command as well.

    --set wandb=my-project                       # WANDB_MODE=offline keeps the run on disk (wandb sync uploads it)

The wandb package is optional and never imported unless asked for: a run that asks for it without it installed
stops before the model loads with one error line (`require_wandb`). Each stage has its own step axis: the keys are
`<stage>/<tag>` with the TensorBoard tags of moa_jax/train/metrics_log.py (`stage2/train/lm_loss`,
`stage2/eval/router_acc`), plotted against `<stage>/step` (W&B's `define_metric`), since every stage counts its
steps from 1. Only process 0 logs.
No arrays here (no shape glossary).
"""
from __future__ import annotations

from typing import Any

from moa_jax.errors import ConfigError
from moa_jax.train.metrics_log import train_tag


def require_wandb(project: str) -> Any:
    """The wandb module; a ConfigError (one line, exit 2 from the CLI) when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"wandb={project!r} logs to Weights & Biases, but the wandb package is not installed: "
                          f"pip install wandb, or leave wandb unset") from None
    return wandb


class WandbLog:
    """One W&B run; `log(stage, step, row)` sends a logged row under the stage's own step axis."""

    def __init__(self, project: str, *, name: str, config: dict, directory: str):
        wandb = require_wandb(project)
        self.run = wandb.init(project=project, name=name, config=config, dir=directory)
        self._stages: set[str] = set()

    def log(self, stage: str, step: int, row: dict[str, float]) -> None:
        if stage not in self._stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{train_tag(k)}": float(v) for k, v in row.items()}})

    def finish(self) -> None:
        self.run.finish()
