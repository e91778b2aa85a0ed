"""Other routers on the same experts: which expert each test prompt gets, and what that costs in answers and PPL.

    python -m benchmarks.studies.peer_routers --workdir RUN [--stage stage2] [--items-per-domain N]
        [--fit-items-per-domain 200] [--arrow-top-k 3] [--arrow-prior-items 10] [--no-arrow]
        [--routers oracle,moa_router,...] [--out DIR]

RUN is a finished `python -m experiments.run` work directory (two_stage workflow). Every router below works on the
stage's experts (default: stage2, the MoA model) and the same test items the run's evaluation used (the first
`--items-per-domain` test items of every domain; default: the run's eval.items_per_domain):
  oracle      the domain label (routing accuracy 1 by definition; the run's moa_oracle)
  moa_router  our routers on the full routing pass (the stage's route_on and decision; every router, no abstention)
  moa_router_early_exit  the same routers cut after the layer the run picked on validation (routing.json)
  tfidf       TF-IDF + logistic regression (scikit-learn) on the TRAIN prompts' text: the paper's classifier + LoRA
              baseline (Table 3; the paper's classifier is a roberta-base)
  centroid    training-free: the base model (adapters off) over the prompt, final hidden state (after the final
              norm) mean-pooled over the prompt tokens; the expert of the nearest domain centroid by cosine, the
              centroids the means of the (unit-normalised) TRAIN prompts' pooled states
  arrow       PEFT's Arrow routing (`peft.create_arrow_model`, arXiv 2405.11157) over the experts exported with
              moa_jax.export.export_peft, run by PEFT itself in torch (benchmarks/studies/peer_arrow.py). Arrow
              mixes the top-k experts per token in every adapted layer; its "routed expert" here is the expert with
              the largest routing weight averaged over the prompt's tokens and all adapted modules (a definition
              of ours: Arrow itself never picks one)
  arrow_prior the same mean Arrow weights divided by their mean over --arrow-prior-items TRAIN prompts per domain
              (Arrow's prompt-independent preference for some experts), argmax; the whole sequence then runs with
              that expert in moa_jax like the rows above (Arrow's prototypes as a sequence-level router: ours)
The classifier and the centroids see only the run's train split (at most --fit-items-per-domain prompts per domain,
the first ones), never validation or test prompts. `moa_router` is our routers on the full routing pass,
`moa_router_early_exit` the same routers cut at the layer the run picked on validation (routing.json).

For every router but Arrow, answer accuracy and PPL come from moa_jax itself (moa_jax.eval.suite.evaluate_method):
each test item runs with its chosen expert for the whole sequence, greedy decoding, the domain's verifier; items
that two routers send to the same expert are computed once. Arrow's answers and NLL come from PEFT (greedy
`generate`, teacher-forced logits), scored by the same verifier and the same NLL definition (response tokens).
Routing cost per prompt: wall seconds of the routing decision alone over all test prompts / N, compiled programs
warmed up first (jax on CPU for ours and centroid, scikit-learn for tfidf); the oracle costs nothing; Arrow's
routing and mixing happen inside every adapted layer on every token, so its cost is the extra time of the Arrow
prompt forward over the plain base forward, both in torch.
Writes DIR/peer_routers.md and DIR/peer_routers.json (default DIR: RUN/peer_routers).

Shape glossary: N test items, D domains, E experts, B batch, T tokens, F features (hidden size).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.eval.calibration import applied_routing_policy
from moa_jax.eval.evaluate import Method, assign_experts
from moa_jax.eval.suite import EvalSet, ItemMemo, adapters_key, build_eval_set, evaluate_method
from moa_jax.generate.decode import eos_ids, left_pad

ARROW, ARROW_PRIOR = "arrow", "arrow_prior"


@dataclasses.dataclass
class Run:
    """What the routers need of a finished run."""
    workdir: str
    exp: Any                  # ExperimentConfig
    cfg: Any                  # ModelConfig
    frozen: Any
    tokenizer: Any
    moa: Any                  # the stage's MoAConfig
    trainable: Any            # the stage's adapters and routers
    train: Any                # TokenizedSplit
    es: EvalSet               # the test items
    system_prompt: Optional[str]

    @property
    def domains(self) -> tuple:
        return self.es.domains

    def method(self, name: str, moa=None) -> Method:
        """A registered method on this stage's adapters (its parameters resolved), routed as `moa` says (default:
        the stage's MoAConfig)."""
        return Method(name, key="moa").resolve(self.frozen, {"moa": (moa or self.moa, self.trainable)})


