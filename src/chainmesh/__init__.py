"""chainmesh: many NumPyro NUTS chains as one SPMD program over a JAX device mesh."""

from chainmesh import backends, cmc, combine, diagnostics
from chainmesh.chain_transform import chain_method
from chainmesh.config import SamplerConfig
from chainmesh.mesh import CHAIN, ChainPlan, plan_chains, set_host_device_count
from chainmesh.program import CACHE
from chainmesh.result import Result
from chainmesh.sampler import Sampler, sample

__version__ = "0.1.0"


def clear_cache() -> None:
    """Drop every compiled program held by chainmesh."""
    CACHE.clear()


__all__ = [
    "CHAIN",
    "ChainPlan",
    "Result",
    "Sampler",
    "backends",
    "SamplerConfig",
    "chain_method",
    "clear_cache",
    "cmc",
    "combine",
    "diagnostics",
    "plan_chains",
    "sample",
    "set_host_device_count",
]
