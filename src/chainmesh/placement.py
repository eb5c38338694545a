"""Placement of pytrees on the mesh, and the chain-axis reshapes that name axes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from einops import rearrange
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chainmesh.mesh import CHAIN, SHARD


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Put a pytree on the mesh; each process builds only its own shards.

    NumPy leaves go through ``jax.make_array_from_callback`` (so a mesh that
    spans several processes works); other leaves (Python numbers keep their
    weak type, JAX arrays) through ``jax.device_put``.
    """

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jax.process_count() > 1:
            x = np.asarray(x)  # a process-local array: rebuild it globally
        if isinstance(x, np.ndarray):
            x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
            return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def shard_chains(tree: Any, mesh: Mesh) -> Any:
    """Place arrays with a leading chain axis, one block of chains per device.

    On a ``(shard, chain)`` mesh the blocks are replicated over the shard rows.
    """
    return place(tree, NamedSharding(mesh, P(CHAIN)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place data (model arguments) whole on every device of the mesh."""
    return place(tree, NamedSharding(mesh, P()))


def shard_data(tree: Any, mesh: Mesh) -> Any:
    """Place arrays with a leading data-shard axis, one block per mesh row."""
    return place(tree, NamedSharding(mesh, P(SHARD)))


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one NumPy array, gathered across processes if needed."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def device_blocks(x: np.ndarray, num_devices: int) -> np.ndarray:
    """Split a chain-major array into per-device blocks: ``(dev, c, ...)``."""
    return rearrange(x, "(dev c) ... -> dev c ...", dev=num_devices)


def flatten_chains(x: np.ndarray) -> np.ndarray:
    """NumPyro's flat layout: ``(chains, draws, ...) -> (chains * draws, ...)``."""
    return rearrange(x, "c d ... -> (c d) ...")


def from_main(blob: bytes | None) -> bytes:
    """Process 0's ``blob`` on every process (the others pass None)."""
    if jax.process_count() == 1:
        return blob
    from jax.experimental.multihost_utils import broadcast_one_to_all

    # Every process must pass arrays of the payload's shape: the length first.
    # Bytes, not float arrays: the broadcast sums with zeros, -0.0 + 0.0 = 0.0.
    source = jax.process_index() == 0
    size = divmod(len(blob), 2**30) if source else (0, 0)
    high, low = broadcast_one_to_all(np.array(size, np.int32))
    size = int(high) * 2**30 + int(low)
    buffer = np.frombuffer(blob, np.uint8) if source else np.zeros(size, np.uint8)
    return np.asarray(broadcast_one_to_all(buffer), np.uint8).tobytes()
