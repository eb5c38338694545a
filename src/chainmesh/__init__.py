"""chainmesh: many NumPyro NUTS chains as one SPMD program over a JAX device mesh."""

from chainmesh import backends, cmc, combine, diagnostics, distributed
from chainmesh._version import __version__
from chainmesh.batch import BatchResult, BatchSampler
from chainmesh.cache import CACHE
from chainmesh.chain_transform import chain_method
from chainmesh.config import SamplerConfig
from chainmesh.mesh import CHAIN, ChainPlan, plan_chains, set_host_device_count
from chainmesh.persistent import clear_disk_cache, disk_cache_size
from chainmesh.result import Result
from chainmesh.sampler import Sampler, sample


def clear_cache() -> None:
    """Drop every compiled program held in memory (the disk cache stays)."""
    CACHE.clear()


__all__ = [
    "CHAIN",
    "BatchResult",
    "BatchSampler",
    "ChainPlan",
    "Result",
    "Sampler",
    "SamplerConfig",
    "__version__",
    "backends",
    "chain_method",
    "clear_cache",
    "clear_disk_cache",
    "cmc",
    "combine",
    "diagnostics",
    "disk_cache_size",
    "distributed",
    "plan_chains",
    "sample",
    "set_host_device_count",
]
