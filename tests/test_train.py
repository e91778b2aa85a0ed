"""Training tests: resume after SIGKILL, stage-1 independence, sharding on 8 CPU devices, two CPU processes, no
recompilation, overfitting, non-finite losses, checkpoint/config mismatch, adapter artifacts.

Tiny model (D=32, L=2, V=64) and a synthetic BatchSource (tests/train_helpers.py) whose batch(index) is a pure
function of index. A persistent compilation cache in a temporary directory (this module and its subprocess workers)
lets tests that run the same program (same config, same mesh) compile it once; each still traces and lowers it.
"""
import dataclasses
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from moa_jax.train.checkpoint import CheckpointMismatchError, StageCheckpointer, load_adapters, save_adapters
from moa_jax.config import ConfigError, MeshConfig
from moa_jax.nn.model import MoATransformer
from moa_jax.sharding import check_batch_divisible, check_experts_divisible, make_mesh
from moa_jax.train.loop import NonFiniteLossError, state_shardings
from moa_jax.train.step import init_state, make_optimizer, train_step
from tests.train_helpers import (ROOT, SyntheticSource, compile_cache, config_dict, finalized_steps,  # noqa: F401
                                 flat_np, init_trees, make_train_config, max_abs_diff, resume_setup, run_stage,
                                 standard_setup, tiny_cfg, tiny_moa, worker_env)


def restore_latest(workdir, tcfg, moa):
    """-> (TrainState, meta) of the latest checkpoint in workdir/checkpoints, on one device."""
    _, trainable = init_trees(tiny_cfg(), moa)
    mesh = make_mesh(MeshConfig(data=1, expert=1), jax.devices()[:1])
    abstract, _ = state_shardings(mesh, make_optimizer(tcfg, trainable), trainable)
    ckpt = StageCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore(abstract, config_dict(tiny_cfg(), moa, tcfg))
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    """The standard configuration trained on one device: (stage workdir, final trainable, loss history). The
    reference of the sharded and multi-process runs, and the stage directory of the checkpoint tests."""
    workdir = tmp_path_factory.mktemp("standard")
    tcfg, moa = standard_setup()
    final, history = run_stage(workdir, tcfg, moa, SyntheticSource())
    assert len(history) == tcfg.steps
    return workdir, final, [h["loss"] for h in history]


# ---------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL
# ---------------------------------------------------------------------------------------------------------------

def test_kill_and_resume_matches_uninterrupted_run(tmp_path, compile_cache):
    """A run SIGKILLed after its first checkpoints, resumed to the end, ends with the same experts and routers as
    an uninterrupted run (dropout on and 2 micro-batches per step: RNG and data position are restored too)."""
    steps = 4
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "tests._train_worker", str(killed_dir), str(steps), "0.5"],
                            cwd=ROOT, env=worker_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # A hung worker is killed (then the poll assertion fails); generous, so a slow or busy machine never trips it.
    watchdog = threading.Timer(900, proc.kill)
    watchdog.start()
    try:
        while not finalized_steps(killed_dir / "checkpoints"):
            assert proc.poll() is None, f"worker ended before its first checkpoint:\n{proc.stdout.read()}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, out
    assert "done" not in out and not (killed_dir / "adapters").exists(), "the worker finished before the kill"
    done = finalized_steps(killed_dir / "checkpoints")
    assert 1 <= max(done) < steps, done

    tcfg, moa, source = resume_setup(steps)
    resumed, history = run_stage(killed_dir, tcfg, moa, source)
    assert [h["step"] for h in history] == list(range(max(done) + 1, steps + 1))  # no step trained twice
    clean, _ = run_stage(clean_dir, tcfg, moa, source)
    _, initial = init_trees(tiny_cfg(), moa)
    assert max_abs_diff(clean, initial) > 1e-3  # the experts did move
    assert max_abs_diff(resumed, clean) < 1e-6
    saved, _ = load_adapters(str(killed_dir / "adapters"))
    assert max_abs_diff(saved, resumed) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: N independent trainings at once
# ---------------------------------------------------------------------------------------------------------------

