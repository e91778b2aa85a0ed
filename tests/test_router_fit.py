"""moa_jax/train/router_fit.py on the tiny test model and on synthetic features:
  - router_inputs: features @ router kernel reproduce the base pass's router logits in every layer, for the linear
    and the mlp router, and do not depend on the kernel they were read with (the base pass reads no router);
  - fit_new_outputs: the old columns stay bit-identical; on separable features where the new column starts below
    an old one (the add_domain failure), the fit routes the new class's examples to it without stealing the old
    classes'; the class-balanced objective does not follow the number of examples per class;
  - a new expert without cached prompts is refused;
  - stage2.router_fit_prompts in a run (`python -m experiments.run`, smoke preset with route_on=probe): the stage-2
    adapters hold the SGD routers fitted by fit_routers on the run's cached train prompts (checked against a variant
    trained with the same SGD steps and no fit), the experts untouched; results.json and results.md report the fit,
    also in a run that reuses that stage 2.
"""
import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moa_jax.config import replace
from moa_jax.nn.model import MoATransformer
from moa_jax.params import merge_params
from moa_jax.train.router_fit import fit_new_outputs, router_inputs, router_kernel_key
from moa_jax.train.step import base_router_logits
from tests.train_helpers import SyntheticSource, init_trees, tiny_cfg, tiny_moa


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_router_inputs_reproduce_the_base_pass_logits(router_type):
    cfg = tiny_cfg()
    moa = replace(tiny_moa(num_experts=3), route_on="probe", router_type=router_type, router_hidden=16)
    frozen, trainable = init_trees(cfg, moa)
    model = MoATransformer(cfg, moa)
    batch = {k: jnp.asarray(v) for k, v in SyntheticSource(batch_size=6, num_domains=3).batch(0).items()}
    key = router_kernel_key(trainable)
    assert key[-2] == ("router" if router_type == "linear" else "out")
    features = np.asarray(router_inputs(model, frozen, trainable, batch))                 # [B, L, F]
    flat = traverse_util.flatten_dict(trainable)
    assert features.shape == (6, cfg.num_layers, flat[key].shape[1])
    logits = np.asarray(base_router_logits(model, merge_params(frozen, trainable), batch))   # [L, B, E]
    np.testing.assert_allclose(np.einsum("blf,lfe->lbe", features, flat[key]), logits, rtol=1e-5, atol=1e-6)
    other = traverse_util.unflatten_dict({**flat, key: 3.0 * flat[key] + 1.0})
    np.testing.assert_allclose(np.asarray(router_inputs(model, frozen, other, batch)), features, rtol=1e-6)


def _separable(n_per_class, num_classes=3, layers=2, features=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((num_classes, features))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[labels][:, None, :] + 0.3 * rng.standard_normal((len(labels), layers, features))
    return x.astype(np.float32), labels


def test_fit_routes_the_new_class_and_keeps_the_old_columns():
    x, y = _separable([40, 40, 40])
    # old columns: class prototypes; the new column starts as a copy of class 1's, scaled just below it
    proto = np.stack([x[y == c].mean(0) for c in range(3)], axis=-1)                     # [L, F, 3]
    kernel = proto.copy()
    kernel[..., 2] = 0.9 * proto[..., 1]
    before = np.argmax(np.einsum("nlf,lfe->nle", x, kernel)[:, -1], -1)
    assert (before[y == 2] != 2).all()                                                   # never routed to
    fitted, stats = fit_new_outputs(x, y, kernel, num_old=2)
    assert np.array_equal(fitted[..., :2], kernel[..., :2])
    after = np.argmax(np.einsum("nlf,lfe->nle", x, fitted)[:, -1], -1)
    assert (after == y).mean() >= 0.95 and (after[y == 2] == 2).mean() >= 0.95
    assert stats["objective_after"] < stats["objective_before"]
    assert stats["last_router_train_accuracy_after"] > stats["last_router_train_accuracy_before"]


def test_fit_objective_is_class_balanced():
    x, y = _separable([40, 40, 40], seed=1)
    kernel = np.zeros((2, 8, 3), np.float32)
    kernel[..., :2] = np.stack([x[y == c].mean(0) for c in range(2)], axis=-1)
    keep = np.concatenate([np.flatnonzero(y != 0), np.flatnonzero(y == 0)[:10]])         # class 0: 10, not 40
    dup = np.concatenate([keep, np.flatnonzero(y == 2)])                                 # class 2 counted twice
    b, _ = fit_new_outputs(x[dup], y[dup], kernel, num_old=2, steps=50)
    c, _ = fit_new_outputs(x[keep], y[keep], kernel, num_old=2, steps=50)
    np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-5)   # duplicating a class's examples changes nothing
    assert np.abs(c[..., 2] - kernel[..., 2]).max() > 0.1    # and the fit did move the new column


