"""The results report of an experiment, written into the work directory:

  results.md    an averages table in the spirit of the paper's Table 2 (accuracy, PPL, BLEU-4, ROUGE-L, routing),
                where MoA (router) does NOT beat each other method (per domain and metric, computed), per-domain
                tables of every metric, routing accuracy and the router confusion matrix, the ablation variants,
                and per domain and split the examples the max-length policy dropped or truncated and the number
                of test items evaluated
  results.json  everything above plus per-item samples and the computed comparisons
  *.png         moa_jax/eval/plots.py: accuracy by method, router confusion, training curves
and returns the console summary printed at the end of a run. A results dict that lacks a domain for some method is
refused with an error naming the method and the domain(s), so a report never averages over different domain sets.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from moa_jax.routing import LEGACY_ROUTE_ON
from moa_jax.eval import metrics, plots
from moa_jax.methods import METHODS, MOA

# (key in per_domain, column title, format, higher is better)
METRICS = (("accuracy", "accuracy", "{:.3f}", True), ("ppl", "PPL", "{:.3f}", False),
           ("bleu", "BLEU-4", "{:.2f}", True), ("rouge_l", "ROUGE-L", "{:.2f}", True))
class ReportError(ValueError):
    """The results cannot be reported as they are (e.g. a method lacks a domain)."""


def check_complete(results: dict) -> None:
    domains = list(results["domains"])
    for method, entry in results["methods"].items():
        missing = [d for d in domains if d not in entry.get("per_domain", {})]
        if missing:
            raise ReportError(f"report: method {method!r} has no results for domain(s) {missing}; every method must "
                              f"be evaluated on all {len(domains)} domains {domains}")
        for d in domains:
            absent = [m for m, *_ in METRICS if m not in entry["per_domain"][d]]
            if absent:
                raise ReportError(f"report: method {method!r}, domain {d!r} lacks metric(s) {absent}")


def comparisons(results: dict, ours: str = MOA) -> list[dict]:
    """For every other method and metric: the domains where `ours` wins, ties and loses."""
    if ours not in results["methods"]:
        return []
    mine = results["methods"][ours]["per_domain"]
    out = []
    for other, entry in results["methods"].items():
        if other == ours:
            continue
        for key, title, _, higher in METRICS:
            c = metrics.compare_per_domain(mine, entry["per_domain"], key, higher)
            if c is not None:
                out.append({"ours": ours, "other": other, "metric": key, "title": title, **c})
    return out


def _fmt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _per_domain_table(results: dict, key: str, fmt: str, methods: list[str]) -> list[str]:
    lines = [_row(["domain"] + methods), _row(["---"] * (len(methods) + 1))]
    for d in results["domains"]:
        lines.append(_row([d] + [_fmt(results["methods"][m]["per_domain"][d].get(key), fmt) for m in methods]))
    lines.append(_row(["**average**"] + [_fmt(results["methods"][m].get(f"mean_{key}"), fmt) for m in methods]))
    return lines


def markdown(results: dict, comps: list[dict], figures: dict[str, str]) -> str:
    methods = list(results["methods"])
    n_items = results["items_per_domain"]
    steps = results.get("steps", {})
    md = [f"# Results: {results.get('experiment', '')}", "",
          f"Model `{results.get('model', '?')}`; backend {results.get('backend', '?')}; runtime "
          f"{results.get('runtime_seconds', 0) / 60:.1f} min; stage 1 {steps.get('stage1', '?')} steps, stage 2 "
          f"{steps.get('stage2', '?')} steps at batch {steps.get('batch_size', '?')}; "
          f"{_span(n_items)} test items per domain{_ppl_items_note(results)}, {len(results['domains'])} "
          f"domains.", "",
          "accuracy: share of greedy answers the domain's verifier marks fully correct; PPL: perplexity of the "
          "reference response (teacher forcing, routed as the method routes); BLEU-4 / ROUGE-L: mean sentence "
          "scores of the completion against the reference answer (0-100); routing: share of items the routers "
          "send to their own domain's expert. Averages are unweighted over domains. One accuracy over n items has "
          f"a standard error up to 0.5/sqrt(n) = {0.5 / math.sqrt(max(min(n_items), 1)):.3f}: smaller per-domain "
          "differences are noise.", ""]
    fits = [f"`{label}`: " + router_fit_sentence(stats, "stage2.router_fit_prompts")
            for label, stats in results.get("router_fit", {}).items()]
    md += fits + ([""] if fits else [])
    kinds = list(dict.fromkeys(results["methods"][m].get("kind", m) for m in methods))
    md += [f"- `{k}`: {METHODS[k].description}" for k in kinds if k in METHODS]
    md += ["", "## Averages over domains (cf. the paper's Table 2)", "",
          _row(["method"] + [t for _, t, _, _ in METRICS] + ["routing accuracy"]), _row(["---"] * (len(METRICS) + 2))]
    for m in methods:
        e = results["methods"][m]
        md.append(_row([m] + [_fmt(e.get(f"mean_{k}"), f) for k, _, f, _ in METRICS]
                       + [_fmt(e.get("mean_routing_accuracy"), "{:.3f}")]))
    md += ["", f"## Where MoA ({MOA}) does not beat another method", ""]
    if not comps:
        md.append(f"(no `{MOA}` in this run: nothing to compare)")
    else:
        md += _versus_table(results, comps)
        md += ["", "In words (accuracy; `MoA does not beat` = ties and losses):", ""]
        md += [f"- {_in_words(c)}" for c in comps if c["metric"] == "accuracy"]
    for key, title, fmt, higher in METRICS:
        md += ["", f"## {title[0].upper() + title[1:]} per domain ({'higher' if higher else 'lower'} is better)", ""]
        md += _per_domain_table(results, key, fmt, methods)
    routed = [m for m in methods if results["methods"][m].get("mean_routing_accuracy") is not None]
    if routed:
        md += ["", "## Routing accuracy per domain (router decision from the prompt vs the domain label)", ""]
        md += _per_domain_table(results, "routing_accuracy", "{:.3f}", routed)
        md += _policy_table(results, routed)
    md += _routing_study(results.get("routing"))
    for m in routed:
        conf = results["methods"][m].get("confusion")
        if conf:
            md += ["", f"### Confusion matrix of `{m}` (rows: domain label; column j: expert j)", ""]
            md += [_row(["domain \\ expert"] + [str(j) for j in range(len(conf[0]))]),
                   _row(["---"] * (len(conf[0]) + 1))]
            md += [_row([f"{i} {d}"] + [str(v) for v in conf[i]]) for i, d in enumerate(results["domains"])]
            md += _family_tables(results, m, conf)
    if results.get("variants"):
        md += ["", "## Ablation variants (each trained from the shared stage 1; reported as `method[NAME]`)", ""]
        md += [f"- `{name}`: " + (", ".join(f"`{s}`" for s in sets) or "the main run's settings")
               for name, sets in results["variants"].items()]
    md += _validation_table(results)
    md += _data_table(results.get("data"))
    mca = results["methods"].get("most_common", {}).get("answers")
    if mca:
        md += ["", "Most-common-answer baseline (most common TRAIN answer per domain): "
               + "; ".join(f"{d}: `{a}`" for d, a in mca.items())]
    if figures:
        md += ["", "## Figures", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in figures.items()]
    return "\n".join(md) + "\n"


def router_fit_sentence(stats: dict, setting: str, what: str = "Every router output") -> str:
    """One sentence on a router fit (moa_jax/train/router_fit.py stats) of `what`, naming the `setting` that asked
    for it."""
    return (f"{what} fitted after the SGD steps on {stats['examples']} cached training prompts "
            f"({stats['prompts_per_domain']} per domain; {setting}): last-router training accuracy "
            f"{stats['last_router_train_accuracy_before']:.3f} -> {stats['last_router_train_accuracy_after']:.3f}.")


def _routing_study(study) -> list[str]:
    """The "Routing" section: early exit per k, calibration, abstention (moa_jax/eval/calibration.py)."""
    if not study:
        return []
    rule, cal, ab = study["exit_rule"], study["calibration"], study["abstention"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    lines = ["", "## Routing: early exit, calibration, abstention (stage 2, "
             f"{study['routing_pass']}, decision {study['decision']})", "",
             f"Policy in use: exit after layer {rule['exit_layer']} of {study['num_layers']} ({rule['set_by']}; rule: "
             f"{rule['rule']} -> k = {rule['rule_k']}), temperature {cal['temperature']:.3f} ({cal['set_by']}), "
             f"abstain below {ab['threshold']:.3f} ({ab['set_by']}; rule: {ab['rule']} -> {ab['rule_threshold']:.3f}), "
             f"fall-back {ab['fallback']}. Prompts: {study['prompts']['validation']} validation, "
             f"{study['prompts']['test']} test, {sum(study['prompts']['out_of_domain'].values())} out of domain.", "",
             _row(["k (routers 1..k)", "validation accuracy", "test accuracy", "routing pass / full base prefill",
                   "validation domains below 1 (worst 3)"]),
             _row(["---"] * 5)]
    lines += [_row([r["k"], fmt(r["validation_accuracy"]), fmt(r["test_accuracy"]), fmt(r.get("share_of_prefill")),
                    _missed(r.get("validation_missed"))]) for r in study["by_exit_layer"]]
    if any(r.get("share_of_prefill") is None for r in study["by_exit_layer"]) and study.get("prefill_seconds"):
        lines += ["", "Time shares were measured for some k (-: not timed); `python -m benchmarks.studies.routing_exit "
                      "--workdir RUN` times every k."]
    lines += ["", _row(["calibration", "before (T = 1)", f"after (T = {cal['temperature']:.3f})"]), _row(["---"] * 3)]
    lines += [_row([name, fmt(cal[key]["before"]), fmt(cal[key]["after"])]) for name, key in
              (("validation NLL", "validation_nll"), ("validation ECE", "validation_ece"), ("test ECE", "test_ece"))]
    at, rule_at = ab["at_threshold"], ab["at_rule_threshold"]
    lines += ["", _row(["abstention", "threshold", "validation coverage", "test coverage",
                        "test accuracy of the routed", "out-of-domain abstained"]), _row(["---"] * 6)]
    for name, t, stats in ((f"in use ({ab['set_by']})", ab["threshold"], at),
                           ("the rule's", ab["rule_threshold"], rule_at)):
        ood = stats.get("out_of_domain_abstained", ab["out_of_domain_abstained"])
        lines.append(_row([name, fmt(t), fmt(stats["validation"]["coverage"]), fmt(stats["test"]["coverage"]),
                           fmt(stats["test"]["accuracy_routed"]), fmt(ood)]))
    by_source = rule_at.get("out_of_domain_by_source")
    lines += ["", f"Out-of-domain prompts abstained at the threshold in use: {fmt(ab['out_of_domain_abstained'])} ("
              + ", ".join(f"{s} {fmt(v)}" for s, v in ab["out_of_domain_by_source"].items()) + ")"
              + ("; at the rule's threshold: " + ", ".join(f"{s} {fmt(v)}" for s, v in by_source.items())
                 if by_source else "") + "."]
    return lines


def _missed(missed, show: int = 3) -> str:
    """{domain: accuracy} of the domains an exit layer routes imperfectly -> 'name 0.12, ... (+n more)'."""
    if missed is None:
        return "-"
    cells = [f"{n} {a:.2f}" for n, a in list(missed.items())[:show]]
    more = len(missed) - show
    return (", ".join(cells) + (f" (+{more} more)" if more > 0 else "")) or "none"


def _family_tables(results: dict, method: str, conf: list, worst: int = 10) -> list[str]:
    """Routing of `method` per family of similar domains (results["families"]) and its worst confusions."""
    lines = []
    families = results.get("families") or {}
    fams = metrics.family_routing(conf, results["domains"], families) if families else {}
    if fams:
        lines += ["", f"### Routing of `{method}` per family (within family: routed to another domain of the same "
                      f"family)", "", _row(["family", "domains", "items", "routing accuracy", "within family",
                                            "elsewhere"]), _row(["---"] * 6)]
        lines += [_row([f, str(r["domains"]), str(r["items"]), f"{r['accuracy']:.3f}", f"{r['within_family']:.3f}",
                        f"{r['elsewhere']:.3f}"]) for f, r in fams.items()]
    cells = metrics.worst_confusions(conf, results["domains"], worst)
    lines += ["", f"### Worst confusions of `{method}` (the {worst} largest off-diagonal cells)", ""]
    if not cells:
        return lines + ["(none: every item went to its own domain's expert)"]
    lines += [_row(["domain", "routed to", "items", "share of the domain's items", "same family"]),
              _row(["---"] * 5)]
    for c in cells:
        fam = families.get(c["domain"], "")
        same = "yes" if fam and families.get(c["routed_to"]) == fam else "no"
        lines.append(_row([c["domain"], c["routed_to"], str(c["items"]), f"{c['share']:.2f}", same]))
    return lines


ROUTE_ON_TEXT = {"adapted": "the adapted routing pass (each layer routed by its own router)",
                 "probe": "one forward of the plain base model (servable)"}


def _ppl_items_note(results: dict) -> str:
    """Where PPL has its own items (eval.ppl_items_per_domain): how many."""
    n = results.get("ppl_items_per_domain")
    return f" (PPL over {_span(n)} test items per domain)" if n else ""


def _policy_table(results: dict, routed: list[str]) -> list[str]:
    """Routing accuracy per routing policy: where the routers read (MoAConfig.route_on) and the decision."""
    rows = [(m, results["methods"][m]) for m in routed if results["methods"][m].get("routing_policy")]
    if not rows:
        return []
    lines = ["", "### Routing accuracy by routing policy", "",
             _row(["method", "routers read", "decision", "routing accuracy"]), _row(["---"] * 4)]
    for m, e in rows:
        p = e["routing_policy"]
        route_on = LEGACY_ROUTE_ON.get(p["route_on"], p["route_on"])   # results saved before the rename
        lines.append(_row([m, ROUTE_ON_TEXT.get(route_on, route_on), p["decision"],
                           _fmt(e.get("mean_routing_accuracy"), "{:.3f}")]))
    return lines


def _validation_table(results: dict) -> list[str]:
    """Each stage's best validation step (TrainConfig.eval_every) and which adapters the evaluation ran."""
    stages = results.get("validation") or {}
    if not stages:
        return []
    which = results.get("evaluated_adapters", "final")
    lines = ["", "## Validation during training (lowest validation loss per stage)", "",
             f"The evaluation above ran each stage's {which} adapters"
             + (" (`eval.adapters=best`)." if which == "best" else "; `eval.adapters=best` evaluates the best ones "
                                                                     "(`<stage>/best_adapters`)."), "",
             _row(["stage", "best step", "validation loss", "validation LM loss", "routing accuracy"]),
             _row(["---"] * 5)]
    for label, v in stages.items():
        lines.append(_row([label, str(v["best_step"]), _fmt(v["best_loss"], "{:.4f}"), _fmt(v.get("best_lm_loss"),
                           "{:.4f}"), _fmt(v.get("best_router_acc"), "{:.3f}")]))
    return lines


