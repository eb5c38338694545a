"""A metric estimated from an adaptation window pooled over every chain.

The shared part of the estimate (``MetricWindow``: pooled moments of the
draws, and for ``"fisher"`` of the gradients) is summed once per warmup
transition inside the kernel's one pooled collective, about a running shift
(``ensemble.welford_batch``). The low-rank estimator needs the whitened draws
and gradients themselves, not their moments, so each lane also keeps a small
``DrawBuffer``: ``BUFFER`` of its draws and gradients, spread evenly over the
window. At the window's end one ``all_gather`` brings every real lane's
buffer to every device (``(chains x BUFFER, d)`` rows, in mesh order, so the
estimate does not depend on the device split) and ``metrics.lowrank`` runs on
it. Per lane this is O(d (BUFFER + RANK)) memory, never d x d; the gather
runs at window ends only (five times in 500 warmup transitions).

Why a buffer and not streaming sums: the estimator whitens the draws with the
Fisher diagonal of the same window before it looks for principal directions,
and the d x d covariance it would take to defer that is what the metric must
not hold. Chains are nearly independent, so 64 chains x 32 draws is a larger
and less correlated sample than nutpie's one chain over a window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from numpyro.infer.hmc_util import build_adaptation_schedule

from chainmesh.kernels import metrics
from chainmesh.kernels.ensemble import (
    AxisName,
    Welford,
    welford_batch,
    welford_init,
    welford_merge,
    welford_variance,
)

RANK = 48
"""Low-rank directions held by ``metric="lowrank"`` (at most ``d``). On the
100-d AR(1) Gaussian (rho 0.9, sds over a decade; ChEES, 64 chains, 500 +
1000) min bulk ESS per 1000 gradients was 7.0 (diag), 101 (rank 16), 152
(rank 48); on a 100-d Gaussian with a random rotation of a spectrum of
condition 316: 23 (diag), 30 (rank 16), 137 (rank 48)."""

BUFFER = 32
"""Draws (and gradients) each lane keeps of a window for the low-rank estimate."""


class MetricWindow(NamedTuple):
    """Pooled moments of the current window (the same on every lane).

    Attributes:
        draws: Moments of the draws (the running mean is also the shift of
            the kernel's centred statistics).
        grads: Moments of the gradients of the potential (``"fisher"``
            only, None otherwise).
    """

    draws: Welford
    grads: Welford | None


class DrawBuffer(NamedTuple):
    """A lane's draws and gradients kept from the current window
    (``"lowrank"`` only; other metrics keep None).

    Attributes:
        draws: ``(..., BUFFER, d)``.
        grads: Gradients of the potential at ``draws``.
        filled: ``(..., BUFFER)`` bool, False for slots not written yet.
    """

    draws: jax.Array
    grads: jax.Array
    filled: jax.Array


def rank(kind: str, dim: int) -> int:
    """Low-rank columns the metric ``kind`` holds for ``dim`` coordinates."""
    return min(RANK, dim) if kind == "lowrank" else 0


def initial_metric(kind: str, dim: int, dtype: Any) -> metrics.Metric:
    """The identity, shaped as the metric ``kind`` is."""
    return metrics.diagonal(jnp.ones(dim, dtype), rank(kind, dim))


def window_init(kind: str, dim: int, dtype: Any) -> MetricWindow:
    """Empty moments (gradient moments for ``"fisher"`` only)."""
    grads = welford_init(dim, dtype) if kind == "fisher" else None
    return MetricWindow(welford_init(dim, dtype), grads)


def buffer_init(
    kind: str, dim: int, dtype: Any, size: int = BUFFER
) -> DrawBuffer | None:
    """An empty buffer of one lane, ``size`` slots; None unless ``"lowrank"``."""
    if kind != "lowrank":
        return None
    zeros = jnp.zeros((size, dim), dtype)
    return DrawBuffer(zeros, zeros, jnp.zeros(size, bool))


def buffer_slots(num_warmup: int, size: int = BUFFER) -> np.ndarray:
    """The buffer slot each warmup transition writes, -1 for none.

    In every slow window (Stan's, as NumPyro builds them) ``size``
    transitions (all if it is shorter) spread evenly from its first to its
    last, each to its own slot.
    """
    slots = np.full(max(num_warmup, 1), -1, np.int32)
    windows = build_adaptation_schedule(num_warmup) if num_warmup > 0 else []
    for window in windows[1:-1]:
        count = min(size, window.end - window.start + 1)
        picks = np.linspace(window.start, window.end, count).round().astype(int)
        slots[picks] = np.arange(count)
    return slots


def batch(window: MetricWindow, x: jax.Array, grad: jax.Array | None) -> dict:
    """Per-lane sums of one transition's draws ``x`` and gradients ``grad``
    ``(lanes, d)`` (None unless ``"fisher"``), to pool inside the kernel's
    collective."""
    sums = {"draws": welford_batch(window.draws, x)}
    if window.grads is not None:
        sums["grads"] = welford_batch(window.grads, grad)
    return sums


def merge(window: MetricWindow, pooled: dict, collect: jax.Array) -> MetricWindow:
    """Merge pooled sums into the window; outside a slow window (``collect``
    False) only the means move, to the batch's, as the next shift."""

    def one(w: Welford, sums: dict | None) -> Welford:
        if sums is None:
            return w
        merged = welford_merge(w, sums)
        return jax.tree.map(
            lambda a, b: jnp.where(collect, a, b), merged, w._replace(mean=merged.mean)
        )

    return MetricWindow(
        one(window.draws, pooled["draws"]), one(window.grads, pooled.get("grads"))
    )


def emptied(window: MetricWindow) -> MetricWindow:
    """The next window: no draws, the running means kept as shifts."""

    def one(w: Welford | None) -> Welford | None:
        if w is None:
            return None
        return Welford(jnp.zeros_like(w.count), w.mean, jnp.zeros_like(w.m2))

    return MetricWindow(one(window.draws), one(window.grads))


def record(
    buf: DrawBuffer | None, slot: jax.Array, x: jax.Array, grad: jax.Array
) -> DrawBuffer | None:
    """Write ``x``, ``grad`` ``(lanes, d)`` into every lane's ``slot`` (none
    when ``slot`` is -1)."""
    if buf is None:
        return None
    hit = jnp.arange(buf.filled.shape[-1]) == slot  # (size,)
    return DrawBuffer(
        jnp.where(hit[:, None], x[:, None, :], buf.draws),
        jnp.where(hit[:, None], grad[:, None, :], buf.grads),
        buf.filled | hit,
    )


def restart(buf: DrawBuffer | None, ended: jax.Array) -> DrawBuffer | None:
    """The buffer emptied if the window ``ended`` (its slots marked unfilled)."""
    if buf is None:
        return None
    return buf._replace(filled=buf.filled & ~ended)


def estimate(
    kind: str,
    window: MetricWindow,
    buf: DrawBuffer,
    real: jax.Array,
    axis_name: AxisName,
    previous: metrics.Metric,
) -> metrics.Metric:
    """The metric ``kind`` from the window that just ended.

    A coordinate the window saw no spread in (every draw equal: a chain
    whose steps are below its float resolution) keeps its ``previous``
    scale; its Fisher scale would be 0, clipped to 1e-20, and freeze it.

    Args:
        kind: ``"diag"`` (Stan's regularized variance), ``"fisher"`` or
            ``"lowrank"``.
        window: The pooled moments of the window.
        buf: Every lane's buffer ``(lanes, BUFFER, d)`` (``"lowrank"``).
        real: ``(lanes,)`` bool, False for padding lanes.
        axis_name: Mesh axes to gather the buffers over; None: this block.
        previous: The metric in use during the window.
    """
    if kind == "diag":
        return metrics.diagonal(welford_variance(window.draws))
    new = _gradient_informed(kind, window, buf, real, axis_name)
    flat = new.scale <= metrics.SCALE_RANGE[0]
    return new._replace(scale=jnp.where(flat, previous.scale, new.scale))


def _gradient_informed(
    kind: str,
    window: MetricWindow,
    buf: DrawBuffer,
    real: jax.Array,
    axis_name: AxisName,
) -> metrics.Metric:
    """``estimate``'s ``"fisher"`` or ``"lowrank"`` metric, as estimated."""
    dim = window.draws.mean.shape[0]
    if kind == "fisher":
        return metrics.fisher(window.draws, window.grads)
    draws, grads, filled = buf
    keep = real[:, None] & filled
    if axis_name is not None:
        draws, grads, keep = (
            lax.all_gather(z, axis_name, tiled=True) for z in (draws, grads, keep)
        )
    rows = "lanes slots d -> (lanes slots) d"
    return metrics.lowrank(
        rearrange(draws, rows),
        rearrange(grads, rows),
        rank(kind, dim),
        weights=rearrange(keep, "lanes slots -> (lanes slots)"),
    )
