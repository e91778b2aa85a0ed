"""The routing study of a finished stage 2: early exit, calibration and abstention, settled on VALIDATION prompts and
reported on the test prompts and on out-of-domain prompts, with no retraining (a `reuse_from` run can produce it).

  early exit    the routing decision made by routers 1..k on a pass that stops after layer k. One full routing pass
                gives every router's logits, and a pass cut after layer k reproduces the first k exactly (a test), so
                the accuracy of every k comes from one pass; the cut pass's time is measured against a full base
                prefill of the same prompts, side by side in one process, for TIMED_LAYERS evenly spaced k plus the
                rule's k and its two neighbours (every k: `timed="all"`, as benchmarks/studies/routing_exit.py
                does; each timed k compiles its own program, which made timing every k most of the study's cost).
                Rule (MoAConfig.exit_layer = AUTO): the shallowest k whose validation routing accuracy is within
                MoAConfig.exit_tolerance points of the best k's.
  calibration   one temperature T dividing the deciding logits, fitted on validation by minimising the NLL of the
                decision's probabilities (routing.RoutingPolicy) at the domain label; expected calibration error
                (ECE, 10 equal-width bins of the confidence) before (T = 1) and after.
                Rule (MoAConfig.temperature = AUTO): the fitted T.
  abstention    a prompt whose calibrated confidence is below a threshold goes to MoAConfig.fallback (the base model
                or a named expert). Rule (MoAConfig.abstain_below = AUTO): the largest threshold that still routes
                MoAConfig.abstain_coverage of the in-domain validation prompts. Reported: coverage and the accuracy
                of the routed prompts on validation and test, and the abstention rate on out-of-domain prompts
                (reasoning-gym generators no expert was trained on, and plain chat requests).

`<workdir>/routing.json` records the resolved policy (`policy`: the MoAConfig routing fields) next to the study;
`moa_jax.load_run` applies the policy to the run's stage 2, and an export carries it into router.json.

The numpy half (decisions, temperature fit, ECE, the two rules) imports no jax; `routing_study` runs the passes.

Shape glossary: L layers, k routers that decide, N prompts, E experts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from moa_jax.routing import AUTO

ROUTING_FILE = "routing.json"
ECE_BINS = 10
VALIDATION_PROMPTS = 128      # per domain, at most: the prompts the rules and the fit read
# reasoning-gym generators for the out-of-domain set, in order of preference: the first OOD_SOURCES that are not a
# domain of the run (the first four are not embedded domains; the rest are outside the wide registry too)
OOD_GENERATORS = ("basic_arithmetic", "caesar_cipher", "gcd", "count_bits",
                  "number_sequence", "polynomial_multiplication", "countdown", "gsm_symbolic")
OOD_SOURCES = 4
OOD_PER_GENERATOR = 8
OOD_SEED = 7
CHAT_PROMPTS = ("Write a short poem about the sea.", "What is the capital of France?",
                "Give me three tips for sleeping better.", "Translate 'good morning' into Spanish.",
                "Explain what a neural network is in one sentence.", "Suggest a name for a pet turtle.")
TIMING_REPEATS = 5
TIMED_LAYERS = 8              # evenly spaced exit layers a run's study times, besides the rule's k and its neighbours


# ---- decisions and their probabilities (numpy: moa_jax.nn.router's rules for a host array) ------------------------
def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decision_probs(logits: np.ndarray, policy: str, temperature: float = 1.0) -> np.ndarray:
    """logits [k, N, E] -> [N, E]: softmax(logits[-1] / T) ('last') or the mean over routers ('vote')."""
    z = logits.astype(np.float64) / temperature
    return softmax(z[-1]) if policy == "last" else softmax(z).mean(axis=0)


def decide(logits: np.ndarray, policy: str) -> np.ndarray:
    """logits [k, N, E] -> expert per prompt [N] (moa_jax.nn.router.decide)."""
    if policy == "last":
        return np.argmax(logits[-1], axis=-1)
    votes = np.stack([np.bincount(col, minlength=logits.shape[-1]) for col in np.argmax(logits, -1).T])   # (N, E)
    return np.argmax(votes + 0.5 * softmax(logits.astype(np.float64)).mean(axis=0), axis=-1)


def confidence(logits: np.ndarray, policy: str, temperature: float) -> np.ndarray:
    """[N] calibrated probability of the decided expert."""
    chosen = decide(logits, policy)
    return decision_probs(logits, policy, temperature)[np.arange(len(chosen)), chosen]


def exit_accuracy(logits: np.ndarray, labels: np.ndarray, policy: str) -> np.ndarray:
    """logits [L, N, E] of a full pass -> routing accuracy [L] of the decision by routers 1..k, k = 1..L."""
    return np.asarray([float(np.mean(decide(logits[:k], policy) == labels)) for k in range(1, len(logits) + 1)])


def missed_domains(logits: np.ndarray, labels: np.ndarray, policy: str, names: Sequence[str]) -> dict:
    """logits [k, N, E] -> {domain: routing accuracy} of the domains whose prompts routers 1..k do not all route
    right, worst first (what a plateau of the per-k accuracy hides)."""
    right = decide(logits, policy) == labels
    acc = {names[d]: float(right[labels == d].mean()) for d in range(len(names)) if (labels == d).any()}
    return dict(sorted(((n, a) for n, a in acc.items() if a < 1.0), key=lambda kv: kv[1]))


# ---- calibration --------------------------------------------------------------------------------------------------
def nll(logits: np.ndarray, labels: np.ndarray, policy: str, temperature: float) -> float:
    p = decision_probs(logits, policy, temperature)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, 1e-12))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, policy: str) -> float:
    """The T in [0.05, 20] with the least validation NLL: a log-spaced grid, then a finer grid around its best."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = min(grid, key=lambda t: nll(logits, labels, policy, t))
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return float(min(fine, key=lambda t: nll(logits, labels, policy, t)))


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence| in the bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return float(total)


