"""The training loop for one stage: shardings, the jitted step, resume, logging and checkpoints.

    state = restore(workdir) or init(trainable)          # resume > given init (stage-1 experts / fresh)
    for step in range(state.step, steps):
        batch = source.batch(...)  -> global arrays         # each process feeds its own rows
        state, metrics = train_step(state, frozen, batch)   # jitted once, donated, explicit shardings
        validate on validation steps                        # fixed validation batches; best adapters kept
        log on log steps; checkpoint on checkpoint steps     # host reads device values only there
                                                            # (metrics.jsonl, TensorBoard, one console line)

Faults: restore skips a damaged checkpoint (checkpoint.py: digests, finiteness); a failed background save stops
the run at the next step (`check_saves`); a NaN/inf loss in the first updates after a resume blames the checkpoint
resumed from (ResumedNonFiniteError, a user error), a later one stops the run naming the last good checkpoint.

A `BatchSource` returns host-local rows for a global micro-batch index, as a pure function of that index, so a
resumed run replays exactly the batches an uninterrupted run would have seen.

Shape glossary: A micro-batches per update, B batch rows, T tokens.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moa_jax.errors import UserError
from moa_jax.train.checkpoint import StageCheckpointer, save_adapters
from moa_jax.config import TrainConfig
from moa_jax.train.metrics_log import MetricsLogger, log_line, progress_fields, summarize
from moa_jax.nn.model import MoATransformer
from moa_jax.data.targets import gather_targets
from moa_jax.sharding import (check_batch_divisible, check_experts_divisible, gather_to_host, micro_batch_sharding,
                              param_shardings, replicated, tree_leaf_sharding)
from moa_jax.train.step import TrainState, init_state, logged_learning_rates, make_optimizer, train_step
from moa_jax.train.validation import Validator, validation_line

log = logging.getLogger("moa_jax")
BATCH_KEYS = ("tokens", "loss_mask", "prompt_mask", "attention_mask", "domain", "valid")
PACKED_KEYS = ("segment_ids", "segment_valid")   # packed rows only (moa_jax/data/packing.py)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left intact."""


class ResumedNonFiniteError(UserError, NonFiniteLossError):
    """A NaN/inf loss in the first updates after a resume: the checkpoint resumed from is the likely cause."""


