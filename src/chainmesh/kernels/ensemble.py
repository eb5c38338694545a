"""Statistics pooled over every real chain of a mesh, for ensemble adaptation.

A device holds a block of lanes (leading axis); some lanes are padding. A
pooled sum is the sum over the real lanes of the block, then ``psum`` over the
mesh axes that carry chains: one collective for a whole pytree of statistics.
Means are ``pooled sum / pooled count``, so they do not depend on how chains
are spread over devices except by the rounding of the sums.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc_util import build_adaptation_schedule

AxisName = str | tuple[str, ...] | None
"""Mesh axes to pool over (inside ``shard_map``); None pools the local block."""


def first_lane(tree: Any) -> Any:
    """Lane 0's copy of a state replicated on every lane."""
    return jax.tree.map(lambda x: x[0], tree)


def replicate(tree: Any, lanes: int) -> Any:
    """A copy of ``tree`` on every one of ``lanes`` lanes (leading axis)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (lanes, *jnp.shape(x))), tree)


def pooled_sum(
    tree: Any, real: jax.Array, axis_name: AxisName, reproducible: bool = False
) -> Any:
    """Sum each leaf over the real lanes of the block and over ``axis_name``.

    Leaves are ``(lanes, ...)``; padding lanes are replaced by zeros (with
    ``where``, so their NaNs or infinities never leak). All leaves travel in
    one flat vector: one collective, whatever the number of statistics.

    Args:
        tree: Pytree of per-lane statistics, leaves ``(lanes, ...)``.
        real: Bool ``(lanes,)``, False for padding lanes.
        axis_name: Mesh axis (or axes) to sum over; None: this block only.
        reproducible: Gather every lane's statistics (in mesh order) and sum
            them in one fixed order, instead of ``psum`` of per-device sums:
            the same lanes split over any number of devices then give the
            same sums, bit for bit, for ``lanes x`` more traffic.

    Returns:
        The tree of sums, leaves without the lane axis.
    """
    mask = real.reshape(-1, 1)
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(tree)
    flat = jnp.where(mask, flat, jnp.zeros((), flat.dtype))
    unravel = ravel_pytree(jax.tree.map(lambda x: x[0], tree))[1]
    if axis_name is None:
        return unravel(flat.sum(0))
    if reproducible:
        return unravel(lax.all_gather(flat, axis_name, tiled=True).sum(0))
    return unravel(lax.psum(flat.sum(0), axis_name))


def gather_lanes(tree: Any, real: jax.Array, axis_name: AxisName) -> tuple[Any, Any]:
    """Every lane of the mesh, in chain order, on every device: one collective.

    For statistics that are not sums of per-lane terms (the ChEES gradient
    centres each lane about the pooled means): each device computes them
    from all lanes, in the same order whatever the device split. Padding
    lanes arrive as zeros, and as False in the returned mask.

    Args:
        tree: Pytree of per-lane values, leaves ``(lanes, ...)``.
        real: Bool ``(lanes,)``, False for padding lanes.
        axis_name: Mesh axis (or axes) to gather over; None: this block only.

    Returns:
        ``(tree, real)`` with the lanes of every device on the leading axis.
    """
    if axis_name is None:
        return tree, real
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(tree)
    flat = jnp.where(real.reshape(-1, 1), flat, jnp.zeros((), flat.dtype))
    rows = jnp.concatenate([flat, real.astype(flat.dtype)[:, None]], axis=1)
    rows = lax.all_gather(rows, axis_name, tiled=True)
    unravel = ravel_pytree(first_lane(tree))[1]
    return jax.vmap(unravel)(rows[:, :-1]), rows[:, -1] > 0


class Welford(NamedTuple):
    """Pooled running moments of the draws of one adaptation window.

    Attributes:
        count: Number of pooled draws in the window (float).
        mean: ``(d,)`` running mean; kept across windows, and moved to
            each batch's mean between windows, as the shift that centres the
            next batch's sums (never zero: in float32, sums of squares about
            zero cancel when the mean is large against the sd).
        m2: ``(d,)`` sum of squared deviations from ``mean``.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def welford_init(dim: int, dtype: Any) -> Welford:
    """Empty moments for ``dim`` coordinates."""
    return Welford(jnp.zeros((), dtype), jnp.zeros(dim, dtype), jnp.zeros(dim, dtype))


def welford_batch(w: Welford, x: jax.Array) -> dict[str, jax.Array]:
    """Per-lane sums for one batch of draws ``x`` ``(lanes, d)``, shifted by
    the running mean (accurate in float32); pool them with ``pooled_sum``."""
    dx = x - w.mean
    return {"n": jnp.ones(x.shape[:1], x.dtype), "s1": dx, "s2": dx * dx}


def welford_merge(w: Welford, pooled: dict[str, jax.Array]) -> Welford:
    """Merge pooled batch sums into the window's moments (Chan et al.)."""
    n = pooled["n"]
    delta = pooled["s1"] / jnp.maximum(n, 1.0)  # batch mean - running mean
    count = w.count + n
    frac = n / jnp.maximum(count, 1.0)
    m2 = w.m2 + (pooled["s2"] - n * delta**2) + delta**2 * w.count * frac
    return Welford(count, w.mean + delta * frac, m2)


def welford_variance(w: Welford) -> jax.Array:
    """Stan's regularized variance: shrunk towards 1e-3 by 5 pseudo-draws."""
    var = w.m2 / jnp.maximum(w.count - 1.0, 1.0)
    return (w.count / (w.count + 5.0)) * var + 1e-3 * (5.0 / (w.count + 5.0))


def mass_schedule(num_warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Stan's warmup windows (as NumPyro builds them) as per-transition flags.

    Returns:
        ``(collect, window_end)``, bool arrays of length ``max(num_warmup, 1)``:
        transition ``t`` adds its draws to the window's moments, and ends a
        slow window (the mass matrix is updated after it).
    """
    size = max(num_warmup, 1)
    collect, window_end = np.zeros(size, bool), np.zeros(size, bool)
    windows = build_adaptation_schedule(num_warmup) if num_warmup > 0 else []
    for window in windows[1:-1]:  # slow windows, between the two fast buffers
        collect[window.start : window.end + 1] = True
        window_end[window.end] = True
    return collect, window_end
