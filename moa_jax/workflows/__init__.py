"""Workflows: the jobs `python -m experiments.run` dispatches to, side by side, each owning its config section and
its report section.

    two_stage   stage 1 -> stage 2 -> baselines -> ablation variants -> evaluation   (two_stage.py)
    add_domain  grow a finished run by new domains (new experts + a router re-fit)    (add_domain.py)
    capacity    MoA vs one LoRA at small ranks on the same budget                      (capacity.py)

What they share (the experiment's context, training a stage, reuse_from, a stage's router fit) is context.py.

A `Job` is a workflow, its ExperimentConfig and its section (moa_jax/workflows/sections.py). A section is set with
`--set <workflow>.<field>=VALUE`; such a key on a preset of another workflow selects that workflow where it can
start from any experiment (`--set capacity.rank=2` turns any preset into its capacity study). Every workflow
records itself and the stage of its final model in <workdir>/config.json, so `moa_jax.load_run(workdir)` loads
that model by default (stage2; add_domain: refit).
Importing this module imports no jax. No arrays here (no shape glossary).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from moa_jax.config import ConfigError, ExperimentConfig
from moa_jax.overrides import apply_overrides
from moa_jax.workflows.sections import AddDomainConfig, CapacityConfig

WORKFLOWS = ("two_stage", "add_domain", "capacity")
SECTIONS = {"add_domain": AddDomainConfig, "capacity": CapacityConfig}
# Workflows that can start from any preset's experiment when one of their section keys is set.
FROM_ANY_PRESET = ("capacity",)


@dataclasses.dataclass(frozen=True)
class Job:
    """What one command runs. `exp`: the experiment (add_domain: the base run's, with `overrides` applied later);
    `section`: the workflow's own config (None for two_stage); `overrides`: the `--set` assignments on `exp`."""
    workflow: str
    exp: ExperimentConfig
    section: Optional[Any] = None
    overrides: tuple = ()

    def __post_init__(self):
        if self.workflow not in WORKFLOWS:
            raise ConfigError(f"workflow {self.workflow!r} is not one of {WORKFLOWS}")
        want = SECTIONS.get(self.workflow)
        if want is not None and not isinstance(self.section, want):
            raise ConfigError(f"workflow {self.workflow!r} needs a {want.__name__} section")


def resolve_job(preset: Job | ExperimentConfig, assignments: Sequence[str]) -> Job:
    """A preset (an ExperimentConfig = a two_stage job, or a Job) with the command line's `--set` assignments: the
    `<workflow>.<field>` ones go to that workflow's section, the others to the experiment."""
    job = preset if isinstance(preset, Job) else Job("two_stage", preset)
    by_section: dict[str, list[str]] = {}
    rest = []
    for a in assignments:
        head = a.split("=", 1)[0].strip().split(".", 1)[0]
        (by_section.setdefault(head, []) if head in SECTIONS else rest).append(
            a.split(".", 1)[1] if head in SECTIONS else a)
    for name, own in by_section.items():
        if name != job.workflow:
            if name not in FROM_ANY_PRESET or job.workflow != "two_stage":
                raise ConfigError(f"--set {name}.*: those keys belong to the {name} workflow "
                                  f"(python -m experiments.run --exp={name} ...), not to this {job.workflow} preset")
            job = Job(name, job.exp, SECTIONS[name]())
        try:
            section = apply_overrides(job.section, own)
        except ConfigError as e:   # name the key as the user wrote it
            raise ConfigError(str(e).replace("--set ", f"--set {name}.", 1)) from None
        job = dataclasses.replace(job, section=section)
    if job.workflow == "add_domain":   # applied on top of the base run's config once it is read
        return dataclasses.replace(job, overrides=tuple(rest))
    return dataclasses.replace(job, exp=apply_overrides(job.exp, rest), overrides=tuple(rest))


def run_job(job: Job, workdir: str, progress: bool = True) -> dict:
    """Run the job's workflow in `workdir` (it writes its report there) and return its results. The work directory
    is locked for the run (moa_jax/run_lock.py): a second run on it is refused with one error line."""
    import jax
    from moa_jax.run_lock import run_lock
    with run_lock(workdir, enabled=jax.process_index() == 0):
        return _dispatch(job, workdir, progress)


def _dispatch(job: Job, workdir: str, progress: bool) -> dict:
    if job.workflow == "add_domain":
        from moa_jax.workflows.add_domain import run_add_domain
        return run_add_domain(job.section, workdir, job.overrides, progress=progress)
    if job.workflow == "capacity":
        from moa_jax.workflows.capacity import run_capacity
        return run_capacity(job.exp, job.section, workdir, progress=progress)
    from moa_jax.workflows.two_stage import run_experiment
    return run_experiment(job.exp, workdir, progress=progress)