@dataclasses.dataclass
class Choice:
    """A router's decision for every test item: experts [N] (None: Arrow, which mixes), seconds of routing."""
    experts: Optional[np.ndarray]
    seconds: float
    how: str


def load_run(workdir: str, stage: str, items_per_domain: int) -> Run:
    """The run's base model, the stage's adapters, the train split and the test items (as its evaluation)."""
    from moa_jax.data.pipeline import load_split
    from moa_jax.loading.base import default_dtype, load_base_model
    from moa_jax.run_artifacts import read_json, read_run
    from moa_jax.train.checkpoint import load_adapters
    from moa_jax.workflows.add_domain import experiment_from_dict
    info = read_run(workdir, stage)
    config = read_json(os.path.join(workdir, "config.json"))
    if config.get("workflow", "two_stage") != "two_stage":
        raise ValueError(f"{workdir}: a {config['workflow']!r} run; the study reads two_stage runs (their data is "
                         f"the config's data)")
    exp = experiment_from_dict(config)
    cfg, frozen, tokenizer = load_base_model(info.source, default_dtype(info.dtype or exp.dtype))
    trainable, _ = load_adapters(info.adapters)
    train, test = load_split(exp.data, tokenizer, "train"), load_split(exp.data, tokenizer, "test")
    if tuple(train.domains) != tuple(info.domains):
        raise ValueError(f"{workdir}: the data's domains {list(train.domains)} are not the experts "
                         f"{list(info.domains)}")
    es = build_eval_set(test, tuple(train.domains), items_per_domain or exp.eval.items_per_domain,
                        exp.eval.batch_size, exp.data.buckets)
    return Run(workdir, exp, cfg, frozen, tokenizer, info.moa, trainable, train, es, info.system_prompt)


def prompt_text(example: dict) -> str:
    """The user's text of an example (what a text classifier reads: no system prompt, no chat template)."""
    return "\n".join(m["content"] for m in example["messages"] if m["role"] == "user")


def fit_rows(split, per_domain: int) -> np.ndarray:
    """The first `per_domain` rows of every domain of the TRAIN split."""
    return np.concatenate([split.domain_rows(d)[:per_domain] for d in range(len(split.domains))])


# ---- routers ------------------------------------------------------------------------------------------------------
def route_oracle(run: Run, args) -> Choice:
    return Choice(run.es.labels.astype(np.int64), 0.0, "the domain label")


def _route_moa(run: Run, moa, how: str) -> Choice:
    method = run.method("moa_router", moa)
    call = functools.partial(assign_experts, run.cfg, method, run.es.prompts, run.es.labels,
                             pad_id=run.train.pad_id, batch_size=run.exp.eval.batch_size)
    call()                                                     # compile
    t0 = time.perf_counter()
    experts = call()
    return Choice(experts, time.perf_counter() - t0, f"MoA routers (route_on={moa.route_on}, decision="
                                                     f"{moa.decision}), {how}")


def route_ours(run: Run, args) -> Choice:
    """Our routers on the full routing pass (every router; no calibration or abstention: the paper's decision)."""
    moa = dataclasses.replace(run.moa, exit_layer=0, temperature=1.0, abstain_below=0.0)
    return _route_moa(run, moa, "one full routing pass")


