"""Transition kernels: pairs of pure per-chain functions ``init`` and ``step``.

A kernel's state is a NamedTuple pytree, so it passes through ``jit``,
``vmap`` and ``shard_map`` untouched; the programs in ``chainmesh.program``
run a kernel over a device's block of chains.

- ``nuts``: NumPyro's NUTS with its windowed adaptation, per chain.
- ``chees``: ChEES-HMC over a block of chains, its adaptation pooled over
  the mesh (``ensemble``: pooled statistics; ``hmc``: one fixed-length HMC
  transition). Not yet a ``Sampler`` option (``docs/kernels.md``).
"""

from chainmesh.kernels.nuts import EXTRA_FIELDS, NUTSKernel, build_nuts, extra_fields

__all__ = ["EXTRA_FIELDS", "NUTSKernel", "build_nuts", "extra_fields"]
