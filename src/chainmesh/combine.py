"""Combining sub-posterior draws of data shards into full-data draws.

Every combiner takes ``draws``: one ``(num_draws, dim)`` matrix per shard (the
latent sites flattened, draws chain-major) and returns ``(combined, weights)``
with ``combined`` shaped ``(num_draws, dim)`` (``(K * num_draws, dim)`` for
``concat``) and one scalar weight per shard that sums to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MAD_TO_SD = 1.4826
"""Scale that turns a median absolute deviation into a Gaussian sd."""


def _precisions(draws: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for k, x in enumerate(draws):
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        try:
            out.append(np.linalg.inv(cov))
        except np.linalg.LinAlgError:
            raise ValueError(
                f"shard {k}: the draws' covariance is singular; run more draws "
                "or drop constant parameters before combining"
            ) from None
    return out


def _weighted(draws: Sequence[np.ndarray], precisions: Sequence[np.ndarray]):
    total = sum(precisions)
    weighted = sum(x @ w.T for x, w in zip(draws, precisions, strict=True))
    combined = np.linalg.solve(total, weighted.T).T
    traces = np.array([np.trace(w) for w in precisions])
    return combined, traces / traces.sum()


def consensus(draws: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Precision-weighted average of aligned draws (Scott et al. 2016).

    Draw ``s`` of the combination is ``(sum_k W_k)^-1 sum_k W_k theta_ks`` with
    ``W_k`` the inverse sample covariance of shard ``k``; exact when every
    sub-posterior is Gaussian.
    """
    return _weighted(draws, _precisions(draws))


def robust(
    draws: Sequence[np.ndarray], threshold: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Consensus with outlying shards down-weighted.

    A shard's outlyingness is the largest, over coordinates, distance of its
    mean from the median of the shard means, in units of ``1.4826 x MAD``.
    Shards within ``threshold`` keep their precision; beyond it the precision is
    scaled by ``(threshold / distance)^2``.
    """
    means = np.stack([x.mean(axis=0) for x in draws])
    center = np.median(means, axis=0)
    spread = MAD_TO_SD * np.median(np.abs(means - center), axis=0)
    scale = np.where(spread > 0, spread, np.inf)
    distance = np.max(np.abs(means - center) / scale, axis=1)
    factor = np.minimum(1.0, (threshold / np.maximum(distance, 1e-12)) ** 2)
    precisions = [w * f for w, f in zip(_precisions(draws), factor, strict=True)]
    return _weighted(draws, precisions)


def concat(draws: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All shards' draws stacked (a mixture, not a product): for testing."""
    k = len(draws)
    return np.concatenate(list(draws), axis=0), np.full(k, 1.0 / k)


COMBINERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "consensus": consensus,
    "robust": robust,
    "concat": concat,
}