def route_ours_early_exit(run: Run, args) -> Choice:
    """Our routers with the early exit the run picked on validation (<workdir>/routing.json); a run without one
    routes with every router, as moa_router. Abstention is left off here, so every prompt gets an expert."""
    moa = dataclasses.replace(applied_routing_policy(run.workdir, run.moa), abstain_below=0.0)
    k = moa.exit_layer if moa.exit_layer > 0 else run.cfg.num_layers
    return _route_moa(run, moa, f"a routing pass cut after layer {k} of {run.cfg.num_layers}")


def tfidf_classifier(texts: list[str], labels: np.ndarray):
    """TF-IDF over word 1-2-grams + multinomial logistic regression, fitted on (texts, labels)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                        LogisticRegression(max_iter=1000, C=10.0))
    return clf.fit(texts, labels)


def route_tfidf(run: Run, args) -> Choice:
    rows = fit_rows(run.train, args.fit_items_per_domain)
    clf = tfidf_classifier([prompt_text(run.train.example(r)) for r in rows], run.train.domain[rows])
    texts = [prompt_text(e) for e in run.es.examples]
    t0 = time.perf_counter()
    experts = clf.predict(texts).astype(np.int64)
    return Choice(experts, time.perf_counter() - t0,
                  f"TF-IDF + logistic regression on {len(rows)} train prompts (scikit-learn)")


@functools.lru_cache(maxsize=None)
def _pool_fn(cfg):
    from moa_jax.nn.model import MoATransformer
    from moa_jax.nn.router import masked_mean_pool
    model = MoATransformer(cfg)            # the plain base model

    @jax.jit
    def pool(params, tokens, mask):
        b, t = tokens.shape
        at = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # nll_targets: the LM head in token blocks, never [B, T, V] logits; only the final norm's output is read
        _, state = model.apply({"params": params}, tokens, attention_mask=mask, routing="base", logits_at=at,
                               nll_targets=jnp.zeros_like(tokens), mutable=["intermediates"],
                               capture_intermediates=lambda mdl, _: mdl.name == "final_norm")
        h = state["intermediates"]["final_norm"]["__call__"][0]                                # (B, T, F)
        return masked_mean_pool(h, mask)                                                       # (B, F)
    return pool


def pooled_states(cfg, frozen, prompts: list, pad_id: int, batch_size: int, length: int) -> np.ndarray:
    """The base model's final hidden state mean-pooled over each prompt's tokens -> [N, F] float32. Batches of
    `batch_size` left-padded to `length` (one compiled shape)."""
    fn, out = _pool_fn(cfg), []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        n = len(chunk)
        tokens, mask = left_pad(chunk + [chunk[0]] * (batch_size - n), pad_id, length=length)
        out.append(np.asarray(fn(frozen, jnp.asarray(tokens), jnp.asarray(mask)))[:n])
    return np.concatenate(out)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def domain_centroids(features: np.ndarray, labels: np.ndarray, num_domains: int) -> np.ndarray:
    """[N, F] features, [N] domain ids -> [D, F] unit-length means of each domain's unit-length features."""
    f = unit(features)
    return unit(np.stack([f[labels == d].mean(axis=0) for d in range(num_domains)]))


def nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[N, F] features, [D, F] unit centroids -> [N] index of the most cosine-similar centroid."""
    return np.argmax(unit(features) @ centroids.T, axis=-1)


def route_centroid(run: Run, args) -> Choice:
    rows = fit_rows(run.train, args.fit_items_per_domain)
    fit_prompts = [list(run.train.tokens(r)[:run.train.prompt_len[r]]) for r in rows]
    length = max(len(p) for p in fit_prompts + run.es.prompts)
    pool = functools.partial(pooled_states, run.cfg, run.frozen, pad_id=run.train.pad_id,
                             batch_size=run.exp.eval.batch_size, length=length)
    centroids = domain_centroids(pool(fit_prompts), run.train.domain[rows], len(run.domains))
    t0 = time.perf_counter()
    experts = nearest_centroid(pool(run.es.prompts), centroids).astype(np.int64)
    return Choice(experts, time.perf_counter() - t0,
                  f"nearest cosine centroid of the base model's pooled final hidden state ({len(rows)} train prompts)")


# The routers in table order: name -> (function(run, args) -> Choice).
ROUTERS: dict[str, Callable[[Run, Any], Choice]] = {
    "oracle": route_oracle,
    "moa_router": route_ours,
    "moa_router_early_exit": route_ours_early_exit,
    "tfidf": route_tfidf,
    "centroid": route_centroid,
}


# ---- evaluation and report ----------------------------------------------------------------------------------------
def evaluate_choice(run: Run, choice: Choice, memo: ItemMemo) -> dict:
    """Answer accuracy, PPL, routing accuracy + confusion of the stage's experts with the chosen experts forced."""
    method = run.method("moa_oracle")           # forced experts on the stage's adapters
    es = run.es
    return evaluate_method(run.cfg, es, method, pad_id=run.train.pad_id, eos_ids=eos_ids(run.tokenizer),
                           max_new_tokens=run.exp.eval.max_new_tokens, batch_size=run.exp.eval.batch_size,
                           decode=lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True),
                           memo=memo, memo_key=adapters_key(method), experts=choice.experts)


def summary_row(name: str, entry: dict, choice_seconds: float, how: str, n: int) -> dict:
    return {"router": name, "routing_accuracy": entry["mean_routing_accuracy"], "accuracy": entry["mean_accuracy"],
            "ppl": entry["mean_ppl"], "routing_ms_per_prompt": 1000.0 * choice_seconds / n, "how": how}


