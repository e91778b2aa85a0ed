"""The report's figures (matplotlib, Agg backend: no display needed), each written as a PNG into the work directory:

  accuracy_by_method.png   grouped bars: verifier accuracy per domain (and the average), one bar per method
  router_confusion.png     heatmap of domain label (rows) vs chosen expert (columns), one panel per router-routed
                           method, with domain names on both axes and the counts written in the cells
  training_curves.png      LM loss vs step of every trained stage (from its metrics.jsonl; the token mean, so
                           stages compare), per-domain stage-1 LM loss, and the router loss of stage-2 runs
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def accuracy_bars(results: dict, path: str) -> str:
    plt = _plt()
    domains, methods = list(results["domains"]), list(results["methods"])
    groups = domains + ["average"]
    values = np.array([[results["methods"][m]["per_domain"][d]["accuracy"] for d in domains]
                       + [results["methods"][m]["mean_accuracy"]] for m in methods])          # (methods, groups)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(min(24.0, max(10.0, 1.25 * len(groups))), 5.0))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    x = np.arange(len(groups))
    for i, m in enumerate(methods):
        ax.bar(x - 0.4 + (i + 0.5) * width, values[i], width, label=m, color=cmap(i % cmap.N))
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel("accuracy (verifier, exact)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results.get('experiment', '')}: accuracy per domain "
                 f"(n = {min(results['items_per_domain'])} test items per domain)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))   # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_heatmaps(results: dict, path: str) -> Optional[str]:
    """One panel per method that has a confusion matrix; None when no method has one."""
    panels = [(m, np.asarray(e["confusion"])) for m, e in results["methods"].items() if e.get("confusion")]
    if not panels:
        return None
    plt = _plt()
    domains = list(results["domains"])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = 2.0 + 0.55 * len(domains)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.5, size * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, conf) in zip(axes.flat, panels):
        share = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        experts = [domains[j] if j < len(domains) else f"expert {j}" for j in range(conf.shape[1])]
        ax.set_xticks(range(conf.shape[1]), experts, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(conf.shape[0]), domains, fontsize=7)
        ax.set_xlabel("expert chosen by the router")
        ax.set_ylabel("domain (label)")
        acc = np.trace(conf[:, :conf.shape[0]]) / max(conf.sum(), 1)
        ax.set_title(f"{name}: routing accuracy {acc:.3f}", fontsize=9)
        for i in range(conf.shape[0]):
            for j in range(conf.shape[1]):
                if conf[i, j]:
                    ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the domain's items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(stages: dict[str, str], domains: list[str], path: str) -> Optional[str]:
    """stages: label -> stage directory holding metrics.jsonl. None when no stage has logged metrics."""
    from moa_jax.train.metrics_log import read_metrics
    logs = {label: read_metrics(os.path.join(d, "metrics.jsonl")) for label, d in stages.items()}
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    plt = _plt()
    routed = {k: v for k, v in logs.items() if any("router_loss" in r for r in v)}
    fig, axes = plt.subplots(1, 3 if routed else 2, figsize=(16 if routed else 11, 4.4), squeeze=False)
    ax = axes[0, 0]
    for label, rows in logs.items():
        ax.plot([r["step"] for r in rows], [r.get("lm_loss", r.get("loss", np.nan)) for r in rows], marker=".",
                label=label)
    ax.set(xlabel="step", ylabel="LM loss (mean over response tokens)", title="training loss per stage")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    stage1 = logs.get("stage1", [])
    cmap = plt.get_cmap("tab10" if len(domains) <= 10 else "tab20")
    for i, d in enumerate(domains):
        pts = [(r["step"], r[f"loss/{d}"]) for r in stage1 if f"loss/{d}" in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=d, color=cmap(i % cmap.N))
    ax.set(xlabel="step", ylabel="LM loss", title="stage 1: LM loss per domain (expert)")
    ax.legend(fontsize=6, ncol=2)
    if routed:
        ax = axes[0, 2]
        for label, rows in routed.items():
            pts = [(r["step"], r["router_loss"]) for r in rows if "router_loss" in r]
            ax.plot(*zip(*pts), marker=".", label=label)
        ax.set(xlabel="step", ylabel="router CE", title="router loss (mean over layers)")
        ax.legend(fontsize=7)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
