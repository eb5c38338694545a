"""Models shared by the tests (data always arrive as arguments)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

PRIOR_SD = 10.0


def normal_mean(y):
    """Conjugate: mu ~ N(0, 10), y ~ N(mu, 1); posterior known exactly."""
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def normal_mean_posterior(y: np.ndarray) -> tuple[float, float]:
    """Exact posterior mean and sd of ``normal_mean``."""
    precision = 1.0 / PRIOR_SD**2 + len(y)
    return float(np.sum(y) / precision), float(precision**-0.5)


def linreg(X, y=None):
    """Linear regression with a positive scale and a deterministic site."""
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1)
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.deterministic("beta_sum", beta.sum())
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def linreg_data(seed: int = 0, n: int = 50, p: int = 3):
    """Synthetic data for ``linreg``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)).astype(np.float32)
    y = (X @ np.linspace(-1, 1, p) + 0.5 * rng.normal(size=n)).astype(np.float32)
    return X, y


def discrete_latent(y):
    """A model NUTS cannot sample: a latent Bernoulli."""
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def scale_model(y):
    """A positive-support latent, for init checks."""
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)


RESUME_CONFIG = {
    "num_chains": 4,
    "devices": 2,
    "num_warmup": 60,
    "num_samples": 60,
    "chunk_size": 10,
    "checkpoint_every": 2,
    "progress_bar": False,
}
"""6 warmup chunks then 6 sampling chunks, a checkpoint every 2 chunks."""


def correlated(cov):
    """A zero-mean multivariate normal with covariance ``cov``."""
    numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(cov.shape[0]), cov))


@dataclasses.dataclass
class Design:
    """A design vector as a static object: unhashable (a dataclass with
    ``eq``), and too long for its repr to show every value."""

    X: np.ndarray


def design_model(design):
    """``y = 0 ~ Normal(mu * design.X, 1)``, the design static."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu * design.X, 1.0), obs=np.zeros(len(design.X)))
