"""A ``chain_method`` for NumPyro's ``MCMC``: its chains as one sharded program.

NumPyro's ``MCMC`` accepts a callable ``chain_method``: a transform that it
applies to its per-chain function and calls on ``(rng_key, init_state,
init_params)``, every leaf with a leading ``num_chains`` axis (``None`` where
unset). ``chain_method(mesh)`` returns the transform
``fn -> jit(shard_map(vmap(fn)))`` over a one-axis ``("chain",)`` mesh, with
chainmesh's padding rule for chain counts that do not divide the devices, so
existing NumPyro code gets sharded chains by changing one argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from chainmesh.mesh import CHAIN, chain_mesh, plan_chains, resolve_devices
from chainmesh.placement import shard_chains


def _mesh_devices(mesh: Mesh | int | Sequence[jax.Device]) -> list[jax.Device]:
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != (CHAIN,):
            raise ValueError(
                f"mesh has axes {tuple(mesh.axis_names)}; pass a one-axis mesh "
                f"named {CHAIN!r} (Mesh(devices, ('{CHAIN}',))), a device count "
                "or a list of devices"
            )
        return list(mesh.devices.flat)
    return resolve_devices(mesh)


def _num_chains(map_args: Any) -> int:
    """The common leading axis of every leaf (NumPyro's chain axis)."""
    sizes = {
        int(np.shape(x)[0]) if np.ndim(x) else 0 for x in jax.tree.leaves(map_args)
    }
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            "chain_method expects every leaf of NumPyro's per-chain arguments to "
            f"have the same leading chain axis; got leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def _pad(x: jax.Array, total: int) -> jax.Array:
    """Append copies of the last chain up to ``total`` chains (PRNG keys too)."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    real = x.shape[0]
    if total == real:
        return x
    return x[np.concatenate([np.arange(real), np.full(total - real, real - 1)])]


def chain_method(
    mesh: Mesh | int | Sequence[jax.Device] | None = None,
) -> Callable[[Callable], Callable]:
    """A ``chain_method`` for ``numpyro.infer.MCMC`` that shards chains over devices.

    The chains run as one ``jit(shard_map(vmap(...)))`` program: each device
    runs its block of chains vectorized, and stops on its own (no cross-device
    wait inside NUTS's ``while_loop``). With ``C`` chains on ``D`` devices,
    ``ceil(C / D)`` chains go on each of ``ceil(C / ceil(C / D))`` devices;
    padding chains (copies of the last chain) run and are dropped. NumPyro
    turns its progress bar off for callable chain methods (with a warning
    unless ``progress_bar=False``).

    Example:
        >>> from numpyro.infer import MCMC, NUTS
        >>> mcmc = MCMC(NUTS(model), num_warmup=200, num_samples=200,
        ...             num_chains=10, chain_method=cm.chain_method(),
        ...             progress_bar=False)
        >>> mcmc.run(jax.random.key(0), X, y)
        >>> mcmc.get_samples(group_by_chain=True)["beta"].shape
        (10, 200, 5)

    Args:
        mesh: None (all ``jax.devices()``, looked up when the chains run), a
            one-axis ``Mesh`` named ``"chain"``, an int ``n`` (the first ``n``
            devices) or a list of devices.

    Returns:
        The transform ``fn -> g``; ``g(map_args)`` returns ``fn``'s outputs
        stacked over the real chains: sharded over the devices when the chains
        fill them evenly, else gathered on the first device.

    Raises:
        ValueError, TypeError: A bad ``mesh``.
    """
    devices = None if mesh is None else _mesh_devices(mesh)

    def transform(fn: Callable) -> Callable:
        def run(map_args: Any) -> Any:
            num_chains = _num_chains(map_args)
            plan = plan_chains(num_chains, devices or resolve_devices(None))
            device_mesh = chain_mesh(plan)
            padded = jax.tree.map(lambda x: _pad(x, plan.total_chains), map_args)
            # check_vma=False: NumPyro's kernels are written for vmap/pmap and
            # carry no varying-axis annotations; nothing here is a collective.
            program = jax.jit(
                jax.shard_map(
                    jax.vmap(fn),
                    mesh=device_mesh,
                    in_specs=P(CHAIN),
                    out_specs=P(CHAIN),
                    check_vma=False,
                )
            )
            out = program(shard_chains(padded, device_mesh))
            if not plan.num_padding:
                return out  # sharded over the devices, like pmap's outputs
            # A sharded axis must divide evenly, so the real chains are
            # gathered on the first device (one copy, as "vectorized" keeps).
            out = jax.device_put(out, plan.devices[0])
            return jax.tree.map(lambda x: x[:num_chains], out)

        return run

    return transform
