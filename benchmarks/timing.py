"""Timing machinery of the benchmark suite: interleaved rounds, robust statistics, compile timing and counting,
memory and machine facts.

Rules (BENCHMARKS.md): compile time is measured apart from steady state (`jit(f).lower(...).compile()`);
variants of one comparison run interleaved in ONE process (A B C A B C ...) for >= 10 rounds; every output is
`block_until_ready`-ed; the steady state must not compile anything (routing and domain mixes are data, never
shapes): `CompileCounter` counts XLA compilations through `jax_log_compiles` and the suite fails a case that
compiled during its timed rounds. Targets are ratios measured side by side; absolute times are only context.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import platform
import re
import statistics
import time
from typing import Any, Callable, Optional

import jax

_COMPILE_RE = re.compile(r"Finished XLA compilation of (\S+)")


class CompileCounter(logging.Handler):
    """Counts XLA compilations (by jitted function name) while installed; use as a context manager.

    `jax_log_compiles` makes jax log "Finished XLA compilation of jit(NAME) in ..." for every backend compile,
    including those of eager ops; `count(names)` filters by the jitted function names of interest.
    """

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.names: list[str] = []
        self._prev_flag = None
        self._logger = logging.getLogger("jax")
        self._prev_level = None

    def emit(self, record: logging.LogRecord) -> None:
        m = _COMPILE_RE.search(record.getMessage())
        if m:
            self.names.append(m.group(1))

    def __enter__(self) -> "CompileCounter":
        self._prev_flag = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        self._prev_level = self._logger.level
        self._logger.addHandler(self)
        # jax logs compiles at WARNING with the flag on; keep them off the console.
        self._prev_propagate = self._logger.propagate
        self._logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._prev_propagate
        jax.config.update("jax_log_compiles", self._prev_flag)

    def count(self, contains: Optional[str] = None) -> int:
        return sum(1 for n in self.names if contains is None or contains in n)


def compile_aot(fn: Callable, *args, static_argnames=(), donate_argnums=()) -> tuple[Any, Any, float]:
    """-> (jitted fn, compiled executable, compile seconds incl. tracing and lowering)."""
    jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return jitted, compiled, time.perf_counter() - t0


def block(tree: Any) -> Any:
    """block_until_ready on every array leaf (jax or not) of a tree."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


@dataclasses.dataclass
class Variant:
    """One timed program. `run()` executes one iteration and returns only after its outputs are ready."""
    name: str
    run: Callable[[], Any]
    compile_s: float = float("nan")
    info: dict = dataclasses.field(default_factory=dict)


def interleave(variants: list[Variant], rounds: int, warmup: int = 1) -> tuple[dict, dict]:
    """Runs A B C A B C ... for `rounds` rounds after `warmup` untimed rounds.

    -> (wall seconds, process CPU seconds): name -> one value per round. CPU time (all threads of this process)
    counts the work done and not the waiting for a core, so on a shared, oversubscribed machine its ratios are
    a useful cross-check of the wall-time ratios (which are the primary measure). The garbage collector is
    paused during the timed rounds (Python GC pauses are not the program's cost).
    """
    for _ in range(warmup):
        for v in variants:
            v.run()
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for v in variants:
                c0, t0 = time.process_time(), time.perf_counter()
                v.run()
                wall[v.name].append(time.perf_counter() - t0)
                cpu[v.name].append(time.process_time() - c0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return wall, cpu


def summarize(ts: list[float]) -> dict[str, float]:
    return {"min_s": min(ts), "median_s": statistics.median(ts), "mean_s": statistics.fmean(ts), "rounds": len(ts)}


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """time(num) / time(den) from the minima and from the medians (both reported; targets use the median).

    Also the median of the per-round ratios: each round's two samples ran seconds apart, so this one cancels
    most of the slow drift of a shared machine's load.
    """
    a, b = times[num], times[den]
    paired = statistics.median(x / y for x, y in zip(a, b))
    return {"min": min(a) / min(b), "median": statistics.median(a) / statistics.median(b), "paired": paired}


def memory_info(compiled) -> dict[str, Optional[int]]:
    """Bytes from `compiled.memory_analysis()` (None where the backend does not say)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        m = None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.removesuffix("_in_bytes"): (getattr(m, k, None) if m is not None else None) for k in keys}


def xla_flops(compiled) -> Optional[float]:
    """FLOPs XLA's cost model counts for one call (None where unavailable)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def rss_mb() -> dict[str, float]:
    """Current and peak resident set size of this process (Linux /proc), MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def device_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first device (GPU/TPU; None on CPU, where memory_stats() is None)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        stats = None
    return None if not stats else stats.get("peak_bytes_in_use")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load average, accelerator and library versions."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "peft", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = None
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "platform": platform.platform(), "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count(),
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS",
                                                   "XLA_PYTHON_CLIENT_PREALLOCATE")}}


def compare_main(argv, *, doc: str, configs: dict, build, baseline: str, rounds: int) -> int:
    """The command line of a side-by-side cost benchmark: `--config NAME --rounds N`; builds the variants
    (`build(configs[NAME]())` -> name -> Variant), times them interleaved and prints each one's median step time and
    its ratio to `baseline` (wall, the per-round paired wall ratio, process CPU time)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", choices=sorted(configs), default="cpu-tiny", help="benchmark shape")
    parser.add_argument("--rounds", type=int, default=rounds, help="timed interleaved rounds")
    args = parser.parse_args(argv)
    variants = build(configs[args.config]())
    wall, cpu = interleave(list(variants.values()), args.rounds, warmup=2)
    for k in variants:
        r_wall, r_cpu = ratio(wall, k, baseline), ratio(cpu, k, baseline)
        print(f"{k:14s} median {1000 * statistics.median(wall[k]):8.1f} ms   / {baseline}: wall "
              f"{r_wall['median']:.3f} (paired {r_wall['paired']:.3f}), cpu {r_cpu['median']:.3f}")
    return 0
