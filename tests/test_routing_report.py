"""Routing per family and the worst confusions: the metrics on a hand-made confusion matrix, the report's tables on
the smoke run, and the wide registry (52 reasoning-gym domains) against the installed reasoning_gym."""
import json
import os

import numpy as np
import pytest

from moa_jax.data import tasks
from moa_jax.eval import metrics

DOMAINS = ("gcd", "lcm", "chain_sum", "word_sorting")
FAMILIES = {"gcd": "number theory", "lcm": "number theory", "chain_sum": "arithmetic", "word_sorting": ""}
#            expert: gcd lcm chain word
CONFUSION = np.asarray([[6, 3, 1, 0],      # gcd: 6 right, 3 to lcm (same family), 1 to chain_sum
                        [2, 8, 0, 0],      # lcm: 2 to gcd
                        [0, 0, 4, 1],      # chain_sum: 1 to word_sorting
                        [0, 0, 0, 5]])


def test_family_routing_hand_derived():
    fam = metrics.family_routing(CONFUSION, DOMAINS, FAMILIES)
    assert list(fam) == ["number theory", "arithmetic"]        # word_sorting has no family here: left out
    nt = fam["number theory"]
    assert nt["domains"] == 2 and nt["items"] == 20
    assert nt["accuracy"] == pytest.approx(14 / 20)
    assert nt["within_family"] == pytest.approx(5 / 20) and nt["elsewhere"] == pytest.approx(1 / 20)
    ar = fam["arithmetic"]
    assert (ar["items"], ar["accuracy"], ar["within_family"], ar["elsewhere"]) == (5, 0.8, 0.0, pytest.approx(0.2))


def test_worst_confusions_hand_derived():
    cells = metrics.worst_confusions(CONFUSION, DOMAINS, k=3)
    assert [(c["domain"], c["routed_to"], c["items"]) for c in cells] == [
        ("gcd", "lcm", 3), ("lcm", "gcd", 2), ("chain_sum", "word_sorting", 1)]   # a 1-item tie: larger share first
    assert cells[0]["share"] == pytest.approx(0.3) and cells[2]["share"] == pytest.approx(0.2)
    assert metrics.worst_confusions(np.eye(3, dtype=int) * 4, DOMAINS[:3]) == []


def test_smoke_report_has_family_tables(smoke):
    workdir, _ = smoke
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["families"] == {d: tasks.family_of(d) for d in tasks.DOMAIN_NAMES}
    md = open(os.path.join(workdir, "results.md")).read()
    conf = res["methods"]["moa_router"]["confusion"]
    section = md.split("### Routing of `moa_router` per family")[1].split("###")[0]
    for fam, row in metrics.family_routing(conf, res["domains"], res["families"]).items():
        assert f"| {fam} | {row['domains']} | {row['items']} | {row['accuracy']:.3f} |" in section
    worst = md.split("### Worst confusions of `moa_router`")[1].split("###")[0]
    cells = metrics.worst_confusions(conf, res["domains"])
    assert cells   # smoke's routers are untrained: they confuse
    for c in cells:
        assert f"| {c['domain']} | {c['routed_to']} | {c['items']} |" in worst


def test_wide_registry_generators_and_verifiers():
    from moa_jax.data.moa_tasks import moa_tasks_dataset_builder as mtb
    assert len(tasks.WIDE_DOMAINS) >= 50 and len(set(tasks.WIDE_DOMAIN_NAMES)) == len(tasks.WIDE_DOMAINS)
    assert tasks.WIDE_DOMAIN_NAMES[:10] == tasks.DOMAIN_NAMES
    assert mtb.registry_fingerprint(tasks.WIDE_DOMAINS) == mtb.WIDE_FINGERPRINT, (
        "the wide registry changed: bump WIDE_VERSION and set WIDE_FINGERPRINT = "
        f"{mtb.registry_fingerprint(tasks.WIDE_DOMAINS)!r}")
    families = {}
    for d in tasks.WIDE_DOMAINS:
        families.setdefault(d.family, []).append(d.name)
        ex = next(tasks.generate(d, 1))
        assert ex["prompt"] and tasks.is_correct(d.name, ex["answer"], ex), d.name
        assert not tasks.is_correct(d.name, "", ex), d.name                  # the verifier can say no
        assert tasks.score(d.name, "I think so. ) ] × 7", ex) < 1.0, d.name    # and never raises on model text
    for group in (("chain_sum", "decimal_chain_sum", "basic_arithmetic"), ("gcd", "lcm"),
                  ("word_sorting", "number_sorting")):
        assert len({tasks.family_of(n) for n in group}) == 1 and tasks.family_of(group[0])
    assert all(len(names) >= 2 for names in families.values()), families
