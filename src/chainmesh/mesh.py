"""Devices, the chain plan and the mesh: where each chain runs."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

CHAIN = "chain"
"""Name of the mesh axis that carries chains."""

_FLAG = "--xla_force_host_platform_device_count"


def set_host_device_count(n: int) -> None:
    """Split the host CPU into ``n`` JAX devices.

    Must run before JAX starts its backends (before the first JAX operation).
    Also writes ``XLA_FLAGS`` so that subprocesses inherit the setting.

    Args:
        n: Number of CPU devices.

    Raises:
        ValueError: ``n`` is not a positive int.
        RuntimeError: JAX's backends already started with another count.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"JAX already started with {have} CPU device(s), so it cannot switch "
            f"to {n}. Call chainmesh.set_host_device_count({n}) right after "
            "importing chainmesh, before any JAX operation, or start Python with "
            f"XLA_FLAGS={_FLAG}={n}"
        )
    flags = re.sub(rf"{_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_FLAG}={n}"])
    jax.config.update("jax_num_cpu_devices", int(n))


def resolve_devices(devices: Any = None) -> list[jax.Device]:
    """Turn the ``devices`` argument into a list of JAX devices.

    Args:
        devices: None for all ``jax.devices()``, an int ``n`` for the first
            ``n``, or a sequence of ``jax.Device``.

    Raises:
        ValueError: Too many or zero devices, or duplicates.
        TypeError: Anything else.
    """
    available = jax.devices()
    if devices is None:
        return list(available)
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices={devices} but {len(available)} device(s) exist; pass "
                f"1..{len(available)}, or split the CPU first with "
                f"chainmesh.set_host_device_count({max(int(devices), 1)})"
            )
        return list(available[: int(devices)])
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        devs = list(devices)
        if not devs:
            raise ValueError("devices is empty; pass None to use all devices")
        if not all(isinstance(d, jax.Device) for d in devs):
            raise TypeError("devices must hold jax.Device objects (jax.devices())")
        if len(set(devs)) != len(devs):
            raise ValueError("devices lists a device more than once")
        return devs
    raise TypeError(
        "devices must be None, an int or a list of jax.Device, got "
        f"{type(devices).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class ChainPlan:
    """How chains are spread over devices.

    Attributes:
        num_chains: Chains returned to the user.
        devices: Devices that run chains (a prefix of the ones offered).
        chains_per_device: Chains in each device's block.
        num_padding: Extra chains run to fill the last block, then dropped.
    """

    num_chains: int
    devices: tuple[jax.Device, ...]
    chains_per_device: int
    num_padding: int

    @property
    def num_devices(self) -> int:
        """Number of devices used."""
        return len(self.devices)

    @property
    def total_chains(self) -> int:
        """Chains that run, padding included."""
        return self.num_devices * self.chains_per_device

    def __str__(self) -> str:
        kind = self.devices[0].platform
        return (
            f"{self.num_chains} chains on {self.num_devices} {kind} device(s) x "
            f"{self.chains_per_device} chain(s) each, {self.num_padding} padding"
        )


def plan_chains(num_chains: int, devices: Sequence[jax.Device]) -> ChainPlan:
    """Apply the padding rule: ``per = ceil(C / D)``, ``d = ceil(C / per)``.

    10 chains on 4 devices -> 4 devices x 3 chains, 2 padding chains;
    2 chains on 8 devices -> 2 devices x 1 chain.
    """
    per = math.ceil(num_chains / len(devices))
    used = math.ceil(num_chains / per)
    return ChainPlan(num_chains, tuple(devices[:used]), per, used * per - num_chains)


def chain_mesh(plan: ChainPlan) -> Mesh:
    """A one-axis mesh over the plan's devices, axis named ``CHAIN``."""
    return Mesh(np.asarray(plan.devices, dtype=object), (CHAIN,))


SHARD = "shard"
"""Name of the mesh axis that carries data shards (consensus Monte Carlo)."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How data shards x chains are spread over a 2-D ``(shard, chain)`` mesh.

    Attributes:
        num_shards: Data shards returned to the user.
        shards_per_device: Shards in each row of the mesh.
        num_shard_padding: Extra shards (copies of shard 0) run, then dropped.
        chains: The chain plan of every shard (over one row of devices).
        devices: The mesh's devices, shaped ``(shard rows, chain columns)``.
    """

    num_shards: int
    shards_per_device: int
    num_shard_padding: int
    chains: ChainPlan
    devices: np.ndarray

    @property
    def total_shards(self) -> int:
        """Shards that run, padding included."""
        return self.num_shards + self.num_shard_padding

    def __str__(self) -> str:
        rows, cols = self.devices.shape
        return (
            f"{self.num_shards} shards x {self.chains.num_chains} chains on a "
            f"{rows} x {cols} (shard, chain) mesh: {self.shards_per_device} "
            f"shard(s) x {self.chains.chains_per_device} chain(s) per device, "
            f"{self.num_shard_padding} padding shard(s), "
            f"{self.chains.num_padding} padding chain(s) per shard"
        )


def plan_shards(
    num_shards: int, num_chains: int, devices: Sequence[jax.Device]
) -> ShardPlan:
    """Give shards the mesh rows and chains the columns, padding both.

    Rows come first: ``rows = ceil(K / ceil(K / D))`` shard rows (the padding
    rule on shards), then each row gets ``D // rows`` devices for its chains
    (the padding rule again). 4 shards x 4 chains on 8 devices -> a 4 x 2 mesh
    with 2 chains per device.
    """
    per_shard = math.ceil(num_shards / len(devices))
    rows = math.ceil(num_shards / per_shard)
    cols = len(devices) // rows
    chains = plan_chains(num_chains, devices[:cols])
    cols = chains.num_devices
    grid = np.asarray(list(devices[: rows * cols]), dtype=object).reshape(rows, cols)
    chains = dataclasses.replace(chains, devices=tuple(grid[0]))
    return ShardPlan(num_shards, per_shard, rows * per_shard - num_shards, chains, grid)


def shard_mesh(plan: ShardPlan) -> Mesh:
    """A two-axis ``(SHARD, CHAIN)`` mesh over the plan's devices."""
    return Mesh(plan.devices, (SHARD, CHAIN))