def markdown(rows: list[dict], results: dict) -> str:
    n, d = results["items"], len(results["domains"])
    lines = [f"## Peer routers on the same experts ({results['stage']} of {results['workdir']})", "",
             f"{n} test items ({n // d} per domain, {d} domains). Routing and answer accuracy: unweighted means over "
             f"domains; PPL: mean of the per-domain PPLs on the response tokens; routing cost: wall ms per prompt "
             f"({results['cpu']}).", "",
             "| router | routing accuracy | answer accuracy | PPL | routing ms / prompt | how it routes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['router']} | {r['routing_accuracy']:.3f} | {r['accuracy']:.3f} | {r['ppl']:.3f} | "
                     f"{r['routing_ms_per_prompt']:.2f} | {r['how']} |")
    lines += ["", "Routing accuracy per domain:", "",
              "| domain | " + " | ".join(r["router"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for dom in results["domains"]:
        cells = [f"{results['routers'][r['router']]['per_domain'][dom]['routing_accuracy']:.2f}" for r in rows]
        lines.append(f"| {dom} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}"


def run_study(workdir: str, *, stage: str = "stage2", items_per_domain: int = 0, fit_items_per_domain: int = 200,
              routers: Optional[list] = None, arrow: bool = True, arrow_top_k: int = 3, arrow_prior_items: int = 10,
              scratch: Optional[str] = None, log=print) -> dict:
    """The routers of ROUTERS named in `routers` (default: all), and Arrow with arrow_prior when `arrow`, on the
    run's stage -> results dict (also what the JSON holds)."""
    args = argparse.Namespace(fit_items_per_domain=fit_items_per_domain)
    run = load_run(workdir, stage, items_per_domain)
    n = len(run.es.rows)
    results = {"workdir": workdir, "stage": stage, "domains": list(run.domains), "items": n, "cpu": cpu_name(),
               "fit_items_per_domain": fit_items_per_domain, "routers": {}}
    memo, rows = ItemMemo(), []
    for name, fn in ROUTERS.items():
        if routers is not None and name not in routers:
            continue
        choice = fn(run, args)
        entry = evaluate_choice(run, choice, memo)
        entry["experts"] = choice.experts.tolist()
        entry["routing_seconds"] = choice.seconds
        results["routers"][name] = entry
        rows.append(summary_row(name, entry, choice.seconds, choice.how, n))
        log(f"{name:<12} routing {entry['mean_routing_accuracy']:.3f}  accuracy {entry['mean_accuracy']:.3f}  "
            f"ppl {entry['mean_ppl']:.3f}")
    if arrow:
        from benchmarks.studies import peer_arrow
        rows_prior = fit_rows(run.train, arrow_prior_items)
        prior_prompts = [list(run.train.tokens(r)[:run.train.prompt_len[r]]) for r in rows_prior]
        entry = peer_arrow.evaluate_arrow(run, top_k=arrow_top_k, prior_prompts=prior_prompts,
                                          scratch=scratch or os.path.join(workdir, "peer_routers"))
        results["routers"][ARROW] = entry
        rows.append(summary_row(ARROW, entry, entry["routing_seconds"], entry["how"], n))
        # the prior-normalised choice costs the same Arrow prompt forward; moa_jax runs the chosen expert
        choice = Choice(np.asarray(entry["prior_experts"], np.int64), entry["routing_seconds"],
                        f"Arrow's mean weights over the prompt / their mean over {len(rows_prior)} train prompts "
                        f"(top-{arrow_top_k}), argmax; one expert for the whole sequence")
        prior_entry = evaluate_choice(run, choice, memo)
        prior_entry.update(experts=choice.experts.tolist(), routing_seconds=choice.seconds)
        results["routers"][ARROW_PRIOR] = prior_entry
        rows.append(summary_row(ARROW_PRIOR, prior_entry, choice.seconds, choice.how, n))
        for name in (ARROW, ARROW_PRIOR):
            e = results["routers"][name]
            log(f"{name:<12} routing {e['mean_routing_accuracy']:.3f}  accuracy {e['mean_accuracy']:.3f}  "
                f"ppl {e['mean_ppl']:.3f}")
    results["table"] = rows
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished experiments.run work directory")
    ap.add_argument("--stage", default="stage2", help="whose experts (default stage2: the MoA model)")
    ap.add_argument("--items-per-domain", type=int, default=0, help="test items per domain (default: the run's)")
    ap.add_argument("--fit-items-per-domain", type=int, default=200,
                    help="train prompts per domain for the classifier and the centroids")
    ap.add_argument("--arrow-top-k", type=int, default=3, help="Arrow's experts per token (PEFT's default 3)")
    ap.add_argument("--arrow-prior-items", type=int, default=10,
                    help="train prompts per domain for the arrow_prior row's prior")
    ap.add_argument("--no-arrow", action="store_true", help="skip Arrow (torch + PEFT)")
    ap.add_argument("--routers", default="", help=f"comma-separated subset of {','.join(ROUTERS)}, {ARROW} "
                                                  f"(with {ARROW_PRIOR}); default: all")
    ap.add_argument("--out", default="", help="output folder (default: WORKDIR/peer_routers)")
    args = ap.parse_args(argv)
    from moa_jax.errors import UserError
    if min(args.fit_items_per_domain, args.arrow_top_k, args.arrow_prior_items) < 1 or args.items_per_domain < 0:
        print("error: --fit-items-per-domain, --arrow-top-k and --arrow-prior-items must be >= 1, "
              "--items-per-domain >= 0",
              file=sys.stderr)
        return 2
    names = [n for n in args.routers.split(",") if n]
    unknown = sorted(set(names) - set(ROUTERS) - {ARROW})
    if unknown:
        print(f"error: --routers: unknown {unknown}; valid: {', '.join(ROUTERS)}, {ARROW}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, "peer_routers")
    try:
        results = run_study(args.workdir, stage=args.stage, items_per_domain=args.items_per_domain,
                            fit_items_per_domain=args.fit_items_per_domain,
                            routers=[n for n in names if n != ARROW] if names else None,
                            arrow=not args.no_arrow and (not names or ARROW in names),
                            arrow_top_k=args.arrow_top_k, arrow_prior_items=args.arrow_prior_items, scratch=out)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "peer_routers.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results["table"], results)
    with open(os.path.join(out, "peer_routers.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
