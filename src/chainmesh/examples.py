"""Embedded example models with synthetic data, for the demo and benchmarks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpyro
import numpyro.distributions as dist


class Example(NamedTuple):
    """A model, its data (positional args) and the true values, if known."""

    model: object
    args: tuple
    truth: dict[str, np.ndarray]


def logistic_regression(X, y=None):
    """Bayesian logistic regression: ``y ~ Bernoulli(logit = a + X @ beta)``."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    prior = dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1)
    beta = numpyro.sample("beta", prior)
    numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def logistic_data(seed: int = 0, n: int = 5000, p: int = 20) -> Example:
    """Synthetic logistic-regression data made with a fixed seed."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)).astype(np.float32)
    beta = rng.normal(0.0, 0.5, size=p).astype(np.float32)
    alpha = np.float32(0.3)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(alpha + X @ beta)))).astype(np.float32)
    return Example(logistic_regression, (X, y), {"alpha": alpha, "beta": beta})


def eight_schools(sigma, y=None):
    """The non-centered eight-schools hierarchical model."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_raw = numpyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_raw)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_data(seed: int = 0) -> Example:
    """Rubin's eight-schools data (``seed`` is unused: the data are fixed)."""
    y = np.array([28, 8, -3, 7, -1, 1, 18, 12], dtype=np.float32)
    sigma = np.array([15, 10, 16, 11, 9, 11, 10, 18], dtype=np.float32)
    return Example(eight_schools, (sigma, y), {})


def gaussian(scales):
    """An anisotropic Gaussian with independent coordinates of sd ``scales``."""
    numpyro.sample("x", dist.Normal(0.0, scales).to_event(1))


def gaussian_data(seed: int = 0, d: int = 100) -> Example:
    """A ``d``-dimensional Gaussian with sds log-spaced over two decades."""
    scales = np.logspace(-1, 1, d).astype(np.float32)
    return Example(gaussian, (scales,), {"x": np.zeros(d, np.float32)})


EXAMPLES = {
    "logistic": logistic_data,
    "eight_schools": eight_schools_data,
    "gaussian100": gaussian_data,
}
"""Name -> data factory ``(seed) -> Example``."""
