"""Training metrics out of the jitted step and onto the console, a JSONL file and TensorBoard; the evaluation's
averages per method as TensorBoard scalars.

The jitted step returns a flat dict of device scalars (plus per-domain vectors); the loop adds them up on device
(no host sync) and reads the sums only on logging steps. Each logged row is one console line (`log_line`), one
metrics.jsonl row under the step's own key names, and TensorBoard scalars under `train/<key>` (`train/lm_loss`,
`train/loss/<domain>`, `train/learning_rate`). Validation during training (moa_jax/train/validation.py) adds keys
`eval/<key>` to the row of its step (or a row of its own), the same names as TensorBoard tags; the final
evaluation's averages are `eval/<metric>/<method>`. TensorBoard events are
written with tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np


def summarize(acc: dict, count: int, domain_names: Sequence[str]) -> dict[str, float]:
    """Device sums over `count` steps -> flat host dict of means; per-domain LM loss by name."""
    host = jax.device_get(acc)
    out = {}
    for k, v in host.items():
        if k in ("domain_loss_sum", "domain_tokens", "tokens", "seq_tokens", "finite"):
            continue
        out[k] = float(v) / count
    dom_sum, dom_cnt = np.asarray(host["domain_loss_sum"]), np.asarray(host["domain_tokens"])
    for i, name in enumerate(domain_names):
        if dom_cnt[i] > 0:
            out[f"loss/{name}"] = float(dom_sum[i] / dom_cnt[i])
    out["tokens"] = float(host["tokens"])          # loss (response) tokens
    out["seq_tokens"] = float(host["seq_tokens"])  # all non-pad tokens processed
    return out


# What the progress bar shows, under the names metrics.jsonl uses: the LM loss (mean NLL per response token) and,
# in stage 2, the router's accuracy on the batch. `loss` is the optimised objective (with per-domain normalisation,
# as in stage 1, the SUM of the domains' mean losses, ~E x lm_loss; plus eta x router_loss in stage 2): logs only.
PROGRESS_KEYS = ("lm_loss", "router_acc")


def progress_fields(row: dict[str, float]) -> dict[str, str]:
    """A logged row -> the progress bar's postfix (the PROGRESS_KEYS it has, 3 decimals)."""
    return {k: f"{row[k]:.3f}" for k in PROGRESS_KEYS if k in row}


# The console line's losses, under their metrics.jsonl names: the objective, then its parts where the stage has them
# (stage 2's router CE, the MoE-LoRA balance loss); router_acc where the stage trains routers.
LINE_LOSSES = ("loss", "lm_loss", "router_loss", "balance_loss")


def log_line(label: str, step: int, total: int, row: dict[str, float], steps_logged: int) -> str:
    """A logged row -> one console line, e.g.
    `stage2 step 20/40: loss 4.1000 lm_loss 2.5000 router_loss 1.6000 router_acc 0.875 | 812 tokens/s | ETA 0:01:10`.
    `steps_logged`: the steps the row averages; the ETA assumes the remaining steps take as long as those did (the
    first row's interval includes compilation, so its ETA is high)."""
    parts = [f"{k} {row[k]:.4f}" for k in LINE_LOSSES if k in row]
    if "router_acc" in row:
        parts.append(f"router_acc {row['router_acc']:.3f}")
    line = f"{label} step {step}/{total}: {' '.join(parts)}"
    if "tokens_per_s" in row:
        line += f" | {row['tokens_per_s']:.0f} tokens/s"
    if "seconds" in row and step < total:
        eta = round(row["seconds"] / max(steps_logged, 1) * (total - step))
        line += f" | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    return line


def train_tag(key: str) -> str:
    """TensorBoard tag of a metrics.jsonl key: `train/<key>` (`train/loss/<domain>` for a domain's LM loss); a
    validation key is its own tag (`eval/lm_loss`, moa_jax/train/validation.py)."""
    return key if key.startswith("eval/") else f"train/{key}"


class MetricsLogger:
    """JSONL (always) + TensorBoard (when tensorboardX is importable) in `directory`; one line per log step.

    `resume_step`: the step training restarts from. Rows a killed run logged past it are dropped from the JSONL
    and purged from TensorBoard (they are trained and logged again), so every step appears once."""

    def __init__(self, directory: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.jsonl_path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        self._last_time: Optional[float] = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.drop_after(resume_step)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # optional dependency: JSONL still has everything
            self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """One row. A training row (it has `seq_tokens`) gets the throughput since the previous one; a row of
        validation metrics alone leaves the clock alone."""
        now = time.perf_counter()
        if "seq_tokens" in metrics:
            if self._last_time is not None:
                elapsed = max(now - self._last_time, 1e-9)
                metrics["tokens_per_s"] = metrics["seq_tokens"] / elapsed
                metrics["seconds"] = elapsed
            self._last_time = now
        if self.enabled:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self._tb is not None:
                for k, v in metrics.items():
                    self._tb.add_scalar(train_tag(k), v, step)
                self._tb.flush()
        return metrics

    def drop_after(self, step: int) -> int:
        """Remove metrics.jsonl rows of steps > `step` (atomically); -> how many were removed."""
        if not self.enabled or not os.path.exists(self.jsonl_path):
            return 0
        with open(self.jsonl_path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line if line.endswith("\n") else line + "\n" for line in lines if _step(line) <= step]
        if len(keep) < len(lines):
            tmp = self.jsonl_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.jsonl_path)
        return len(lines) - len(keep)

    def start_clock(self) -> None:
        self._last_time = time.perf_counter()

    @contextlib.contextmanager
    def clock_paused(self):
        """Time spent inside (validation) is left out of the next row's `seconds` and throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._last_time is not None:
                self._last_time += time.perf_counter() - t0

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


EVAL_METRICS = ("accuracy", "score", "ppl", "bleu", "rouge_l", "routing_accuracy")


def eval_tag(metric: str, method: str) -> str:
    """TensorBoard tag of a method's mean metric: `eval/<metric>/<method>`; a variant's label `moa_router[eta0]`
    becomes `moa_router.eta0` (TensorBoard tags allow only letters, digits and `_./-`)."""
    return f"eval/{metric}/{method.replace('[', '.').replace(']', '')}"


def log_eval_scalars(directory: str, results: dict, step: int) -> int:
    """The evaluation's averages over domains as TensorBoard scalars `eval/<metric>/<method>` (eval_tag) at training
    step `step`, in `directory`/tensorboard. -> scalars written (0 without tensorboardX). Metrics a method does not
    have (PPL of most_common, routing of non-router methods) are left out."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:   # optional dependency: results.json has everything
        return 0
    written = 0
    # purge_step: TensorBoard drops what an earlier evaluation of this run logged at `step` (a rerun replaces it)
    with SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=step) as tb:
        for method, entry in results["methods"].items():
            for metric in EVAL_METRICS:
                value = entry.get(f"mean_{metric}")
                if value is not None:
                    tb.add_scalar(eval_tag(metric, method), float(value), step)
                    written += 1
    return written


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):   # a row cut off by a kill mid-write
        return float("inf")


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
