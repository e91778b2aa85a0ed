"""Expert-axis surgery and the old-expert update mask (moa_jax/grow.py), the new-domain specs
(moa_jax/data/new_domains.py) and routing accuracy with more domains than experts."""
import json

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from moa_jax.config import TrainConfig
from moa_jax.data.new_domains import new_domain_examples, parse_new_domains
from moa_jax.data.tasks import DataError
from moa_jax.eval.metrics import confusion_matrix, routing_accuracy
from moa_jax.grow import freeze_old_experts, grow_trainable, same_old_experts
from moa_jax.params import init_trainable
from moa_jax.train.step import make_optimizer
from tests.conftest import make_tiny_cfg, make_tiny_moa


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_grow_appends_fresh_experts_and_router_outputs(router_type):
    cfg = make_tiny_cfg()
    old = init_trainable(cfg, make_tiny_moa(num_experts=3, router_type=router_type, router_hidden=8),
                         jax.random.PRNGKey(0))
    donor = init_trainable(cfg, make_tiny_moa(num_experts=5, router_type=router_type, router_hidden=8),
                           jax.random.PRNGKey(1))
    grown = _flat(grow_trainable(old, donor, 3))
    fo, fd = _flat(old), _flat(donor)
    assert set(grown) == set(fd)
    for k, v in grown.items():
        assert v.shape == fd[k].shape, k
        if k[-1] in ("lora_a", "lora_b"):            # [L, E, ...]
            assert np.array_equal(v[:, :3], fo[k]) and np.array_equal(v[:, 3:], fd[k][:, 3:]), k
            if k[-1] == "lora_b":
                assert not v[:, 3:].any(), "new experts start as zero deltas"
        elif k[-2] == "hidden":                      # mlp router's first layer has no expert axis
            assert np.array_equal(v, fo[k])
        else:                                        # router outputs [L, D|Hr, E]
            assert np.array_equal(v[..., :3], fo[k]) and np.array_equal(v[..., 3:], fd[k][..., 3:]), k
    with pytest.raises(ValueError, match="expected 4"):
        grow_trainable(old, donor, 4)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_old_experts_stay_bit_identical_under_adamw_with_weight_decay(stage):
    cfg, moa = make_tiny_cfg(), make_tiny_moa(num_experts=4)
    params = _flat(init_trainable(cfg, moa, jax.random.PRNGKey(0)))
    # non-zero old experts everywhere (lora_b starts at 0), and one exact -0.0 that adding +0.0 would flip
    params = {k: v + (0.5 if k[-1] == "lora_b" else 0.0) for k, v in params.items()}
    lb = next(k for k in params if k[-1] == "lora_b")
    params[lb][0, 0, 0, 0] = -0.0
    params = traverse_util.unflatten_dict(params)
    tcfg = TrainConfig(stage=stage, steps=10, learning_rate=1e-2, weight_decay=0.1, warmup_frac=0.0)
    tx = freeze_old_experts(make_optimizer(tcfg, params), num_old=3)
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for i in range(4):
        grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape), p)
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
    assert same_old_experts(params, p, 3) == []
    assert np.signbit(np.asarray(traverse_util.flatten_dict(p)[lb])[0, 0, 0, 0]), "-0.0 kept bit for bit"
    before, after = _flat(params), _flat(p)
    for k in before:
        if k[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(before[k][:, 3:], after[k][:, 3:]), f"new expert of {k} did not train"
    router = [k for k in before if "router" in k]
    assert all(np.array_equal(before[k], after[k]) != (stage == "stage2") for k in router)  # routers: stage 2 only
    # the old experts' optimiser moments stayed at their initial zeros
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        names = [str(getattr(q, "key", getattr(q, "name", q))) for q in path]
        if names[-1] in ("lora_a", "lora_b") and np.ndim(leaf) == 4:
            assert not np.asarray(leaf)[:, :3].any() and np.asarray(leaf)[:, 3:].any(), names


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_frozen_old_router_outputs_stay_bit_identical(router_type):
    """refit_routers='new': the routers' old outputs (and an mlp router's shared hidden layer) keep their values,
    their new outputs and the new experts train."""
    cfg, moa = make_tiny_cfg(), make_tiny_moa(num_experts=4, router_type=router_type, router_hidden=8)
    params = init_trainable(cfg, moa, jax.random.PRNGKey(0))
    tcfg = TrainConfig(stage="stage2", steps=10, learning_rate=1e-2, weight_decay=0.1, warmup_frac=0.0)
    tx = freeze_old_experts(make_optimizer(tcfg, params), num_old=3, routers=True)
    state, p = tx.init(params), params
    for i in range(3):
        grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape), p)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    before, after = _flat(params), _flat(p)
    assert same_old_experts(params, p, 3) == []
    for k in before:
        if "router" not in k:
            continue
        if k[-2] == "hidden":
            assert np.array_equal(before[k], after[k]), k
        else:
            assert np.array_equal(before[k][..., :3], after[k][..., :3]), k
            assert not np.array_equal(before[k][..., 3:], after[k][..., 3:]), f"new router output of {k} froze"


