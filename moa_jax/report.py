"""The results report of an experiment: `results.md` (per-domain table in the spirit of the paper's Table 2, plus
routing) and `results.json`, written into the work directory; returns a console summary.
"""
from __future__ import annotations

import json
import os


def _table(results: dict, metric: str, fmt: str) -> list[str]:
    methods = list(results["methods"])
    lines = ["| domain | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for d in results["domains"]:
        cells = [fmt.format(results["methods"][m]["per_domain"][d][metric]) for m in methods]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    means = [fmt.format(results["methods"][m][f"mean_{metric}"]) for m in methods]
    lines.append("| **average** | " + " | ".join(means) + " |")
    return lines


def write_report(results: dict, workdir: str) -> str:
    """Write results.md / results.json; return the summary printed at the end of a run."""
    missing = [m for m, e in results["methods"].items() if set(e["per_domain"]) != set(results["domains"])]
    if missing:
        raise ValueError(f"report: methods {missing} lack results for some of the domains {results['domains']}")
    md = [f"# Results: {results.get('experiment', '')}", "",
          f"Backend {results.get('backend', '?')}; runtime {results.get('runtime_seconds', 0) / 60:.1f} min; "
          f"test items per domain {results['items_per_domain']}.", "",
          "## Exact-match accuracy (domain verifier)", ""]
    md += _table(results, "accuracy", "{:.2f}")
    md += ["", "## Perplexity on response tokens", ""] + _table(results, "ppl", "{:.3f}")
    router = results["methods"].get("moa_router")
    if router is not None:
        md += ["", f"## Routing (MoA router vs domain label): mean accuracy {router['mean_routing_accuracy']:.3f}", "",
               "| domain | routing accuracy |", "|---|---|"]
        md += [f"| {d} | {router['per_domain'][d]['routing_accuracy']:.3f} |" for d in results["domains"]]
    text = "\n".join(md) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary = ["method        accuracy   ppl"]
    for m, e in results["methods"].items():
        summary.append(f"{m:<13} {e['mean_accuracy']:8.3f} {e['mean_ppl']:8.3f}")
    return "\n".join(summary) + f"\nreport: {os.path.join(workdir, 'results.md')}"
