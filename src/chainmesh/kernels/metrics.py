"""Euclidean metrics held in O(d k): a diagonal scale and a low-rank correction.

The inverse mass matrix (the posterior covariance estimate) is

    Sigma = diag(scale) (I + U (diag(lam) - I) U^T) diag(scale),

with ``U`` ``(d, k)`` orthonormal columns and ``lam`` ``(k,)`` positive
(Seyboldt, Carlson & Carpenter's low-rank-modified mass matrix, nutpie's
``low_rank_modified_mass_matrix``). A column whose ``lam`` is 1 (or whose
``U`` column is zero) acts as the identity, so a fixed ``k`` holds fewer
effective directions; without ``U`` and ``lam`` (None) the metric is
diagonal, with inverse mass ``scale**2``. Every operation here costs O(d k)
per vector.

Estimators (pure functions of draws and gradients of log p):

- ``fisher``: the diagonal minimizing the Fisher divergence,
  ``scale**2 = sqrt(var(x) / var(grad))``, from pooled moments
  (``ensemble.Welford``, accumulated about a running shift);
- ``lowrank``: nutpie's estimator on a matrix of draws and gradients (rows
  may be masked): the Fisher diagonal, then the draws and gradients whitened
  by it, the span of their top-``k`` principal directions, the SPD geometric
  mean of the regularized projected covariances, and its ``k`` eigenpairs
  farthest from 1 in log scale, those inside ``[1/cutoff, cutoff]`` set to 1.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chainmesh.kernels.ensemble import Welford

GAMMA = 1e-5
"""Regularization of the projected covariances (nutpie's default)."""

CUTOFF = 2.0
"""Eigenvalues inside ``[1 / CUTOFF, CUTOFF]`` are set to 1 (nutpie's ``c``)."""

SCALE_RANGE = (1e-20, 1e20)
"""Clip of the diagonal scale (nutpie's range)."""


class Metric(NamedTuple):
    """An inverse mass matrix ``diag(scale) (I + U (lam - I) U^T) diag(scale)``.

    Attributes:
        scale: ``(d,)`` positive diagonal scale (marginal sd-like).
        U: ``(d, k)`` orthonormal (or zero) columns; None: diagonal.
        lam: ``(k,)`` positive eigenvalues of the correction; None: diagonal.
    """

    scale: jax.Array
    U: jax.Array | None = None
    lam: jax.Array | None = None


def diagonal(inv_mass: jax.Array, rank: int = 0) -> Metric:
    """The diagonal metric with inverse mass ``inv_mass`` ``(d,)``, held with
    ``rank`` inactive low-rank columns (so its shape fits a low-rank state)."""
    return _with_rank(jnp.sqrt(inv_mass), rank)


def _with_rank(scale: jax.Array, rank: int) -> Metric:
    if rank == 0:
        return Metric(scale)
    d, dtype = scale.shape[-1], scale.dtype
    return Metric(scale, jnp.zeros((d, rank), dtype), jnp.ones(rank, dtype))


def _correct(y: jax.Array, m: Metric, power: float) -> jax.Array:
    """``(I + U (lam**power - I) U^T) y`` for ``y`` ``(..., d)``."""
    if m.U is None:  # a diagonal metric
        return y
    coef = (y @ m.U) * (m.lam**power - 1.0)
    return y + coef @ m.U.T


def velocity(m: Metric, p: jax.Array) -> jax.Array:
    """``Sigma p``: the velocity of momentum ``p`` ``(..., d)``."""
    return m.scale * _correct(m.scale * p, m, 1.0)


def kinetic_energy(m: Metric, p: jax.Array) -> jax.Array:
    """``p^T Sigma p / 2`` for ``p`` ``(..., d)``."""
    return 0.5 * (p * velocity(m, p)).sum(-1)


def momentum(m: Metric, noise: jax.Array) -> jax.Array:
    """A momentum ~ N(0, Sigma^{-1}) from standard normal ``noise`` ``(..., d)``.

    ``Sigma = L L^T`` with ``L = diag(scale) (I + U (lam**0.5 - I) U^T)``;
    the momentum is ``L^{-T} noise``.
    """
    return unwhiten_gradient(m, noise)


def draw_momentum(key: jax.Array, m: Metric) -> jax.Array:
    """One momentum ``(d,)`` ~ N(0, Sigma^{-1}) from ``key``."""
    return momentum(m, jax.random.normal(key, m.scale.shape, m.scale.dtype))


def whiten(m: Metric, x: jax.Array) -> jax.Array:
    """``L^{-1} x``: positions in the metric's whitened coordinates."""
    return _correct(x / m.scale, m, -0.5)


def unwhiten(m: Metric, y: jax.Array) -> jax.Array:
    """``L y``: positions back from whitened coordinates (``whiten``'s inverse)."""
    return m.scale * _correct(y, m, 0.5)


def unwhiten_gradient(m: Metric, grad: jax.Array) -> jax.Array:
    """``L^{-T} grad``: a gradient back from whitened coordinates (the inverse
    of ``whitened_velocity``, which is also the chain rule of ``unwhiten``)."""
    return _correct(grad, m, -0.5) / m.scale


def whitened_velocity(m: Metric, p: jax.Array) -> jax.Array:
    """``L^T p``: the velocity of ``whiten(x)`` under momentum ``p``; for a
    gradient ``g`` of ``x``, ``L^T g`` is the gradient of ``y = whiten(x)``."""
    return _correct(m.scale * p, m, 0.5)


def inverse_mass_diagonal(m: Metric) -> jax.Array:
    """The diagonal of ``Sigma`` ``(d,)`` (marginal variances it assumes)."""
    if m.U is None:
        return m.scale**2
    return m.scale**2 * (1.0 + (m.U**2 * (m.lam[..., None, :] - 1.0)).sum(-1))


def fisher_scale(var_x: jax.Array, var_grad: jax.Array) -> jax.Array:
    """``(var_x / var_grad) ** (1/4)`` clipped: the scale whose square is the
    Fisher-divergence-minimizing diagonal inverse mass (nutpie's floor on
    ``var_grad`` and clip of the scale)."""
    ratio = jnp.clip(var_x / jnp.maximum(var_grad, 1e-10), 0.0, None)
    return jnp.clip(ratio**0.25, *SCALE_RANGE)


def fisher(draws: Welford, grads: Welford, rank: int = 0) -> Metric:
    """The Fisher diagonal metric from the pooled moments of a window.

    Args:
        draws: Moments of the draws (``ensemble.welford_merge``).
        grads: Moments of the gradients of log p (or of the potential: the
            sign does not enter a variance), over the same draws.
        rank: Inactive low-rank columns to hold (see ``diagonal``).
    """
    return _with_rank(fisher_scale(draws.m2, grads.m2), rank)  # 1 / count cancels


def _floor(vals: jax.Array) -> jax.Array:
    """Eigenvalues floored at eps times the largest (positive definite)."""
    return jnp.maximum(vals, jnp.finfo(vals.dtype).eps * jnp.abs(vals).max())


def spd_mean(a: jax.Array, g: jax.Array) -> jax.Array:
    """``a # g^{-1}``: the SPD geometric mean of ``a`` and the inverse of ``g``,
    ``g^{-1/2} (g^{1/2} a g^{1/2})^{1/2} g^{-1/2}`` (nuts-rs ``spd_mean``)."""
    ev, vecs = jnp.linalg.eigh(g)
    root = jnp.sqrt(_floor(ev))
    g_half = (vecs * root) @ vecs.T
    g_inv_half = (vecs / root) @ vecs.T
    mv, mvecs = jnp.linalg.eigh(g_half @ a @ g_half)
    m_half = (mvecs * jnp.sqrt(_floor(mv))) @ mvecs.T
    return g_inv_half @ m_half @ g_inv_half


def _principal(z: jax.Array, rank: int) -> jax.Array:
    """The top-``rank`` right singular vectors of ``z`` ``(n, d)``, ``(d, r)``."""
    return jnp.linalg.svd(z, full_matrices=False)[2][:rank].T


def lowrank(
    draws: jax.Array,
    grads: jax.Array,
    rank: int,
    weights: jax.Array | None = None,
    gamma: float = GAMMA,
    cutoff: float = CUTOFF,
) -> Metric:
    """nutpie's low-rank-modified metric from draws and gradients of log p.

    Args:
        draws: ``(n, d)`` positions.
        grads: ``(n, d)`` gradients of log p (or of the potential) there.
        rank: ``k``, the number of low-rank columns returned (static).
        weights: ``(n,)`` bool, False for rows that must not count (padding
            lanes, empty buffer slots); None: every row counts.
        gamma: Regularization: the projected covariances are
            ``P^T P / gamma + I`` (nutpie's unnormalized sums).
        cutoff: Eigenvalues inside ``[1/cutoff, cutoff]`` are set to 1.

    Returns:
        A ``Metric`` with ``U`` ``(d, rank)`` and ``lam`` ``(rank,)``.
    """
    keep = jnp.ones(draws.shape[0], bool) if weights is None else weights
    estimate = partial(_lowrank, rank=rank, gamma=gamma, cutoff=cutoff)
    # Vectorized (BatchSampler: one estimate per data set), run the data sets
    # one after another: jaxlib's batched LAPACK kernels split a batch over
    # the CPU thread pool that runs the devices' programs and wait for it,
    # which deadlocked 8 CPU devices with 25 data sets each.
    return Metric(
        *jax.custom_batching.sequential_vmap(estimate)(draws, grads, keep.astype(bool))
    )


def _lowrank(
    draws: jax.Array,
    grads: jax.Array,
    keep: jax.Array,
    rank: int,
    gamma: float,
    cutoff: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``lowrank``'s estimate for one matrix of rows; ``(scale, U, lam)``."""
    d, dtype = draws.shape[1], draws.dtype
    # A row with a non-finite coordinate carries no usable geometry.
    keep = keep & jnp.isfinite(draws).all(1) & jnp.isfinite(grads).all(1)
    mask = keep[:, None]
    rows = keep.sum()
    count = jnp.maximum(rows.astype(dtype), 1.0)

    def centred(z: jax.Array) -> jax.Array:
        # Mean about a real row (the shift), so float32 does not cancel.
        shifted = jnp.where(mask, z - z[jnp.argmax(keep)], 0.0)
        return jnp.where(mask, shifted - shifted.sum(0) / count, 0.0)

    dx, dg = centred(draws), centred(grads)
    var_x, var_g = (dx * dx).sum(0) / count, (dg * dg).sum(0) / count
    # Squares that overflow float32 (gradients of 1e20 far out in a tail):
    # the same scale from standard deviations of max-normalized columns.
    scale = jnp.where(
        jnp.isfinite(var_x) & jnp.isfinite(var_g),
        fisher_scale(var_x, var_g),
        _fisher_scale_from_sd(_sd(dx, count), _sd(dg, count)),
    )
    # Fewer than two rows: no spread to estimate; the identity.
    scale = jnp.where((rows >= 2) & jnp.isfinite(scale), scale, 1.0)
    x, g = dx / scale, dg * scale
    basis, _ = jnp.linalg.qr(
        jnp.concatenate([_principal(x, rank), _principal(g, rank)], axis=1)
    )
    eye = jnp.eye(basis.shape[1], dtype=dtype)
    px, pg = x @ basis, g @ basis
    sigma = spd_mean(px.T @ px / gamma + eye, pg.T @ pg / gamma + eye)
    vals, vecs = jnp.linalg.eigh(sigma)
    vals = _floor(vals)
    top = jnp.argsort(-jnp.abs(jnp.log(vals)))[: min(rank, vals.shape[0])]
    lam = vals[top]
    # n centred rows span at most n - 1 directions (nutpie keeps at most
    # min(rows, k)); the rest of the subspace is not estimated.
    supported = jnp.arange(lam.shape[0]) < rows - 1
    lam = jnp.where(supported & ((lam < 1.0 / cutoff) | (lam > cutoff)), lam, 1.0)
    U = basis @ vecs[:, top]
    # A non-finite estimate (overflowed sums, a failed decomposition): the
    # Fisher diagonal alone.
    good = jnp.isfinite(U).all() & jnp.isfinite(lam).all() & (lam > 0).all()
    U, lam = jnp.where(good, U, 0.0), jnp.where(good, lam, 1.0)
    pad = rank - lam.shape[0]  # fewer directions than rank: inactive columns
    U = jnp.concatenate([U, jnp.zeros((d, pad), dtype)], axis=1)
    lam = jnp.concatenate([lam, jnp.ones(pad, dtype)])
    return scale, U, lam


def _sd(z: jax.Array, count: jax.Array) -> jax.Array:
    """Root mean square of the columns of ``z`` (zeros in masked rows) over
    ``count`` rows, computed on ``z`` divided by its largest magnitude so the
    squares do not overflow (gradients far out in the tails reach 1e20)."""
    top = jnp.abs(z).max(0)
    top = jnp.where(top > 0, top, 1.0)
    return top * jnp.sqrt(((z / top) ** 2).sum(0) / count)


def _fisher_scale_from_sd(sd_x: jax.Array, sd_grad: jax.Array) -> jax.Array:
    """``fisher_scale`` from standard deviations: ``sqrt(sd_x / sd_grad)``,
    with the same floor (1e-5 on the sd: 1e-10 on the variance) and clip."""
    return jnp.clip(jnp.sqrt(sd_x / jnp.maximum(sd_grad, 1e-5)), *SCALE_RANGE)