def test_new_expert_without_prompts_is_refused():
    x, y = _separable([5, 5, 5])
    with pytest.raises(ValueError, match=r"no cached prompts for new expert\(s\) \[3\]"):
        fit_new_outputs(x, y, np.zeros((2, 8, 4), np.float32), num_old=3)


def test_stage2_router_fit_in_a_run(smoke, tmp_path):
    from benchmarks.studies.routing_exit import load_study_inputs
    from experiments import run
    from moa_jax.train.checkpoint import load_adapters
    from moa_jax.train.router_fit import fit_routers
    workdir = str(tmp_path / "fit")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set", "eval.items_per_domain=1",
                       "--set", "eval.methods=moa_router", "--set", f"reuse_from={smoke[0]}",
                       "--set", "moa.route_on=probe", "--set", "stage2.router_fit_prompts=3",
                       "--set", "variants=sgd:stage2.router_fit_prompts=0;methods=moa_router"])
    assert rc == 0
    res = json.load(open(os.path.join(workdir, "results.json")))
    stats = res["router_fit"]["stage2"]
    assert list(res["router_fit"]) == ["stage2"]                       # the variant without the fit has none
    assert stats["examples"] == 3 * len(res["domains"]) and stats["prompts_per_domain"] == 3
    assert stats["objective_after"] < stats["objective_before"]
    assert "`stage2`: Every router output fitted after the SGD steps on 30 cached training prompts (3 per domain; " \
           "stage2.router_fit_prompts)" in open(os.path.join(workdir, "results.md")).read()
    fitted, saved = load_adapters(os.path.join(workdir, "stage2", "adapters"))
    sgd, _ = load_adapters(os.path.join(workdir, "variants", "sgd", "stage2", "adapters"))
    assert saved["router_fit"] == stats and saved["train"]["router_fit_prompts"] == 3
    # the same fit, run here on the variant's SGD adapters (same stage 1, same batches), gives the saved routers
    x = load_study_inputs(workdir, "stage2", ("train",))
    want, _ = fit_routers(x.cfg, x.info.moa, x.frozen, x.data["train"], sgd, 0, 3, batch_size=x.exp.data.eval_batch,
                          buckets=x.exp.data.buckets)
    got, want, sgd = (traverse_util.flatten_dict(t) for t in (fitted, want, sgd))
    key = router_kernel_key(fitted)
    assert not np.array_equal(got[key], sgd[key])
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    for k in got:
        if k != key:
            assert np.array_equal(got[k], sgd[k]), k                   # experts and router biases: SGD's
    # a run that reuses this stage 2 (same config) neither trains nor fits again, and reports the fit it carries
    again = str(tmp_path / "again")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp=smoke", f"--workdir={again}", "--no_progress", "--set", "eval.items_per_domain=1",
                       "--set", "eval.methods=moa_router", "--set", f"reuse_from={workdir}", "--set", "variants=",
                       "--set", "moa.route_on=probe", "--set", "stage2.router_fit_prompts=3"])
    assert rc == 0
    res2 = json.load(open(os.path.join(again, "results.json")))
    assert res2["stages"]["stage2"] == os.path.join(workdir, "stage2") and not os.path.isdir(os.path.join(again,
                                                                                                          "stage2"))
    assert res2["router_fit"] == {"stage2": stats}