def test_router_prior_is_a_logit_adjustment():
    """TrainConfig.router_prior: the stage-2 router CE is that of logits + log(share); a uniform prior gives the
    plain CE."""
    import jax.numpy as jnp
    from moa_jax.nn.model import MoATransformer
    from moa_jax.nn.router import router_ce_loss
    from moa_jax.params import merge_params
    from moa_jax.train.step import loss_fn
    from tests.train_helpers import init_trees, tiny_cfg, tiny_moa
    cfg, moa = tiny_cfg(), tiny_moa(num_experts=3)
    frozen, trainable = init_trees(cfg, moa)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 12), 1, cfg.vocab_size)
    mask = jnp.ones((4, 12), jnp.int32)
    batch = dict(tokens=tokens, attention_mask=mask, prompt_mask=mask.at[:, 6:].set(0),
                 loss_mask=mask.at[:, :6].set(0), domain=jnp.array([0, 1, 2, 2]), valid=jnp.ones(4, jnp.int32))
    model = MoATransformer(cfg, moa)
    _, aux = model.apply({"params": merge_params(frozen, trainable)}, tokens, attention_mask=mask,
                         prompt_mask=batch["prompt_mask"], routing="fixed", expert_idx=batch["domain"])
    losses = {}
    for prior in ((), (1 / 3,) * 3, (0.5, 0.25, 0.25)):
        tcfg = TrainConfig(stage="stage2", router_prior=prior)
        _, m = loss_fn(trainable, frozen, batch, jax.random.PRNGKey(1), model=model, tcfg=tcfg, num_domains=3)
        shift = jnp.log(jnp.asarray(prior or (1.0,)))
        want = router_ce_loss(aux["router_logits"] + shift, batch["domain"], batch["valid"])
        np.testing.assert_allclose(m["router_loss"], want, rtol=1e-5)
        losses[prior] = float(m["router_loss"])
    assert np.isclose(losses[()], losses[(1 / 3,) * 3], rtol=1e-5)
    assert not np.isclose(losses[()], losses[(0.5, 0.25, 0.25)], rtol=1e-3)
    with pytest.raises(Exception, match="router_prior must be > 0"):
        TrainConfig(stage="stage2", router_prior=(0.5, 0.0))


def test_without_the_mask_old_experts_change():
    """The check above can fail: plain AdamW with weight decay moves every expert."""
    cfg, moa = make_tiny_cfg(), make_tiny_moa(num_experts=4)
    params = init_trainable(cfg, moa, jax.random.PRNGKey(0))
    tx = make_optimizer(TrainConfig(stage="stage1", steps=10, weight_decay=0.1, warmup_frac=0.0), params)
    grads = jax.tree_util.tree_map(lambda x: jax.numpy.ones_like(x), params)
    state, p = tx.init(params), params
    for _ in range(2):   # the schedule's step 0 has learning rate 0
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    assert same_old_experts(params, p, 3)


def test_routing_accuracy_with_more_domains_than_experts():
    conf = confusion_matrix([0, 1, 2, 2], [0, 0, 1, 0], num_domains=3, num_experts=2)
    assert conf.shape == (3, 2)
    np.testing.assert_allclose(routing_accuracy(conf), [1.0, 0.0, 0.0])


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_new_domain_specs(tmp_path):
    lines = [json.dumps({"prompt": f"Add {i} and {i + 1}.", "response": str(2 * i + 1)}) for i in range(200)]
    plain = _write(tmp_path / "adding.jsonl", lines)
    named = _write(tmp_path / "x.jsonl", [json.dumps({"domain": "sums", **json.loads(x)}) for x in lines])
    specs = parse_new_domains([f"jsonl:{plain}", f"jsonl:{named}", f"mine=jsonl:{plain}", "basic_arithmetic",
                               "arith2=chain_sum"])
    assert [(d.name, d.kind) for d in specs] == [("adding", "jsonl"), ("sums", "jsonl"), ("mine", "jsonl"),
                                                 ("basic_arithmetic", "generator"), ("arith2", "generator")]
    ex = new_domain_examples(specs[3:], {"train": 6, "validation": 2, "test": 3}, 0.05)
    assert [len(ex[s]["basic_arithmetic"]) for s in ("train", "validation", "test")] == [6, 2, 3]
    prompts = [e["messages"][0]["content"] for s in ex for e in ex[s]["basic_arithmetic"]]
    assert len(set(prompts)) == 11, "distinct prompts across splits"
    js = new_domain_examples(specs[:1], {}, 0.1)
    assert sum(len(js[s]["adding"]) for s in js) == 200 and all(js[s]["adding"] for s in js)


GOOD = json.dumps({"prompt": "a", "response": "b"})
BAD_FILES = {"bad.jsonl": [GOOD, "{oops"],
             "two.jsonl": [json.dumps({"domain": "a", "prompt": "a", "response": "b"}),
                           json.dumps({"domain": "b", "prompt": "c", "response": "d"})]}


@pytest.mark.parametrize("spec, message", [
    ("no_such_generator", "neither jsonl:PATH nor a reasoning-gym generator"),
    ("jsonl:{tmp}/missing.jsonl", "is not a file"),
    ("jsonl:{tmp}/bad.jsonl", "bad.jsonl:2: malformed JSON"),
    ("jsonl:{tmp}/two.jsonl", "one domain per file"),
    ("bad name!=basic_arithmetic", "may hold only letters"),
])
def test_bad_new_domain_specs(tmp_path, spec, message):
    for name, lines in BAD_FILES.items():
        _write(tmp_path / name, lines)
    with pytest.raises(DataError, match=message):
        parse_new_domains([spec.format(tmp=tmp_path)])


def test_duplicate_new_domains():
    with pytest.raises(DataError, match="duplicate"):
        parse_new_domains(["basic_arithmetic", "basic_arithmetic"])
