"""Per-chain keys and initial values.

Chain ``i`` gets ``fold_in(root_key, i)``: its key depends on the root key and
its index only, never on the number of chains, devices or padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import numpy as np


def root_key(seed: int | jax.Array) -> jax.Array:
    """A raw ``uint32[2]`` key from an int seed or a JAX PRNG key, or raw
    ``uint32[n, 2]`` keys from ``n`` keys (one per chain, as NumPyro's
    ``MCMC.run`` takes them: ``jax.random.split(key, num_chains)``).

    Raises:
        TypeError: ``seed`` is neither an int nor PRNG keys.
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.PRNGKey(int(seed))
    if isinstance(seed, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.ndim <= 1:
            return jax.random.key_data(seed)
        if seed.ndim in (1, 2) and seed.shape[-1] == 2 and seed.dtype == np.uint32:
            return seed
    raise TypeError(
        "seed must be an int, a single JAX PRNG key (jax.random.key(0)) or one "
        f"key per chain (jax.random.split(key, num_chains)), got {type(seed).__name__}"
        f"{getattr(seed, 'shape', '')}"
    )


def seed_keys(
    seed: Any, num_chains: int, total_chains: int, batched: bool = False
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The init program's key arguments: ``(root, per-chain keys, use them)``.

    With one seed, chain ``i`` uses ``fold_in(root, i)`` (computed inside the
    program) and the per-chain keys are zeros. With one key per chain, chain
    ``i`` uses key ``i``; padding chains reuse the keys of the first chains
    (their draws are dropped).

    Raises:
        ValueError: Per-chain keys of the wrong count.
        TypeError: Per-chain keys for a ``BatchSampler``, or a bad seed.
    """
    key = np.asarray(root_key(seed))
    if key.ndim == 1:
        return key, np.zeros((total_chains, 2), np.uint32), False
    if batched:
        raise TypeError(
            "BatchSampler takes one seed (data set k, chain i uses "
            "fold_in(fold_in(seed, k), i)); pass an int or a single key"
        )
    if key.shape[0] != num_chains:
        raise ValueError(
            f"seed holds {key.shape[0]} keys but num_chains={num_chains}; pass one "
            "key per chain (jax.random.split(key, num_chains)) or a single key"
        )
    chains = np.arange(total_chains) % num_chains
    return key[0], np.ascontiguousarray(key[chains]), True


def chain_key(root: jax.Array, chain: jax.Array) -> jax.Array:
    """The key of chain number ``chain``."""
    return jax.random.fold_in(root, chain)


def with_values(
    values: Mapping[str, Any], fallback: Callable[..., Any]
) -> Callable[..., Any]:
    """An init strategy: ``values[site]`` where given, ``fallback`` elsewhere.

    Values are constrained (in the site's support), like NumPyro's
    ``init_to_value``; they may be traced, so one compiled program serves any
    values of the same shapes.
    """
    return partial(_init_with_values, values=values, fallback=fallback)


def _init_with_values(site=None, values=None, fallback=None):
    if site is None:
        return partial(_init_with_values, values=values, fallback=fallback)
    if site["type"] == "sample" and not site["is_observed"]:
        if site["name"] in values:
            return values[site["name"]]
    return fallback(site)


def layout_init_params(
    init_params: Mapping[str, Any] | None,
    latent: Mapping[str, tuple[int, ...]],
    num_chains: int,
    total_chains: int,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """Validate ``init_params`` and stack them to ``(total_chains, *site_shape)``.

    A leaf shaped ``(num_chains, *site_shape)`` gives one value per chain; a leaf
    shaped like the site (or ``(1, *site_shape)``) is shared by all chains.
    Padding chains reuse chain 0's value.

    Raises:
        ValueError: Unknown site names or shapes that fit neither rule.
        TypeError: ``init_params`` is not a mapping.
    """
    if init_params is None:
        return {}
    if not isinstance(init_params, Mapping):
        raise TypeError(
            "init_params must be a dict of site name -> value, got "
            f"{type(init_params).__name__}"
        )
    unknown = sorted(set(init_params) - set(latent))
    if unknown:
        raise ValueError(
            f"init_params has unknown sites {unknown}; the model's latent sites "
            f"are {sorted(latent)}"
        )
    stacked = {}
    for name, value in init_params.items():
        arr = np.asarray(value, dtype=dtype)
        shape = tuple(latent[name])
        if arr.shape == shape or arr.shape == (1, *shape):
            arr = np.broadcast_to(arr.reshape(shape), (num_chains, *shape))
        elif arr.shape != (num_chains, *shape):
            raise ValueError(
                f"init_params[{name!r}] has shape {arr.shape}; expected the site "
                f"shape {shape} (shared by all chains) or {(num_chains, *shape)} "
                "(one value per chain)"
            )
        pad = np.repeat(arr[:1], total_chains - num_chains, axis=0)
        stacked[name] = np.ascontiguousarray(np.concatenate([arr, pad]))
    return stacked