def test_stage1_joint_training_equals_each_expert_trained_alone():
    """Stage 1 (label routing, per-domain loss normalisation, per-expert clipping): expert e of the joint run equals
    expert e trained alone on domain e's rows of the same batches, in the same order, with the same seed. "Alone":
    the other rows are padding (valid=0), so no other expert gets a gradient and the same compiled step is reused.

    Requirement: every batch holds rows of every domain (SyntheticSource: exactly B/N each). A truly separate
    training of expert e would never see a batch without domain e, while the joint run still advances e's Adam
    state on it (step count, moment decay, schedule), so the two would legitimately differ.
    """
    cfg, n = tiny_cfg(), 3
    moa = tiny_moa(num_experts=n)
    tcfg = make_train_config(stage="stage1", steps=3, learning_rate=1e-2, grad_clip=0.05)
    frozen, trainable = init_trees(cfg, moa)
    tx = make_optimizer(tcfg, trainable)
    step = jax.jit(functools.partial(train_step, model=MoATransformer(cfg, moa), tcfg=tcfg, tx=tx, num_domains=n))
    batches = [SyntheticSource(batch_size=2 * n, num_domains=n).global_batch(i) for i in range(tcfg.steps)]

    def train(keep_domain=None):
        state, norms = init_state(trainable, tx, tcfg.seed), []
        for b in batches:
            b = dict(b, valid=(b["domain"] == keep_domain).astype(np.int32) if keep_domain is not None else b["valid"])
            state, metrics = step(state, frozen, {k: v[None] for k, v in b.items()})             # (A=1, B, ...)
            norms.append(float(metrics["grad_norm"]))
        return traverse_util.flatten_dict(jax.device_get(state.trainable)), norms

    joint, _ = train()
    start = traverse_util.flatten_dict(trainable)
    for e in range(n):
        alone, norms = train(keep_domain=e)
        assert min(norms) > tcfg.grad_clip  # expert e's own gradient is clipped, so clipping jointly would differ
        for k, v in joint.items():
            if k[-1] in ("lora_a", "lora_b"):
                assert np.max(np.abs(v[:, e] - start[k][:, e])) > 1e-3, (k, e)  # it did train
                np.testing.assert_allclose(v[:, e], alone[k][:, e], atol=2e-5, rtol=0, err_msg=f"{k} expert {e}")
                others = [i for i in range(n) if i != e]
                np.testing.assert_array_equal(alone[k][:, others], start[k][:, others])


# ---------------------------------------------------------------------------------------------------------------
# Sharding on 8 forced CPU devices
# ---------------------------------------------------------------------------------------------------------------

def test_sharded_training_matches_one_device_and_splits_experts(tmp_path, monkeypatch, standard_run):
    """MeshConfig(data=4, expert=2) on 8 devices gives the loss trajectory and experts of a 1-device run, and the
    expert stacks and their Adam moments (mu, nu) are split along E (each device holds E/2 experts)."""
    assert len(jax.devices()) == 8, "conftest.py must force 8 CPU devices before jax is imported"
    tcfg, moa = standard_setup()
    captured = {}
    original_save = StageCheckpointer.save

    def save_and_capture(self, step, state, meta):  # the live training state handed to the checkpointer
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        captured[step] = [(jax.tree_util.keystr(path), leaf.sharding.spec, leaf.shape,
                           [(s.device, s.index, s.data.shape) for s in leaf.addressable_shards]) for path, leaf in flat]
        return original_save(self, step, state, meta)

    _, one, loss_one = standard_run
    monkeypatch.setattr(StageCheckpointer, "save", save_and_capture)
    eight, hist_eight = run_stage(tmp_path, tcfg, moa, SyntheticSource(), mesh_cfg=MeshConfig(4, 2),
                                  devices=jax.devices())
    np.testing.assert_allclose([h["loss"] for h in hist_eight], loss_one, atol=1e-5, rtol=0)
    assert max_abs_diff(eight, one) < 1e-5

    leaves = captured[tcfg.steps]
    stacks = [x for x in leaves if x[0].endswith(("['lora_a']", "['lora_b']"))]
    moments = {kind: [x for x in stacks if f".{kind}" in x[0]] for kind in ("mu", "nu")}
    params = [x for x in stacks if ".trainable" in x[0]]
    n_lora = 2 * len(moa.targets)
    assert len(params) == n_lora and len(moments["mu"]) == n_lora and len(moments["nu"]) == n_lora, \
        [x[0] for x in stacks]
    for path, spec, shape, shards in params + moments["mu"] + moments["nu"]:
        assert spec == P(None, "expert", None, None), (path, spec)
        assert len(shards) == 8
        half = moa.num_experts // 2
        assert all(s_shape == (shape[0], half) + tuple(shape[2:]) for _, _, s_shape in shards), (path, shards)
        starts = {idx[1].start or 0 for _, idx, _ in shards}
        assert starts == {0, half}, (path, starts)  # the two expert halves live on different devices


def test_bad_meshes_raise_config_errors():
    with pytest.raises(ConfigError, match=r"data=3 x expert=2 = 6 devices, but 8"):
        make_mesh(MeshConfig(data=3, expert=2))
    with pytest.raises(ConfigError, match=r"MeshConfig.expert=3 .* divide the 8"):
        make_mesh(MeshConfig(expert=3))
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    check_experts_divisible(mesh, 8)
    with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by the expert mesh size"):
        check_experts_divisible(mesh, 6)
    check_batch_divisible(mesh, 16)
    with pytest.raises(ConfigError, match=r"global batch size 12 must be divisible by the 8 devices"):
        check_batch_divisible(mesh, 12)