def _data_table(data: Optional[dict]) -> list[str]:
    """Per domain and split: kept of total examples (dropped / truncated by the max-length policy); evaluated."""
    if not data:
        return []
    splits = list(data["splits"])
    lines = ["", "## Data: examples per domain and split", "",
             f"Examples longer than max_len={data['max_len']} tokens are handled by length_policy="
             f"`{data['length_policy']}`: `kept of total` per split, with what was dropped or truncated; `evaluated`: "
             "the test items every method was scored on.", "",
             _row(["domain"] + splits + ["evaluated"]), _row(["---"] * (len(splits) + 2))]
    for d, n in data["evaluated"].items():
        lines.append(_row([d] + [_count_cell(data["splits"][s].get(d)) for s in splits] + [n]))
    note = _dropped_note(data)
    return lines + (["", note] if note else [])


def _count_cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    notes = [f"{r[k]} {k}" for k in ("dropped", "truncated") if r[k]]
    return f"{r['kept']} of {r['total']}" + (f" ({', '.join(notes)})" if notes else "")


def _dropped_note(data: Optional[dict]) -> str:
    """One line naming the test-split domains that lost or shortened items ('' when none did)."""
    if not data or "test" not in data["splits"]:
        return ""
    test = data["splits"]["test"]
    hit = {d: r for d, r in test.items() if r["dropped"] or r["truncated"]}
    if not hit:
        return ""
    return ("test split: " + "; ".join(f"{d} {_count_cell(r)}" for d, r in hit.items())
            + f" (max_len={data['max_len']}, length_policy={data['length_policy']})")


