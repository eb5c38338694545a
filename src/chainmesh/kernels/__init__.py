"""Transition kernels: pure functions over chains (``base.Kernel``).

A kernel's state is a NamedTuple pytree, so it passes through ``jit``,
``vmap`` and ``shard_map`` untouched; the programs in ``chainmesh.program``
run a kernel over a device's block of chains.

- ``nuts``: NumPyro's NUTS with its windowed adaptation, per chain.
- ``async_nuts`` / ``async_tree``: the same NUTS, lane-asynchronous: each
  lane of a device's block advances its own tree one leapfrog step per
  iteration (``inner="async"``).
- ``pooled_nuts``: NUTS whose step size and mass matrix adapt from
  statistics pooled over every chain of the mesh (``adapt="ensemble"``).
- ``metric_nuts``: NUTS with a Fisher or low-rank metric (``metric=``),
  run on whitened coordinates; pooled or per chain.
- ``chees`` / ``chees_adapt`` / ``chees_chains``: ChEES-HMC over a block of chains, its
  adaptation pooled over the mesh (``kernel="chees"``; ``ensemble``: pooled
  statistics; ``hmc``: one fixed-length HMC transition).
- ``mams`` / ``mams_adapt`` / ``isokinetic``: MAMS, the Metropolis-adjusted
  microcanonical sampler, tuned from the whole mesh (``kernel="mams"``;
  ``chees_chains`` makes it a kernel as it does ChEES).
"""

from __future__ import annotations

from collections.abc import Callable

from chainmesh.config import BLOCK_METRICS, SamplerConfig
from chainmesh.kernels.base import EXTRA_FIELDS, Kernel
from chainmesh.kernels.nuts import build_nuts, extra_fields
from chainmesh.model import ModelInfo


def build_kernel(model: Callable, config: SamplerConfig, info: ModelInfo) -> Kernel:
    """The kernel ``config`` names (``kernel``, ``adapt``) for ``model``."""
    if config.kernel == "chees":
        from chainmesh.kernels.chees_chains import build_chees

        return build_chees(model, config, info)
    if config.kernel == "mams":
        from chainmesh.kernels.chees_chains import build_mams

        return build_mams(model, config, info)
    if config.metric in BLOCK_METRICS:
        from chainmesh.kernels.metric_nuts import build_metric_nuts

        return build_metric_nuts(model, config, info)
    if config.inner == "async":
        from chainmesh.kernels.async_nuts import build_async

        chunk = build_async(model, config, info).chunk
        return build_nuts(model, config, info)._replace(chunk=chunk)
    if config.adapt == "ensemble":
        from chainmesh.kernels.pooled_nuts import build_pooled_nuts

        return build_pooled_nuts(model, config, info)
    return build_nuts(model, config, info)


__all__ = ["EXTRA_FIELDS", "Kernel", "build_kernel", "build_nuts", "extra_fields"]
