"""JSON and markdown output of a suite run: the target table (value, FLOP model, target, pass), the E-scaling
table against the FLOP model, per-variant times / compile / FLOPs / memory, and the machine facts.

Ratio columns: `value` is the median over rounds of the per-round paired ratio (the two samples of a round ran
seconds apart, which cancels most of a shared machine's load drift); `min` and `median` are the ratios of the
per-variant minima and medians. For "x faster" and throughput rows the ratio is time(den) / time(num).
"""
from __future__ import annotations

import json
import math
from typing import Any


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(result), f, indent=1)


def _f(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mark(ok) -> str:
    return {True: "PASS", False: "**MISS**", None: "info"}[ok]


def target_table(result: dict) -> list[str]:
    lines = ["| group | case | value (paired median) | min / median ratio | CPU-time ratio | FLOP model | target | |",
             "|---|---|---|---|---|---|---|---|"]
    for gname, g in result["groups"].items():
        for r in g["ratios"]:
            lines.append(f"| {gname} | {r['case']} | {_f(r['value'])} | {_f(r['min_ratio'])} / "
                         f"{_f(r['median_ratio'])} | {_f(r.get('cpu_ratio'))} | {_f(r['flop_model'])} | {r['target']} | {_mark(r['pass'])}"
                         f"{' ' + r['note'] if r['note'] else ''} |")
    rc = result.get("recompile")
    if rc:
        lines.append(f"| compile | top-1 train step compile (s), batch {rc['batch']} | {_f(rc['compile_s'], '.2f')} | "
                     f"| | | <= 5 s | {_mark(rc['compile_s'] <= 5.0)} |")
        lines.append(f"| compile | compiles over {rc['steps']} steps, {rc['domain_mixes']} domain mixes (jit cache "
                     f"size {rc['jit_cache_size']}) | {rc['compiles_in_steady_state']} | | | | 0 | "
                     f"{_mark(rc['pass'])} |")
    if "mfu_frozen_fwd_bwd" in result:
        lines.append(f"| train | frozen fwd+bwd MFU vs 989 TFLOP/s | {result['mfu_frozen_fwd_bwd']:.1%} | | | | >= 35% | "
                     f"{_mark(result['mfu_frozen_fwd_bwd'] >= 0.35)} |")
    return lines


def scaling_table(result: dict) -> list[str]:
    """Per E: time at E / time at the smallest E of the same dispatch (paired), next to the FLOP model."""
    lines = []
    for gname in ("train", "inference"):
        g = result["groups"].get(gname)
        if not g:
            continue
        by_pair = {(r["num"], r["den"]): r for r in g["ratios"]}
        es = {k: sorted(int(n.split("_E")[1]) for n in g["variants"] if n.startswith(k + "_E")) for k in ("top1", "soft")}
        if not es["top1"]:
            continue
        lines += [f"{gname} ({g['config']}): time at E / time at the smallest E, paired median vs the FLOP model", "",
                  "| E | top-1 | top-1 model | soft | soft model | soft vs model |", "|---|---|---|---|---|---|"]
        for e in sorted(set(es["top1"]) | set(es["soft"])):
            cells = []
            for kind in ("top1", "soft"):
                r = by_pair.get((f"{kind}_E{e}", f"{kind}_E{es[kind][0]}")) if es[kind] else None
                if es[kind] and e == es[kind][0]:
                    cells += ["1", "1"]
                else:
                    cells += [_f(r and r["value"]), _f(r and r["flop_model"])]
            r = by_pair.get((f"soft_E{e}", f"soft_E{es['soft'][0]}")) if es["soft"] else None
            lines.append(f"| {e} | " + " | ".join(cells) + f" | {_mark(r['pass']) if r else '-'} |")
        lines.append("")
    return lines


def variant_table(result: dict) -> list[str]:
    lines = ["| group | variant | min ms | median ms | compile s | GFLOP analytic | XLA cost_analysis / analytic "
             "(1 layer: XLA counts a scan body once) | temp MiB | args MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for gname, g in result["groups"].items():
        for name, v in g["variants"].items():
            mem = v.get("memory") or {}
            mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"
            gf = lambda x: "-" if x is None else f"{x / 1e9:.2f}"
            xc = lambda v: (f"{v['flops_xla'] / 1e9:.2f} / {v['flops_analytic_1layer'] / 1e9:.2f} = "
                            f"{v['flops_xla'] / v['flops_analytic_1layer']:.2f}"
                            if v.get("flops_xla") and v.get("flops_analytic_1layer") else "-")
            lines.append(f"| {gname} | {name} | {v['min_s'] * 1e3:.1f} | {v['median_s'] * 1e3:.1f} | "
                         f"{_f(v.get('compile_s'), '.2f')} | {gf(v.get('flops_analytic'))} | {xc(v)} | "
                         f"{mib(mem.get('temp_size'))} | {mib(mem.get('argument_size'))} |")
    return lines


def markdown(result: dict) -> str:
    m = result.get("machine", {})
    out = [f"# Benchmark suite `{result['suite']}`", "",
           f"- command: `{result.get('command', '')}`", f"- date: {m.get('date')}",
           f"- machine: {m.get('cpu')}, {m.get('cores')} cores, backend {m.get('backend')} ({m.get('device')}), "
           f"load average at start {m.get('loadavg')} / end {result.get('loadavg_end')}",
           f"- versions: " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v),
           f"- total wall time: {result.get('total_s', 0):.0f} s", "", "## Targets", ""]
    out += target_table(result)
    out += ["", "## Scaling in E", ""] + scaling_table(result)
    out += ["## Variants", ""] + variant_table(result)
    parity = [v.get("peft_parity_max_abs_logit_diff") for g in result["groups"].values()
              for v in g["variants"].values() if v.get("peft_parity_max_abs_logit_diff") is not None]
    if parity:
        out += ["", f"PEFT parity: max |logits(ours top-1) - logits(PEFT adapter_names)| = {parity[0]:.2e} "
                    "(same weights copied into both)."]
    steady = {k: g["compiles_in_steady_state"] for k, g in result["groups"].items()}
    out += ["", f"Compiles during the timed rounds, per group: {steady}", ""]
    for k, g in result["groups"].items():
        dev = g.get("device_peak_bytes")
        out.append(f"- {k}: build {g['build_s']:.0f} s, timed rounds {g['run_s']:.0f} s, process RSS "
                   f"{g['rss'].get('rss_mb', 0):.0f} MiB (peak {g['rss'].get('peak_rss_mb', 0):.0f} MiB)"
                   + (f", device peak {dev / 2**20:.0f} MiB" if dev else ""))
    return "\n".join(out) + "\n"
