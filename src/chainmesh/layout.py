"""Chain-axis arrays: placement on the mesh and the reshapes that name axes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from einops import rearrange
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chainmesh.mesh import CHAIN, SHARD


def shard_chains(tree: Any, mesh: Mesh) -> Any:
    """Place arrays with a leading chain axis, one block of chains per device.

    On a ``(shard, chain)`` mesh the blocks are replicated over the shard rows.
    """
    return jax.device_put(tree, NamedSharding(mesh, P(CHAIN)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place data (model arguments) whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_data(tree: Any, mesh: Mesh) -> Any:
    """Place arrays with a leading data-shard axis, one block per mesh row."""
    return jax.device_put(tree, NamedSharding(mesh, P(SHARD)))


def signature(tree: Any) -> tuple:
    """Hashable (structure, shapes, dtypes, weak types) of a pytree of arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    avals = tuple(
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
        for x in leaves
    )
    return treedef, avals


def device_blocks(x: np.ndarray, num_devices: int) -> np.ndarray:
    """Split a chain-major array into per-device blocks: ``(dev, c, ...)``."""
    return rearrange(x, "(dev c) ... -> dev c ...", dev=num_devices)


def flatten_chains(x: np.ndarray) -> np.ndarray:
    """NumPyro's flat layout: ``(chains, draws, ...) -> (chains * draws, ...)``."""
    return rearrange(x, "c d ... -> (c d) ...")
