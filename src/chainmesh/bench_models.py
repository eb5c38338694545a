"""Benchmark models and their data sets: the embedded examples plus ``diamonds``.

Data set ``k`` of a model always has the same shapes as data set 0, so a
warm call on data set ``k > 0`` is "new data, same shapes".
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist

from chainmesh.examples import EXAMPLES, Example


def diamonds(X, y=None):
    """posteriordb's ``diamonds`` linear regression (brms form, centred X).

    ``b`` gets a wide normal prior where the original has a flat one.
    """
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0, 10)))
    numpyro.sample("y", dist.Normal(intercept + X @ b, sigma), obs=y)


def diamonds_data(seed: int = 0, n: int = 5000, k: int = 24) -> Example:
    """A synthetic stand-in of the diamonds data's shape (N=5000, K=24).

    The real design holds polynomial contrasts of carat, cut, colour and
    clarity, strongly correlated; here columns share three latent factors
    (pairwise correlations around 0.8), which gives the posterior the same
    kind of narrow, correlated ridges. Not the real data.
    """
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 3))
    loadings = rng.normal(size=(3, k))
    X = factors @ loadings + 0.5 * rng.normal(size=(n, k))
    X = (X - X.mean(0)) / X.std(0)
    b = rng.normal(0.0, 0.5, size=k)
    y = 7.8 + X @ b + 0.3 * rng.normal(size=n)
    return Example(
        diamonds,
        (X.astype(np.float32), y.astype(np.float32)),
        {"b": b.astype(np.float32)},
    )


BENCH_MODELS = {**EXAMPLES, "diamonds": diamonds_data}
"""Model name -> data factory ``(seed) -> Example``."""

_FIXED_DATA = ("eight_schools", "gaussian100")
"""Examples whose factory ignores the seed: new data sets are jittered copies."""


def bench_data(name: str, index: int) -> Example:
    """Data set ``index`` of model ``name`` (same shapes for every index).

    Args:
        name: A key of ``BENCH_MODELS``.
        index: 0 for the cold call, 1, 2, ... for the warm calls.
    """
    example = BENCH_MODELS[name](seed=index)
    if name not in _FIXED_DATA or index == 0:
        return example
    rng = np.random.default_rng(index)
    # Multiplicative jitter keeps the sign, so scales stay positive.
    args = tuple(
        (a * (1 + 0.05 * rng.normal(size=a.shape))).astype(a.dtype)
        for a in example.args
    )
    return example._replace(args=args)