class BatchSource(Protocol):
    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Host-local rows of global micro-batch `index`: tokens/masks [B_local, T], domain [B_local]."""


def _stack_micro(source: BatchSource, step: int, accum: int, compact_targets: bool = True) -> dict[str, np.ndarray]:
    micro = [source.batch(step * accum + a) for a in range(accum)]
    for m in micro:
        m.setdefault("valid", np.ones(m["domain"].shape, np.int32))
    keys = BATCH_KEYS + tuple(k for k in PACKED_KEYS if k in micro[0])
    out = {k: np.stack([np.asarray(m[k]) for m in micro]) for k in keys}                # (A, B_local, ...)
    if compact_targets:
        need = int(out["loss_mask"][..., 1:].sum(-1).max(initial=0))
        if jax.process_count() > 1:  # every host must pick the same K
            need = int(np.max(multihost_utils.process_allgather(np.asarray(need))))
        out["target_pos"], out["target_tokens"], out["target_weight"] = gather_targets(
            out["tokens"], out["loss_mask"], at_least=need)
    return out


def _put_micro(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """[A, B_local, ...] host rows -> global [A, B, ...] arrays with B over every device."""
    check_batch_divisible(mesh, local["domain"].shape[1] * jax.process_count())
    return {k: jax.make_array_from_process_local_data(micro_batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def state_shardings(mesh, tx: optax.GradientTransformation, trainable: Any) -> tuple[TrainState, Any]:
    """-> (abstract TrainState with shardings attached, TrainState of shardings)."""
    t_shard = param_shardings(mesh, trainable)
    abstract = jax.eval_shape(functools.partial(init_state, tx=tx, seed=0), trainable)
    # Optimiser moments nest the param tree inside optax's state: shard each leaf by its own path and shape.
    opt_shard = jax.tree_util.tree_map_with_path(
        lambda path, leaf: tree_leaf_sharding(mesh, path, leaf), abstract.opt_state)
    shards = TrainState(step=replicated(mesh), trainable=t_shard, opt_state=opt_shard, rng=replicated(mesh),
                        nonfinite=replicated(mesh))
    with_sh = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                     abstract, shards)
    return with_sh, shards


def jit_train_step(*, model: MoATransformer, tcfg: TrainConfig, tx: optax.GradientTransformation, num_domains: int,
                   mesh, state_shards: TrainState, frozen_shardings: Any):
    """The jitted `train_step` of a stage (state donated, explicit shardings); benchmarks.memory compiles this
    same function against abstract inputs."""
    return jax.jit(functools.partial(train_step, model=model, tcfg=tcfg, tx=tx, num_domains=num_domains),
                   in_shardings=(state_shards, frozen_shardings, None), out_shardings=(state_shards, replicated(mesh)),
                   donate_argnums=(0,))


def train_stage(*, model: MoATransformer, tcfg: TrainConfig, mesh, frozen: Any, trainable: Any,
                source: BatchSource, workdir: str, config: dict, domain_names: Sequence[str],
                frozen_shardings: Any = None, progress: bool = True, desc: str = "train",
                on_log: Optional[Callable[[int, dict], None]] = None,
                tx: Optional[optax.GradientTransformation] = None,
                validation: Optional[BatchSource] = None) -> tuple[Any, list[dict]]:
    """Train one stage in `workdir` (resuming if it holds checkpoints). -> (final trainable tree, log history).

    frozen: the base weights, already placed on the mesh. trainable: the initial experts/routers (host or device).
    tx: the optimiser (default make_optimizer(tcfg, trainable); add_domain wraps it to freeze the old experts).
    validation: the validation batches (moa_jax/data/pipeline.py ValidationBatches) that tcfg.eval_every > 0 runs
    on (moa_jax/train/validation.py); their rows join the log (`eval/` keys) and on_log.
    """
    if model.moa is not None:
        check_experts_divisible(mesh, model.moa.num_experts)
    os.makedirs(workdir, exist_ok=True)
    tx = make_optimizer(tcfg, trainable) if tx is None else tx
    abstract, shards = state_shardings(mesh, tx, trainable)
    if frozen_shardings is None:
        frozen_shardings = param_shardings(mesh, frozen)
    ckpt = StageCheckpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    resumed_from = None   # the checkpoint resumed from, until the first finite-state check after it passes
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(abstract, config)   # the newest intact step (broken newer ones are reported)
        start = int(jax.device_get(state.step))
        resumed_from = os.path.join(ckpt.directory, str(start))
        log.info("resuming %s from step %d of %d (checkpoint %s)", desc, start, tcfg.steps, resumed_from)
    else:
        trainable = jax.device_put(trainable, shards.trainable)
        state = jax.jit(functools.partial(init_state, tx=tx, seed=tcfg.seed), out_shardings=shards)(trainable)
        start = 0

    step_fn = jit_train_step(model=model, tcfg=tcfg, tx=tx, num_domains=len(domain_names), mesh=mesh,
                             state_shards=shards, frozen_shardings=frozen_shardings)
    is_main = jax.process_index() == 0
    validator = None
    if tcfg.eval_every and validation is not None:
        validator = Validator(model=model, tcfg=tcfg, mesh=mesh, trainable_shardings=shards.trainable,
                              batches=_put_micro(mesh, _stack_micro(validation, 0, tcfg.eval_batches)),
                              frozen_shardings=frozen_shardings, domain_names=domain_names, stage_dir=workdir,
                              config=config, resume_step=start, is_main=is_main)
    elif tcfg.eval_every:
        log.info("%s: eval_every=%d but no validation batches were given: no validation", desc, tcfg.eval_every)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=start)   # drops rows logged past `start`
    history: list[dict] = []
    acc, count = None, 0
    show_bar = progress and is_main
    bar = tqdm(total=tcfg.steps, initial=start, desc=desc, disable=not show_bar, dynamic_ncols=True)
    # one log line per logged row, bar or not; with the bar, the lines go above it (it stays the console's last line)
    with logging_redirect_tqdm(tqdm_class=tqdm) if show_bar else contextlib.nullcontext():
        logger.start_clock()
        for step in range(start, tcfg.steps):
            batch = _put_micro(mesh, _stack_micro(source, step, tcfg.grad_accum))
            state, metrics = step_fn(state, frozen, batch)
            ckpt.check_saves()   # a failed background save stops the run here, not at the next checkpoint
            acc = metrics if acc is None else jax.tree_util.tree_map(jnp.add, acc, metrics)
            count += 1
            done = step + 1
            bar.update(1)
            val_row = {}
            if validator is not None and validator.due(done):
                with logger.clock_paused():   # the throughput counts training only
                    val_row = validator(state.trainable, frozen, done)
            row = None
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                _check_finite(state, ckpt, done, resumed_from)
                resumed_from = None
                row = logger.log(done, {**summarize(acc, count, domain_names), **logged_learning_rates(tcfg, done),
                                        **val_row})
                bar.set_postfix(progress_fields(row), refresh=False)
                if is_main:
                    log.info("%s", log_line(desc, done, tcfg.steps, row, count))
                acc, count = None, 0
            elif val_row:   # a validation step between log steps: a row of its own
                row = logger.log(done, dict(val_row))
            if row is not None:
                history.append({"step": done, **row})
                if val_row and is_main:
                    log.info("%s", validation_line(desc, done, tcfg.steps, val_row, validator.best["step"]))
                if on_log is not None:
                    on_log(done, row)
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                _check_finite(state, ckpt, done, resumed_from)
                resumed_from = None
                ckpt.save(done, state, {"config": config})
    bar.close()
    ckpt.close()
    logger.close()
    final = gather_to_host(state.trainable)
    if is_main:
        save_adapters(os.path.join(workdir, "adapters"), final, config)
    return final, history


def _check_finite(state: TrainState, ckpt: StageCheckpointer, step: int, resumed_from: Optional[str]) -> None:
    bad = int(jax.device_get(state.nonfinite))
    if bad and resumed_from is not None:
        # Restore checks digests and finiteness, so this is finite garbage or data that diverges at once; either
        # way the checkpoint, not the learning rate, is the first suspect.
        raise ResumedNonFiniteError(
            f"{bad} update(s) right after resuming from checkpoint {resumed_from} (up to step {step}) had a NaN/inf "
            f"loss, gradient or updated parameter; that checkpoint may be damaged: delete {resumed_from} and rerun "
            f"the same command to resume from the step before it (or delete {ckpt.directory} to train this stage "
            f"from the start)")
    if bad:
        ckpt.wait()
        last = ckpt.latest_step()
        where = (f"The last good checkpoint is step {last} in {ckpt.directory}." if last is not None
                 else f"No checkpoint was written to {ckpt.directory}.")
        raise NonFiniteLossError(
            f"{bad} update(s) up to step {step} had a NaN/inf loss, gradient or updated parameter (those updates "
            f"were skipped); stopping. {where} Lower the learning rate or check the data.")
