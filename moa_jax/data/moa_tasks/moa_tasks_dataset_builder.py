"""tfds builder of the embedded dataset: ten reasoning-gym domains (see `moa_jax.data.tasks`), text only; the
`wide` config holds the 52 domains of the wide registry (tasks.WIDE_DOMAINS) instead.

Written as array_record so it is built and read WITHOUT TensorFlow (`builder.as_data_source()`; `tfds.load`
would need TensorFlow). Built on first use into `default_data_dir()` (`$MOA_JAX_DATA_DIR` or
`~/.cache/moa_jax/tfds`); later uses only read it.

Splits: per domain, the generator's de-duplicated prompt stream is cut in the order test, validation, train.
Prompts are therefore distinct within a domain across all splits (disjoint splits), and the test set of a smaller
config is a prefix of the larger one's (the `tiny` test items are the first 16 `default` test items).

Features per example: domain (ClassLabel over the config's domain names), prompt, answer, metadata (JSON of the reasoning-gym
entry metadata, for its verifier), index (position within its domain and split: N per domain).

Versioning: the data is a pure function of the task registry and the pinned reasoning_gym version. Any change to
either must bump VERSION and REGISTRY_FINGERPRINT together (a test fails otherwise); the `wide` config has its own
pair, WIDE_VERSION and WIDE_FINGERPRINT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from moa_jax.data import tasks

log = logging.getLogger("moa_jax.data")

# sha256 of the registry (see registry_fingerprint) that VERSION was built from.
REGISTRY_FINGERPRINT = "c2f38af269096cf2"
# The same for the wide registry (tasks.WIDE_DOMAINS) and WIDE_VERSION, the version of the `wide` config.
WIDE_FINGERPRINT = "48f01e2f624522b7"
WIDE_VERSION = "1.0.0"


@dataclasses.dataclass
class MoaTasksConfig(tfds.core.BuilderConfig):
    """Examples per domain in each split; `wide`: the 52 domains of tasks.WIDE_DOMAINS instead of the ten."""
    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 200
    wide: bool = False

    @property
    def domain_names(self) -> tuple:
        return tasks.WIDE_DOMAIN_NAMES if self.wide else tasks.DOMAIN_NAMES


BUILDER_CONFIGS = (
    MoaTasksConfig(name="default", description="2000/200/200 per domain", n_train=2000, n_validation=200,
                   n_test=200),
    MoaTasksConfig(name="small", description="500/100/100 per domain", n_train=500, n_validation=100, n_test=100),
    MoaTasksConfig(name="tiny", description="64/16/16 per domain (tests)", n_train=64, n_validation=16, n_test=16),
    MoaTasksConfig(name="wide", description="52 domains, 160/20/20 per domain", n_train=160, n_validation=20,
                   n_test=20, wide=True, version=WIDE_VERSION),
)


def registry_fingerprint(domains=None) -> str:
    """Identifies the generated content: domain names, generators, seeds, options and reasoning_gym version
    (`domains`: default tasks.DOMAINS; the `wide` config's is tasks.WIDE_DOMAINS)."""
    import reasoning_gym
    spec = [(d.name, d.generator, d.seed, sorted((k, repr(v)) for k, v in d.options.items()))
            for d in (tasks.DOMAINS if domains is None else domains)]
    blob = json.dumps([spec, getattr(reasoning_gym, "__version__", "0.1.25")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MoaTasks(tfds.core.GeneratorBasedBuilder):
    """Ten reasoning-gym domains for Mixture-of-LoRAs multitask tuning (one expert per domain)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Ten domains, small generator configs, test/validation/train cut in that order."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"moa_jax embedded reasoning-gym domains; registry {registry_fingerprint()}",
            features=tfds.features.FeaturesDict({
                "domain": tfds.features.ClassLabel(names=list(self.builder_config.domain_names)),
                "prompt": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "metadata": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=None,
            homepage="https://github.com/open-thought/reasoning-gym",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: everything is generated
        cfg = self.builder_config
        sizes = {"test": cfg.n_test, "validation": cfg.n_validation, "train": cfg.n_train}
        # One pass over each domain's stream, cut into splits (order matters: test first, see module docstring).
        per_split = {s: [] for s in sizes}
        for name in cfg.domain_names:
            stream = tasks.generate(name, sum(sizes.values()))
            for split, n in sizes.items():
                for i in range(n):
                    per_split[split].append((i, next(stream)))
        return {split: self._generate_examples(rows) for split, rows in per_split.items()}

    def _generate_examples(self, rows):
        for i, ex in rows:
            yield f"{ex['domain']}/{i}", {"domain": ex["domain"], "prompt": ex["prompt"], "answer": ex["answer"],
                                          "metadata": ex["metadata"], "index": i}


def default_data_dir() -> str:
    return os.environ.get("MOA_JAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "moa_jax", "tfds")


@contextlib.contextmanager
def _file_lock(path: str):
    """Serialises builds in one data dir (several processes of one job may start at once)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(config: str = "default", data_dir: str | None = None) -> MoaTasks:
    """Returns the builder of `config`, building it into `data_dir` first if it is not there yet."""
    names = [c.name for c in BUILDER_CONFIGS]
    if config not in names:
        raise tasks.DataError(f"unknown moa_tasks builder config {config!r}; valid: {names}")
    data_dir = data_dir or default_data_dir()
    builder = MoaTasks(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        try:
            with _file_lock(os.path.join(data_dir, "moa_tasks.lock")):
                builder = MoaTasks(config=config, data_dir=data_dir, file_format="array_record")
                if not builder.is_prepared():
                    start = time.time()
                    with _quiet_tfds():
                        builder.download_and_prepare()
                    log.info("built moa_tasks/%s into %s in %.1f s", config, builder.data_dir, time.time() - start)
        except OSError as e:
            if e.errno not in _NOT_WRITABLE:
                raise
            # the default folder is under $HOME, which a container or a CI job may mount read-only
            raise tasks.DataError(f"cannot build the embedded dataset into {data_dir} ({e.strerror}: "
                                  f"{e.filename}); set --set data.data_dir=DIR (or MOA_JAX_DATA_DIR) to a writable "
                                  f"folder") from None
    return builder


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _quiet_tfds():
    """tfds prints per-split progress bars; we log one line instead (see `prepare`)."""
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(True)
