"""Small models for simulation-based calibration, and their prior simulator.

Each model takes its fixed inputs (school sds, a design matrix) and then the
observations ``y``; with ``y=None`` it draws ``y`` from the prior predictive,
which is how ``simulate`` makes the (parameters, data) pairs: one model
definition serves both the simulation and the fit, so SBC checks the sampler,
not two hand-copied generative stories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive

# Prior sd of the conjugate normal's mean: wide enough that the data (N = 10,
# unit noise) dominate the posterior, narrow enough that y stays O(10).
NORMAL_PRIOR_SD = 3.0
NORMAL_NUM_OBS = 10

# Rubin's (1981) eight schools: the standard errors of the school effects.
SCHOOL_SDS = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)

LOGISTIC_NUM_OBS = 40
LOGISTIC_NUM_PREDICTORS = 3
# The design matrix is data, not a simulated quantity: one fixed draw.
LOGISTIC_DESIGN_SEED = 20180101


def normal_mean(sigma: jax.Array, y: jax.Array | None = None) -> None:
    """Conjugate normal: mu ~ N(0, 3), y_n ~ N(mu, sigma_n) with sigma_n = 1."""
    mu = numpyro.sample("mu", dist.Normal(0.0, NORMAL_PRIOR_SD))
    numpyro.sample("y", dist.Normal(mu, sigma).to_event(1), obs=y)


def eight_schools(sigma: jax.Array, y: jax.Array | None = None) -> None:
    """Non-centered eight schools: theta = mu + tau * theta_raw."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_raw = numpyro.sample(
        "theta_raw", dist.Normal(0.0, 1.0).expand(sigma.shape[-1:]).to_event(1)
    )
    numpyro.sample("y", dist.Normal(mu + tau * theta_raw, sigma).to_event(1), obs=y)


def logistic(x: jax.Array, y: jax.Array | None = None) -> None:
    """Logistic regression: alpha, beta ~ N(0, 1), y_n ~ Bernoulli(logit)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, 1.0).expand(x.shape[-1:]).to_event(1)
    )
    numpyro.sample("y", dist.Bernoulli(logits=alpha + x @ beta).to_event(1), obs=y)


def _logistic_design() -> np.ndarray:
    """The fixed (N, P) standard-normal design matrix of ``logistic``."""
    rng = np.random.default_rng(LOGISTIC_DESIGN_SEED)
    return rng.standard_normal((LOGISTIC_NUM_OBS, LOGISTIC_NUM_PREDICTORS))


class SBCModel(NamedTuple):
    """A model for SBC: what to simulate, what to rank, how to sample it.

    Attributes:
        name: Test id.
        model: NumPyro model ``model(*inputs, y=None)``.
        inputs: Builds the fixed (non-simulated) model arguments.
        params: Latent sites whose every scalar element is ranked.
        sampler_kwargs: Extra sampler settings this model needs.
        max_divergent: Largest accepted fraction of divergent kept draws: 0.1%
            for the log-concave posteriors (a divergence there means a broken
            step size), 1% for eight schools, whose curvature still varies
            with tau after non-centering.
    """

    name: str
    model: Callable[..., None]
    inputs: Callable[[], tuple[np.ndarray, ...]]
    params: tuple[str, ...]
    sampler_kwargs: dict[str, Any]
    max_divergent: float


class Simulation(NamedTuple):
    """Prior draws and the data simulated from them, one row per data set.

    Attributes:
        truths: Latent site -> ``(num_datasets, *site_shape)`` true values.
        args: Model arguments stacked on a leading ``num_datasets`` axis,
            ready for ``BatchSampler.run``.
    """

    truths: dict[str, np.ndarray]
    args: tuple[np.ndarray, ...]


def simulate(case: SBCModel, num_datasets: int, seed: int) -> Simulation:
    """Draws ``num_datasets`` (parameters, data) pairs from the prior.

    Args:
        case: The model to simulate.
        num_datasets: Number of prior draws.
        seed: Seed of the prior predictive draw.

    Returns:
        True parameter values and the stacked model arguments.
    """
    inputs = case.inputs()
    prior = Predictive(case.model, num_samples=num_datasets)
    draws = prior(jax.random.key(seed), *(jnp.asarray(x) for x in inputs))
    truths = {site: np.asarray(draws[site]) for site in case.params}
    stacked = tuple(
        np.broadcast_to(np.asarray(x), (num_datasets, *np.shape(x))) for x in inputs
    )
    return Simulation(truths, (*stacked, np.asarray(draws["y"])))


SBC_MODELS: dict[str, SBCModel] = {
    m.name: m
    for m in (
        SBCModel(
            name="normal_mean",
            model=normal_mean,
            inputs=lambda: (np.ones(NORMAL_NUM_OBS),),
            params=("mu",),
            sampler_kwargs={},
            max_divergent=0.001,
        ),
        SBCModel(
            name="eight_schools_noncentered",
            model=eight_schools,
            inputs=lambda: (np.asarray(SCHOOL_SDS),),
            params=("mu", "tau", "theta_raw"),
            sampler_kwargs={"target_accept_prob": 0.9},
            max_divergent=0.01,
        ),
        SBCModel(
            name="logistic",
            model=logistic,
            inputs=lambda: (_logistic_design(),),
            params=("alpha", "beta"),
            sampler_kwargs={},
            max_divergent=0.001,
        ),
    )
}
