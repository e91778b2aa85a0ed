"""The config sections of the workflows that need more than an ExperimentConfig. Each section belongs to one
workflow (moa_jax/workflows/__init__.py) and is set with `--set <workflow>.<field>=VALUE`; importing this module
imports no jax, so the experiment registry and `--list` stay fast. No arrays here (no shape glossary).
"""
from __future__ import annotations

from dataclasses import dataclass

from moa_jax.errors import require as _check


@dataclass(frozen=True)
class AddDomainConfig:
    """add_domain (moa_jax/workflows/add_domain.py): grow a finished run by new domains.

    base_run        the --workdir of the finished run to extend
    new_domains     specs of the domains to add (moa_jax/data/new_domains.py): a reasoning-gym generator or
                    jsonl:PATH, optionally NAME=SPEC
    new_share       the new domains' share of every router re-fit batch (split over them by data.mixing); the old
                    domains get the rest
    refit_routers   'new': only the new domains' router outputs train in the re-fit (the old ones stay
                    bit-identical); 'all': every output
    router_prompts  with moa.route_on='probe', the routers' new outputs are then fitted to convergence on this many
                    cached training prompts per domain (moa_jax/train/router_fit.py); 0 = no such fit
    """
    base_run: str = ""
    new_domains: tuple = ()
    new_share: float = 0.5
    refit_routers: str = "new"
    router_prompts: int = 128

    def __post_init__(self):
        object.__setattr__(self, "new_domains", tuple(self.new_domains))
        _check(self.refit_routers in ("new", "all"), f"add_domain.refit_routers={self.refit_routers!r}: 'new' (only "
               f"the new domains' router outputs train in the re-fit) or 'all'")
        _check(isinstance(self.new_share, (int, float)) and 0.0 < self.new_share < 1.0,
               f"add_domain.new_share={self.new_share!r}: the new domains' share of each re-fit batch must be a "
               f"number in (0, 1), e.g. --set add_domain.new_share=0.5")
        _check(self.router_prompts >= 0, f"add_domain.router_prompts={self.router_prompts}: cached prompts per "
               f"domain for the router fit must be >= 0 (0 = no fit)")


@dataclass(frozen=True)
class CapacityConfig:
    """capacity (moa_jax/workflows/capacity.py): MoA and the mixed LoRA at the small rank `rank`, the mixed LoRA at
    num_experts x `rank` (parameter-matched) and MoA at moa.rank, on the same data, budget and test items."""
    rank: int = 2

    def __post_init__(self):
        _check(self.rank >= 1, f"capacity.rank={self.rank}: the small rank of the capacity study must be >= 1")