def _versus_table(results: dict, comps: list[dict]) -> list[str]:
    """Rows: domains; columns: the other methods; cell: one symbol per metric (accuracy, PPL, BLEU-4, ROUGE-L)."""
    others = list(dict.fromkeys(c["other"] for c in comps))
    symbol = {}
    for c in comps:
        for outcome, mark in (("wins", "+"), ("ties", "="), ("losses", "-")):
            for d in c[outcome]:
                symbol[c["other"], c["metric"], d] = mark
    lines = ["Per domain, MoA against each method on " + ", ".join(t for _, t, _, _ in METRICS) + " (in this "
             "order): `+` MoA better, `=` tie, `-` MoA worse, `.` not measured (lower PPL counts as better).", "",
             _row(["domain"] + others), _row(["---"] * (len(others) + 1))]
    for d in results["domains"]:
        lines.append(_row([d] + [" ".join(symbol.get((o, k, d), ".") for k, *_ in METRICS) for o in others]))
    for key, title, *_ in METRICS:
        cells = []
        for o in others:
            c = next((c for c in comps if c["other"] == o and c["metric"] == key), None)
            cells.append("-" if c is None else f"{len(c['wins'])}/{len(c['ties'])}/{len(c['losses'])}")
        lines.append(_row([f"**{title}** wins/ties/losses"] + cells))
    return lines