def test_train_stage_rejects_experts_not_divisible_by_expert_mesh(tmp_path):
    """The library entry point itself refuses E=3 on an expert axis of 2 (no silent replication, no XLA error)."""
    tcfg, _ = standard_setup()
    moa = tiny_moa(num_experts=3)
    with pytest.raises(ConfigError, match=r"num_experts=3 is not divisible"):
        run_stage(tmp_path, tcfg, moa, SyntheticSource(batch_size=6, num_domains=3), mesh_cfg=MeshConfig(4, 2),
                  devices=jax.devices())


def test_train_stage_rejects_batch_not_divisible_by_devices(tmp_path):
    tcfg, moa = standard_setup()
    with pytest.raises(ConfigError, match=r"global batch size 4 must be divisible by the 8 devices"):
        run_stage(tmp_path, tcfg, moa, SyntheticSource(batch_size=4), mesh_cfg=MeshConfig(4, 2),
                  devices=jax.devices())


# ---------------------------------------------------------------------------------------------------------------
# Two CPU processes (jax.distributed on localhost)
# ---------------------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, compile_cache, standard_run):
    """2 processes x 2 CPU devices on a (data=2, expert=2) mesh, each feeding its own half of every batch, train like
    one process on the whole batch: same losses and experts. Both processes exit 0 within the time limit."""
    coordinator, procs = f"127.0.0.1:{_free_port()}", []
    env = worker_env(compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    for pid in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests._dist_worker", coordinator, "2", str(pid), str(tmp_path / "run"),
             str(tmp_path / f"out{pid}.npz")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert '"devices": 4, "local_devices": 2' in out, out[-3000:]

    _, ref, ref_losses = standard_run
    ref_flat = flat_np(ref)
    for pid in range(2):
        got = dict(np.load(tmp_path / f"out{pid}.npz"))
        np.testing.assert_allclose(got.pop("losses"), ref_losses, atol=1e-5, rtol=0)
        assert got.keys() == ref_flat.keys()
        for k in ref_flat:
            np.testing.assert_allclose(got[k], ref_flat[k], atol=1e-5, rtol=0, err_msg=k)
    saved, _ = load_adapters(str(tmp_path / "run" / "adapters"))  # written once, by process 0
    assert max_abs_diff(saved, ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Compilation, learning, failure modes
# ---------------------------------------------------------------------------------------------------------------

class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def test_no_recompilation_when_the_domain_mix_changes(tmp_path):
    """Routing is data: batches of one domain only, of the other only, and mixed, run one compiled train_step."""
    tcfg, moa = standard_setup()
    mixes = [np.zeros(8), np.ones(8), np.arange(8) % 2, np.r_[np.ones(7), 0]]
    source = SyntheticSource(domain_mix=lambda i: mixes[i % len(mixes)])
    counter, jax_logger = _CompileCounter(), logging.getLogger("jax")
    jax_logger.addHandler(counter)
    try:
        with jax.log_compiles(True):
            _, history = run_stage(tmp_path, tcfg, moa, source)
    finally:
        jax_logger.removeHandler(counter)
    assert len(history) == tcfg.steps
    assert counter.names.count("jit(train_step)") == 1, counter.names


def test_tiny_model_overfits_a_tiny_dataset(tmp_path):
    """One batch of 8 sequences, seen 40 times: the response-token loss falls by a large factor."""
    moa = tiny_moa(rank=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    tcfg = make_train_config(steps=40, learning_rate=3e-2, log_every=1)
    _, history = run_stage(tmp_path, tcfg, moa, SyntheticSource(pool=1))
    first, last = history[0]["lm_loss"], history[-1]["lm_loss"]
    assert first > 3.0 and last < first / 8, (first, last)


def test_nan_batch_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A batch that makes the loss NaN (an out-of-range token id: the embedding lookup fills NaN) at step 3 ->
    NonFiniteLossError naming the last good checkpoint (step 2), which restores with finite parameters."""
    tcfg, moa = standard_setup(checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"up to step 3 .* last good checkpoint is step 2 "):
        run_stage(tmp_path, tcfg, moa, SyntheticSource(bad_from=2))
    assert finalized_steps(tmp_path / "checkpoints") == [1, 2]
    state, _ = restore_latest(tmp_path, tcfg, moa)
    assert int(state.step) == 2 and int(state.nonfinite) == 0
    assert all(np.all(np.isfinite(v)) for v in flat_np(jax.device_get(state.trainable)).values())
    assert not (tmp_path / "adapters").exists()


def test_overflowing_learning_rate_never_checkpoints_poisoned_parameters(tmp_path):
    """lr=1e39 overflows float32: the loss and gradient of step 1 are finite but the updated parameters are not.
    The update is skipped, NonFiniteLossError is raised and no checkpoint holding NaN/inf is written."""
    tcfg, moa = standard_setup(checkpoint_every=1, learning_rate=1e39)
    with pytest.raises(NonFiniteLossError, match=r"up to step 1 .* No checkpoint was written"):
        run_stage(tmp_path, tcfg, moa, SyntheticSource())
    assert finalized_steps(tmp_path / "checkpoints") == []
    assert not (tmp_path / "adapters").exists()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint / config compatibility and adapter artifacts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, change", [
    ("moa.num_experts", dict(num_experts=4)),
    ("moa.rank", dict(rank=2)),
    ("moa.targets", dict(targets=("q_proj", "k_proj"))),
    ("moa.alpha", dict(alpha=3.0)),            # the same tree, but another LoRA scale
    ("moa.use_rslora", dict(use_rslora=True)),
], ids=["num_experts", "rank", "targets", "alpha", "use_rslora"])
def test_resume_with_changed_adapter_config_names_the_field(standard_run, field, change):
    workdir, _, _ = standard_run
    tcfg, moa = standard_setup()
    other = dataclasses.replace(moa, **change)
    with pytest.raises(CheckpointMismatchError, match=rf"checkpoint has {field}=.* current config has {field}="):
        run_stage(workdir, tcfg, other, SyntheticSource(num_domains=other.num_experts))


def test_resume_with_changed_base_model_names_the_field(standard_run):
    workdir, _, _ = standard_run
    tcfg, moa = standard_setup()
    config = config_dict(tiny_cfg(), moa, tcfg)
    config["model"]["source"] = "some/other-model"
    with pytest.raises(CheckpointMismatchError, match=r"model.source"):
        run_stage(workdir, tcfg, moa, SyntheticSource(), config=config)


def test_resume_of_a_finished_stage_trains_nothing(standard_run):
    workdir, final, _ = standard_run
    tcfg, moa = standard_setup()
    lines = (workdir / "metrics.jsonl").read_text().count("\n")
    again, history = run_stage(workdir, tcfg, moa, SyntheticSource())
    assert history == [] and max_abs_diff(again, final) == 0.0
    assert (workdir / "metrics.jsonl").read_text().count("\n") == lines == tcfg.steps


def test_adapter_artifact_round_trip(tmp_path, standard_run):
    _, final, _ = standard_run
    tcfg, moa = standard_setup()
    config = config_dict(tiny_cfg(), moa, tcfg)
    save_adapters(str(tmp_path / "adapters"), final, config)
    save_adapters(str(tmp_path / "adapters"), final, config)  # overwriting an artifact works
    loaded, saved_config = load_adapters(str(tmp_path / "adapters"), config)
    assert max_abs_diff(loaded, final) == 0.0
    assert {k: v.dtype for k, v in flat_np(loaded).items()} == {k: v.dtype for k, v in flat_np(final).items()}
    assert saved_config["moa"]["rank"] == moa.rank and tuple(saved_config["moa"]["targets"]) == moa.targets
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    wrong = config_dict(tiny_cfg(), tiny_moa(rank=8), tcfg)
    with pytest.raises(CheckpointMismatchError, match=r"moa.rank=4 .* moa.rank=8"):
        load_adapters(str(tmp_path / "adapters"), wrong)
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        load_adapters(str(tmp_path / "nothing"))


def test_adam_b2_sets_the_second_moment_decay():
    """TrainConfig.adam_b2 reaches AdamW: after one update with gradient g every second moment is (1 - b2) g^2
    (g small enough that the global-norm clip leaves it alone; frozen groups keep no moments)."""
    cfg, moa = tiny_cfg(), tiny_moa()
    _, trainable = init_trees(cfg, moa)
    grads = jax.tree_util.tree_map(lambda x: np.full(np.shape(x), 1e-4, np.float32), trainable)
    for b2 in (0.999, 0.95):
        tx = make_optimizer(make_train_config(stage="stage2", adam_b2=b2), trainable)
        _, state = tx.update(grads, tx.init(trainable), trainable)
        nus = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if ".nu" in jax.tree_util.keystr(path)]
        assert nus and all(np.allclose(nu, (1 - b2) * 1e-8, rtol=1e-5, atol=0) for nu in nus), b2
    with pytest.raises(ConfigError, match=r"TrainConfig.adam_b2 must be in \(0, 1\)"):
        make_train_config(adam_b2=1.0)
