"""What ``chainmesh bench --suite`` samples: its targets and configurations.

A ``Target`` is one posterior: a NumPyro model, its data, the sampler
settings it needs and, where one is known, a reference mean and sd per scalar
parameter. ``suite_targets("posteriordb")`` gives the ten posteriordb
posteriors of ``chainmesh.bench.posteriors``; ``suite_targets("models")`` the
benchmark models, with exact references where the posterior is known in
closed form (the Gaussians, the funnel's ``v``) and none otherwise (the
verdict then rests on R-hat alone).

``CONFIGS`` are the chainmesh configurations, the correctness harness's too
(``tests/harness/configs.py`` reads them from here), by the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from chainmesh.bench.models import bench_data
from chainmesh.bench.posteriors import POSTERIORS, stan_draws

SUITES = ("posteriordb", "models")

CONFIGS: dict[str, dict[str, Any]] = {
    "nuts-vmap": {"inner": "vmap", "metric": "diag"},
    "nuts-map": {"inner": "map"},
    "nuts-ensemble": {"adapt": "ensemble"},
    "nuts-fisher": {"metric": "fisher"},
    "nuts-lowrank": {"metric": "lowrank"},
    "nuts-ensemble-fisher": {"adapt": "ensemble", "metric": "fisher"},
    "nuts-ensemble-lowrank": {"adapt": "ensemble", "metric": "lowrank"},
    "chees": {"kernel": "chees"},
    "chees-fisher": {"kernel": "chees", "metric": "fisher"},
    "chees-lowrank": {"kernel": "chees", "metric": "lowrank"},
    "mams": {"kernel": "mams"},
    "nuts-async": {"inner": "async"},
    # One lane for every two chains: lanes hand chains over as they finish.
    "nuts-async-lanes": {"inner": "async", "lanes": 1, "devices": 2},
}
"""chainmesh configuration name -> ``Sampler`` options (``devices`` apart)."""

UNSUPPORTED: dict[str, tuple[str, ...]] = {
    # A Fisher or low-rank metric replaces a posterior's dense one.
    "nuts-fisher": ("dense_mass",),
    "nuts-lowrank": ("dense_mass",),
    "nuts-ensemble-fisher": ("dense_mass",),
    "nuts-ensemble-lowrank": ("dense_mass",),
    # ChEES adapts its own acceptance target (0.651) and no dense metric: a
    # posterior's dense_mass=True would conflict with its metric.
    "chees": ("dense_mass", "target_accept_prob"),
    "chees-fisher": ("dense_mass", "target_accept_prob"),
    "chees-lowrank": ("dense_mass", "target_accept_prob"),
    "mams": ("dense_mass", "target_accept_prob"),
}
"""Target settings a configuration does not take (a metric other than the
dense one; ChEES and MAMS: their own acceptance targets)."""

DEFAULT_CONFIGS = ("nuts-vmap", "nuts-ensemble", "chees")
"""The configurations ``--quick`` runs: one per kernel and adaptation; the
other three run the same algorithm with another schedule on a device."""

PEERS = (
    "numpyro",
    "blackjax:nuts",
    "blackjax:chees",
    "blackjax:mams",
    "nutpie",
    "nutpie:lowrank",
)
"""Peer samplers, in table order; ``numpyro`` is every ratio's baseline.
``nutpie`` adapts a diagonal metric (a low-rank one where the posterior asks
for a dense mass matrix), ``nutpie:lowrank`` its low-rank metric everywhere."""


class Target(NamedTuple):
    """One posterior of a suite.

    Attributes:
        name: The posterior's name in tables (posteriordb's folder name).
        model: NumPyro model taking ``args`` positionally.
        args: Its data, as arrays.
        reference: Scalar parameter name -> (mean, sd); may be empty.
        named: Samples ``{site: (chains, draws, ...)}`` -> ``{name: (chains,
            draws)}``, Stan-style 1-based names, every scalar to summarize.
        options: Sampler settings the posterior needs (``dense_mass``).
    """

    name: str
    model: Callable[..., None]
    args: tuple
    reference: dict[str, tuple[float, float]]
    named: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    options: dict[str, Any]


def config_options(config: str, target_options: dict[str, Any]) -> dict[str, Any]:
    """``Sampler`` options of ``config`` on a target (``devices`` apart)."""
    dropped = UNSUPPORTED.get(config, ())
    kept = {k: v for k, v in target_options.items() if k not in dropped}
    own = {k: v for k, v in CONFIGS[config].items() if k != "devices"}
    return {**own, **kept}


def config_devices(config: str, default: int) -> int:
    """Devices ``config`` runs on: its own ``devices``, else ``default``."""
    return CONFIGS[config].get("devices", default)


def correlated(scale_tril: jnp.ndarray) -> None:
    """A zero-mean Gaussian with covariance ``scale_tril @ scale_tril.T``."""
    d = scale_tril.shape[-1]
    numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(d), scale_tril=scale_tril))


def correlated_args(d: int = 100, rho: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor and sds of ``cov_ij = s_i s_j rho^|i-j|`` (an AR(1)
    correlation) with sds ``s`` log-spaced over a decade."""
    sds = np.logspace(-0.5, 0.5, d)
    lag = np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    cov = np.outer(sds, sds) * rho**lag
    return np.linalg.cholesky(cov).astype(np.float32), sds


def _all_sites(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return stan_draws(samples, sorted(samples))


def _posteriordb(name: str) -> Target:
    p = POSTERIORS[name]
    return Target(
        name, p.model, p.args(p.data()), p.reference, p.stan_draws, p.sampler_kwargs
    )


def _bench_model(name: str, reference: dict[str, tuple[float, float]]) -> Target:
    example = bench_data(name, 0)
    return Target(name, example.model, example.args, reference, _all_sites, {})


def _zero_mean(sds: Sequence[float]) -> dict[str, tuple[float, float]]:
    return {f"x[{i + 1}]": (0.0, float(s)) for i, s in enumerate(sds)}


def _models() -> dict[str, Callable[[], Target]]:
    tril, sds = correlated_args()
    return {
        "logistic": partial(_bench_model, "logistic", {}),
        "eight_schools": partial(_bench_model, "eight_schools", {}),
        "correlated100": lambda: Target(
            "correlated100", correlated, (tril,), _zero_mean(sds), _all_sites, {}
        ),
        # x's marginals have heavy tails: its sample sd is no test; v ~ N(0, 3).
        "funnel10": partial(_bench_model, "funnel10", {"v": (0.0, 3.0)}),
        "diamonds": partial(_bench_model, "diamonds", {}),
    }


def suite_names(suite: str) -> list[str]:
    """The posteriors of ``suite``, in table order."""
    if suite == "posteriordb":
        return list(POSTERIORS)
    if suite == "models":
        return list(_models())
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


def load_target(suite: str, name: str) -> Target:
    """Target ``name`` of ``suite`` with its data loaded."""
    if name not in suite_names(suite):
        raise ValueError(
            f"{name!r} is not a posterior of suite {suite!r}; choose from "
            f"{', '.join(suite_names(suite))}"
        )
    return _posteriordb(name) if suite == "posteriordb" else _models()[name]()
