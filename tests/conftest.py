"""Shared pytest setup: 8 forced CPU devices (for sharding tests), one persistent XLA compilation cache per session,
tiny model / MoA configs and one smoke run per session (the experiment runner end to end; its tests only read the
work directory).

XLA_FLAGS must be set before jax is first imported, so it comes first in this file.
"""
import os

FORCE_8_DEVICES = "--xla_force_host_platform_device_count=8"
if FORCE_8_DEVICES not in os.environ.get("XLA_FLAGS", "").split():   # pytest-xdist workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FORCE_8_DEVICES).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from moa_jax.config import ModelConfig, MoAConfig  # noqa: E402

jax.config.update("jax_enable_x64", False)


def _shared_folder(tmp_path_factory):
    """The temporary folder every pytest-xdist worker of this session sees (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# Every entry is kept (no minimum compile time or size); a size limit turns on the cache's file lock, which the
# workers writing into one folder need.
SESSION_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                         "jax_persistent_cache_min_entry_size_bytes": 0,
                         "jax_compilation_cache_max_size": 8 << 30}


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session, shared by the workers and by the subprocesses tests start
    (through the environment): the many tests that run the same programs (the smoke pipeline and the runs that
    reuse it, the CLI, the docs' examples) compile each program once. A hit returns the executable XLA built for
    the same program, flags and jax version, so no result changes; jax still logs each one as a compile, so the
    tests that count compiles count the same."""
    from jax._src import compilation_cache
    path = str(_shared_folder(tmp_path_factory) / "jax_cache")
    options = {**SESSION_CACHE_OPTIONS, "jax_compilation_cache_dir": path}
    old = {k: getattr(jax.config, k) for k in options}
    env = {f"JAX_{k[4:].upper()}": str(v) for k, v in options.items()}
    old_env = {k: os.environ.get(k) for k in env}
    for k, v in options.items():
        jax.config.update(k, v)
    os.environ.update(env)
    compilation_cache.reset_cache()
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    compilation_cache.reset_cache()


def make_tiny_cfg(**changes) -> ModelConfig:
    """D=32, F=64, L=2, GQA with H=4 query heads over K=2 kv heads (Dh=8), V=64."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64, name="tiny")
    return ModelConfig(**{**base, **changes})


def make_tiny_moa(**changes) -> MoAConfig:
    """E=3 experts of rank 4 on all seven projections, no dropout (deterministic tests)."""
    base = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0)
    return MoAConfig(**{**base, **changes})


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """Untied head, no attention bias."""
    return make_tiny_cfg()


@pytest.fixture(params=["untied", "tied_bias"])
def tiny_cfg_variant(request) -> ModelConfig:
    """Both head variants: untied without bias, and tied embeddings with q/k/v bias (Qwen2/SmolLM2-like)."""
    if request.param == "untied":
        return make_tiny_cfg()
    return make_tiny_cfg(tie_word_embeddings=True, attention_bias=True)


@pytest.fixture
def tiny_moa() -> MoAConfig:
    return make_tiny_moa()


SMOKE_VARIANT = "eta0:stage2.eta=0;methods=moa_router"


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The smoke experiment through `python -m experiments.run`'s entry point, with 1 test item per domain and one
    ablation variant (eta = 0), without progress bars. -> (workdir, console output: the moa_jax log lines, then what
    it printed). Read only.

    Run once per test session, also under pytest-xdist: the first worker to ask runs it under a lock in the folder
    all workers share, the others wait and read it."""
    import contextlib
    import fcntl
    import io
    import logging

    from experiments import run
    shared = _shared_folder(tmp_path_factory)
    workdir, console = shared / "smoke", shared / "smoke.console.txt"
    with open(shared / "smoke.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not console.exists():
            out = io.StringIO()
            # the log lines a console shows (run.main's own logging set-up is a no-op under pytest's handlers)
            handler, moa_log = logging.StreamHandler(out), logging.getLogger("moa_jax")
            level = moa_log.level
            moa_log.addHandler(handler)
            moa_log.setLevel(logging.INFO)
            try:
                with contextlib.redirect_stdout(out):
                    rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set",
                                   "eval.items_per_domain=1", "--set", f"variants={SMOKE_VARIANT}"])
            finally:
                moa_log.removeHandler(handler)
                moa_log.setLevel(level)
            assert rc == 0, out.getvalue()[-4000:]
            console.write_text(out.getvalue())
    return str(workdir), console.read_text()