# ---- the two rules ------------------------------------------------------------------------------------------------
def pick_exit_layer(accuracy: Sequence[float], tolerance_points: float) -> int:
    """The shallowest k (1-based) whose accuracy is within `tolerance_points` (percentage points) of the best."""
    acc = np.asarray(accuracy)
    return int(np.flatnonzero(acc >= acc.max() - tolerance_points / 100.0 - 1e-12)[0]) + 1


def pick_threshold(conf: np.ndarray, coverage: float) -> float:
    """The largest threshold t with share(conf >= t) >= coverage (prompts at or above t are routed)."""
    ordered = np.sort(np.asarray(conf, np.float64))
    return float(ordered[int(np.floor((1.0 - coverage) * len(ordered) + 1e-9))])


def abstention_stats(conf: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage (share routed), the accuracy of the routed prompts, and the overall accuracy."""
    routed = conf >= threshold
    return {"coverage": float(routed.mean()), "accuracy_routed": float(correct[routed].mean()) if routed.any()
            else None, "accuracy_all": float(correct.mean())}


# ---- the policy a run settled on ----------------------------------------------------------------------------------
def resolved_policy(moa, picked_exit: int, fitted_temperature: float, picked_threshold: float):
    """The MoAConfig with its AUTO routing settings replaced by what the rules picked."""
    return dataclasses.replace(
        moa, exit_layer=picked_exit if moa.exit_layer == AUTO else moa.exit_layer,
        temperature=fitted_temperature if moa.temperature == AUTO else moa.temperature,
        abstain_below=picked_threshold if moa.abstain_below == AUTO else moa.abstain_below)


def policy_record(moa) -> dict:
    return {k: getattr(moa, k) for k in ("decision", "route_on", "exit_layer", "temperature", "abstain_below",
                                         "fallback")}


def applied_routing_policy(workdir: str, moa):
    """`moa` with the routing policy of <workdir>/routing.json (unchanged when the run wrote none)."""
    path = os.path.join(workdir, ROUTING_FILE)
    if not os.path.exists(path):
        return moa
    with open(path) as f:
        policy = json.load(f)["policy"]
    return dataclasses.replace(moa, **{k: policy[k] for k in ("exit_layer", "temperature", "abstain_below",
                                                              "fallback")})


# ---- the study (runs routing passes) ------------------------------------------------------------------------------
def ood_prompts(tokenizer, system_prompt: Optional[str], prompt_format: str, exclude: Sequence[str]) -> dict:
    """Out-of-domain prompt token lists by source: the first OOD_SOURCES reasoning-gym generators of OOD_GENERATORS
    that are not among `exclude` (the run's domains), OOD_PER_GENERATOR each, and the plain chat requests (source
    'chat')."""
    import reasoning_gym
    from moa_jax.data.prompt_format import conversation, prompt_ids
    generators = [g for g in OOD_GENERATORS if g not in exclude][:OOD_SOURCES]
    texts = {g: [reasoning_gym.create_dataset(g, size=OOD_PER_GENERATOR, seed=OOD_SEED)[i]["question"]
                 for i in range(OOD_PER_GENERATOR)] for g in generators}
    texts["chat"] = list(CHAT_PROMPTS)
    return {source: [list(p) for p in prompt_ids(tokenizer, [conversation(
        {"messages": [{"role": "user", "content": t}]}, system_prompt) for t in items], prompt_format)]
        for source, items in texts.items()}


def split_prompts(split, per_domain: int) -> tuple[list, np.ndarray]:
    """The first `per_domain` prompts of every domain of a TokenizedSplit -> (token lists, labels [N])."""
    rows = np.concatenate([split.domain_rows(d)[:per_domain] for d in range(len(split.domains))])
    return [list(split.tokens(r)[:split.prompt_len[r]]) for r in rows], np.asarray(split.domain[rows])


def full_pass_logits(cfg, moa, params, prompts: list, pad_id: int, batch_size: int, length: int = 0) -> np.ndarray:
    """Every router's logits [L, N, E] of a full routing pass (no early exit, no abstention) over the prompts,
    left-padded to at least `length` (one length for every call: one compiled pass)."""
    from moa_jax.generate.decode import left_pad, route_from_prompt
    full = dataclasses.replace(moa, exit_layer=0, abstain_below=0.0, temperature=1.0, fallback="base")
    longest = max([length] + [len(p) for p in prompts])
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        tokens, mask = left_pad(chunk + [chunk[0]] * (batch_size - n), pad_id, length=longest)
        _, logits = route_from_prompt(cfg, full, params, tokens, mask)
        out.append(np.asarray(logits)[:, :n])
    return np.concatenate(out, axis=1)


def timed_layers(num_layers: int, rule_k: int, spread: int = TIMED_LAYERS) -> list[int]:
    """The exit layers a run's study times: `spread` evenly spaced ones from 1 to L, and rule_k with its neighbours."""
    ks = {int(round(x)) for x in np.linspace(1, num_layers, min(spread, num_layers))}
    ks |= {k for k in (rule_k - 1, rule_k, rule_k + 1) if 1 <= k <= num_layers}
    return sorted(ks)


def time_exit_layers(cfg, moa, params, prompts: list, pad_id: int, batch_size: int,
                     layers: Optional[Sequence[int]] = None) -> dict:
    """Seconds of the routing pass cut after each layer k of `layers` (default 1..L) and of a full base prefill
    (base model, LM head at the last position) over one batch of the prompts, each compiled first, then the median
    of TIMING_REPEATS runs, all in this process. -> {"prefill_seconds", "seconds": {k: seconds}}."""
    import jax
    import jax.numpy as jnp
    from moa_jax.generate.decode import left_pad
    from moa_jax.nn.entry import ModelInputs, routing_pass
    from moa_jax.nn.model import MoATransformer
    from moa_jax.routing import resolve
    chunk = (prompts * batch_size)[:batch_size]
    tokens, mask = left_pad(chunk, pad_id)
    x = ModelInputs(jnp.asarray(tokens), jnp.asarray(mask))
    model, mode = MoATransformer(cfg, moa), resolve(moa).pass_mode
    at = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)

    def median_seconds(fn) -> float:
        jax.block_until_ready(fn(params))
        runs = []
        for _ in range(TIMING_REPEATS):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            runs.append(time.perf_counter() - t0)
        return float(np.median(runs))

    prefill = jax.jit(lambda p: model.apply({"params": p}, x.tokens, routing="base", logits_at=at,
                                            **x.model_kwargs())[0])
    seconds = {k: median_seconds(jax.jit(lambda p, k=k: routing_pass(model, p, x, mode=mode, exit_layer=k)))
               for k in (layers or range(1, cfg.num_layers + 1))}
    return {"prefill_seconds": median_seconds(prefill), "seconds": seconds}


