"""Compare loss curves of `benchmarks.studies.replay_expert` runs side by side: per window of steps the mean loss, the
largest loss and the largest gradient norm (before clipping), the steps whose loss exceeds a threshold, and
optionally a PNG of both curves.

    python -m benchmarks.studies.replay_curves "bf16, b2 0.999=replay_a.jsonl" "bf16, b2 0.95=replay_b.jsonl" \
        [--window 50] [--steps 750] [--threshold 2.0 --after 250] [--png curves.png]

Each argument is LABEL=PATH (or a PATH, labelled by its file name). Runs are compared over their common steps
(the shortest run's, or --steps). The probe line `--probe` appends is skipped.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read_replay(path: str) -> dict:
    """A replay_expert JSONL -> {"step", "loss", "grad_norm"} arrays in step order (the probe line skipped)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i}: not a JSON line ({e.msg})")
            if "step" in row:
                rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path}: no step lines (is it a replay_expert --out file?)")
    rows.sort(key=lambda r: r["step"])
    return {k: np.asarray([r[k] for r in rows], np.float64) for k in ("step", "loss", "grad_norm")}


def windows(run: dict, window: int, steps: int) -> list[tuple[int, int, float, float, float]]:
    """-> (first step, last step, mean loss, largest loss, largest gradient norm) per window of the first
    `steps` steps (the last window may be shorter)."""
    out = []
    for start in range(0, steps, window):
        sl = slice(start, min(start + window, steps))
        out.append((start + 1, sl.stop, float(run["loss"][sl].mean()), float(run["loss"][sl].max()),
                    float(run["grad_norm"][sl].max())))
    return out


def markdown(runs: dict[str, dict], window: int, steps: int, threshold: float, after: int) -> str:
    labels = list(runs)
    lines = [f"Steps 1-{steps}, windows of {window}: mean loss / largest loss / largest gradient norm.", "",
             "| steps | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    per_run = [windows(runs[k], window, steps) for k in labels]
    for i, (first, last, *_) in enumerate(per_run[0]):
        cells = [f"{w[i][2]:.3f} / {w[i][3]:.2f} / {w[i][4]:.1f}" for w in per_run]
        lines.append(f"| {first}-{last} | " + " | ".join(cells) + " |")
    lines += ["", f"| run | steps {after + 1}-{steps} with loss > {threshold:g} | largest gradient norm "
              f"(steps {after + 1}-{steps}) |", "|---|---|---|"]
    for k in labels:
        r = runs[k]
        sl = slice(after, steps)
        over = [f"{int(s)}: {x:.2f}" for s, x in zip(r["step"][sl], r["loss"][sl]) if x > threshold]
        g = int(np.argmax(r["grad_norm"][sl]))
        lines.append(f"| {k} | {', '.join(over) or 'none'} | {r['grad_norm'][sl][g]:.1f} "
                     f"(step {int(r['step'][sl][g])}) |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], steps: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for label, r in runs.items():
        ax_loss.plot(r["step"][:steps], r["loss"][:steps], lw=0.8, label=label)
        ax_grad.plot(r["step"][:steps], r["grad_norm"][:steps], lw=0.8, label=label)
    ax_loss.set_ylabel("loss (domain mean)")
    ax_grad.set_ylabel("gradient norm before clipping")
    ax_grad.set_yscale("log")
    ax_grad.set_xlabel("step")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_run(arg: str) -> tuple[str, str]:
    label, sep, path = arg.rpartition("=")
    return (label, path) if sep and label else (os.path.basename(arg), arg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=PATH of a replay_expert --out JSONL (or PATH)")
    ap.add_argument("--window", type=int, default=50, help="steps per window")
    ap.add_argument("--steps", type=int, default=0, help="steps compared (default: the shortest run's)")
    ap.add_argument("--threshold", type=float, default=2.0, help="list the steps whose loss exceeds this")
    ap.add_argument("--after", type=int, default=50, help="... and gradient norms, only after this step")
    ap.add_argument("--png", default=None, help="write both curves to this PNG")
    args = ap.parse_args(argv)
    runs = {}
    for label, path in map(parse_run, args.runs):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: no such file")
        runs[label] = read_replay(path)
    common = min(len(r["step"]) for r in runs.values())
    steps = args.steps or common
    if not 0 < steps <= common:
        raise SystemExit(f"error: --steps {steps}: the runs share steps 1-{common}")
    if not 0 <= args.after < steps or args.window < 1:
        raise SystemExit(f"error: need --window >= 1 and 0 <= --after < {steps}")
    print(markdown(runs, args.window, steps, args.threshold, args.after), end="")
    if args.png:
        plot(runs, steps, args.png)
        print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