def _span(values) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _in_words(c: dict) -> str:
    loses = ", ".join(c["losses"]) if c["losses"] else "none"
    ties = f"; ties on {', '.join(c['ties'])}" if c["ties"] and len(c["ties"]) <= 4 else (
        f"; ties on {len(c['ties'])} domains" if c["ties"] else "")
    return (f"MoA vs {c['other']} ({c['title']}): wins {len(c['wins'])}, ties {len(c['ties'])}, loses "
            f"{len(c['losses'])}: loses on {loses}{ties}")


def console_summary(results: dict, comps: list[dict], workdir: str, figures: dict[str, str]) -> str:
    width = max(12, *(len(m) for m in results["methods"]))
    lines = [f"{'method':<{width}} {'accuracy':>8} {'ppl':>10} {'bleu4':>7} {'rougeL':>7} {'routing':>8}"]
    for m, e in results["methods"].items():
        lines.append(f"{m:<{width}} {_fmt(e['mean_accuracy'], '{:8.3f}')} {_fmt(e['mean_ppl'], '{:10.3f}'):>10} "
                     f"{_fmt(e['mean_bleu'], '{:7.2f}')} {_fmt(e['mean_rouge_l'], '{:7.2f}')} "
                     f"{_fmt(e.get('mean_routing_accuracy'), '{:8.3f}'):>8}")
    lines += [_in_words(c) for c in comps if c["metric"] == "accuracy"]
    note = _dropped_note(results.get("data"))
    if note:
        lines.append(note)
    lines.append(f"report: {os.path.join(workdir, 'results.md')}")
    lines += [f"figure: {p}" for p in figures.values()]
    return "\n".join(lines)


FIGURE_FILES = {"accuracy by method": "accuracy_by_method.png", "router confusion": "router_confusion.png",
                "training curves": "training_curves.png"}


def summary(results: dict, workdir: str) -> str:
    """The console summary of a report already written into `workdir`."""
    figures = {k: os.path.join(workdir, f) for k, f in FIGURE_FILES.items() if os.path.exists(os.path.join(workdir, f))}
    return console_summary(results, comparisons(results), workdir, figures)


def write_report(results: dict, workdir: str) -> str:
    """Write results.md, results.json and the figures into `workdir`; return the console summary."""
    check_complete(results)
    comps = comparisons(results)
    path = {k: os.path.join(workdir, f) for k, f in FIGURE_FILES.items()}
    made = {"accuracy by method": plots.accuracy_bars(results, path["accuracy by method"]),
            "router confusion": plots.confusion_heatmaps(results, path["router confusion"]),
            "training curves": plots.training_curves(results.get("stages", {}), list(results["domains"]),
                                                     path["training curves"])}
    figures = {k: p for k, p in made.items() if p}
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown(results, comps, figures))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({**results, "comparisons": comps, "figures": figures}, f, indent=1)
    return console_summary(results, comps, workdir, figures)