def routing_study(cfg, moa, params, data: dict, tokenizer, *, names: Sequence[str], system_prompt: Optional[str],
                  prompt_format: str, test_items: int, batch_size: int, timing: bool = True, timed: str = "some"):
    """The study of the module docstring on a finished stage 2 (`params`: base + its adapters). data: split ->
    TokenizedSplit (validation and test). timed: "some" (timed_layers) or "all" exit layers. -> (the MoAConfig
    with its AUTO settings resolved, the report dict)."""
    from moa_jax.routing import fallback_index
    pad_id, policy = data["test"].pad_id, moa.decision
    fallback_index(moa.fallback, names)   # an unknown fall-back name fails here
    val_prompts, val_labels = split_prompts(data["validation"], VALIDATION_PROMPTS)
    test_prompts, test_labels = split_prompts(data["test"], test_items)
    ood = ood_prompts(tokenizer, system_prompt, prompt_format, names)
    length = max(len(p) for group in [val_prompts, test_prompts, *ood.values()] for p in group)
    val = full_pass_logits(cfg, moa, params, val_prompts, pad_id, batch_size, length)          # (L, Nv, E)
    test = full_pass_logits(cfg, moa, params, test_prompts, pad_id, batch_size, length)        # (L, Nt, E)
    val_acc, test_acc = exit_accuracy(val, val_labels, policy), exit_accuracy(test, test_labels, policy)
    rule_k = pick_exit_layer(val_acc, moa.exit_tolerance)
    k = rule_k if moa.exit_layer == AUTO else (moa.exit_layer or cfg.num_layers)
    fitted = fit_temperature(val[:k], val_labels, policy)
    temperature = fitted if moa.temperature == AUTO else moa.temperature
    val_conf = confidence(val[:k], policy, temperature)
    rule_t = pick_threshold(val_conf, moa.abstain_coverage)
    threshold = rule_t if moa.abstain_below == AUTO else moa.abstain_below
    resolved = resolved_policy(moa, rule_k, fitted, rule_t)

    ood_conf = {src: confidence(full_pass_logits(cfg, moa, params, p, pad_id, batch_size, length)[:k], policy,
                                temperature)
                for src, p in ood.items()}
    all_ood = np.concatenate(list(ood_conf.values()))
    val_ok = decide(val[:k], policy) == val_labels
    test_ok = decide(test[:k], policy) == test_labels
    test_conf = confidence(test[:k], policy, temperature)

    def ece(logits, labels, t):
        return expected_calibration_error(confidence(logits, policy, t), decide(logits, policy) == labels)

    layers = None if timed == "all" else timed_layers(cfg.num_layers, rule_k)
    timings = time_exit_layers(cfg, moa, params, val_prompts, pad_id, batch_size, layers) if timing else None
    rows = []
    for i in range(cfg.num_layers):
        row = {"k": i + 1, "validation_accuracy": float(val_acc[i]), "test_accuracy": float(test_acc[i]),
               "validation_missed": missed_domains(val[:i + 1], val_labels, policy, names)}
        if timings is not None:
            sec = timings["seconds"].get(i + 1)
            row.update(seconds=sec, share_of_prefill=None if sec is None else sec / timings["prefill_seconds"])
        rows.append(row)
    report = {
        "routing_pass": resolve_pass(moa), "decision": policy, "num_layers": cfg.num_layers,
        "prompts": {"validation": len(val_labels), "test": len(test_labels),
                    "out_of_domain": {src: len(p) for src, p in ood.items()}},
        "by_exit_layer": rows, "prefill_seconds": None if timings is None else timings["prefill_seconds"],
        "exit_rule": {"rule": f"the shallowest k within {moa.exit_tolerance} points of the best validation "
                              f"routing accuracy", "rule_k": rule_k,
                      "exit_layer": k, "set_by": "rule" if moa.exit_layer == AUTO else "user"},
        "calibration": {"temperature": temperature, "fitted_temperature": fitted,
                        "set_by": "fit" if moa.temperature == AUTO else "user",
                        "validation_nll": {"before": nll(val[:k], val_labels, policy, 1.0),
                                           "after": nll(val[:k], val_labels, policy, temperature)},
                        "validation_ece": {"before": ece(val[:k], val_labels, 1.0),
                                           "after": ece(val[:k], val_labels, temperature)},
                        "test_ece": {"before": ece(test[:k], test_labels, 1.0),
                                     "after": ece(test[:k], test_labels, temperature)}},
        "abstention": {"threshold": threshold, "rule_threshold": rule_t,
                       "rule": f"the largest threshold that routes {moa.abstain_coverage:.0%} of the in-domain "
                               f"validation prompts",
                       "set_by": "rule" if moa.abstain_below == AUTO else "user", "fallback": moa.fallback,
                       "at_threshold": {"validation": abstention_stats(val_conf, val_ok, threshold),
                                        "test": abstention_stats(test_conf, test_ok, threshold)},
                       "at_rule_threshold": {"validation": abstention_stats(val_conf, val_ok, rule_t),
                                             "test": abstention_stats(test_conf, test_ok, rule_t),
                                             "out_of_domain_abstained": float((all_ood < rule_t).mean()),
                                             "out_of_domain_by_source": {src: float((c < rule_t).mean())
                                                                         for src, c in ood_conf.items()}},
                       "out_of_domain_abstained": float((all_ood < threshold).mean()),
                       "out_of_domain_by_source": {src: float((c < threshold).mean())
                                                   for src, c in ood_conf.items()}},
        "policy": policy_record(resolved),
    }
    return resolved, report


def resolve_pass(moa) -> str:
    return "probe (the plain base model)" if moa.route_on == "probe" else "adapted (each layer's own router)"


def write_routing_file(workdir: str, report: dict) -> None:
    with open(os.path.join(workdir, ROUTING_FILE), "w") as f:
        json.dump(report, f, indent=1)

