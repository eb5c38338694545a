"""NumPyro models of posteriordb reference posteriors, with their data and references.

The ten posteriors of the public posterior database (stan-dev/posteriordb)
that the correctness harness (``tests/harness``) checks every sampler
configuration against and ``chainmesh bench --suite posteriordb`` scores;
``posteriordb/<name>/`` beside this module holds each one's ``data.json`` and
``reference.json`` (means and sds of the database's gold-standard draws), so
they ship with the package.

Every model takes all of its data as array arguments (no closure constants;
shapes come from the arrays, never from data-sized Python ints), so one
compiled program serves any data set of the same shapes. ``POSTERIORS`` maps a
posteriordb folder name to a ``Posterior`` bundling the model, its argument
builder, the reference summary, the map from NumPyro sites to Stan names and
the sampler settings the posterior needs.

Precision: all ten posteriors pass in float32, so none sets ``x64=True``.
diamonds-diamonds was the candidate (N = 5000, a 24-column design with
condition number ~700, Intercept sd 0.0018 at mean 7.79), but with a dense mass
matrix its float32 draws match the reference (both configs; seeds 0-3 on vmap):
float32 resolves 7.79 to ~5e-7, far below its Monte-Carlo error (~3e-5), and
the dense metric keeps trajectories short (~16 leapfrog steps). ``x64=True``
stays available for a posterior or kernel that needs it; the test then samples
in float64 (data included).

Mass matrix: diamonds-diamonds uses ``dense_mass=True``. With a diagonal mass
matrix its trees run to ~900 leapfrog steps (max tree depth 10) and the test
takes ~170 s instead of ~10 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

DATA_DIR = Path(__file__).parent / "posteriordb"

# A two-component mixture is fixed model structure, not data.
_NUM_COMPONENTS = 2


def _flat(
    support: constraints.Constraint, event_shape: tuple[int, ...] = ()
) -> dist.ImproperUniform:
    """Improper flat prior on ``support`` (Stan's default prior)."""
    return dist.ImproperUniform(support, (), event_shape)


def _with_intercept(*columns: jax.Array) -> jax.Array:
    """Stacks columns into a design matrix whose first column is ones."""
    return jnp.stack([jnp.ones_like(columns[0]), *columns], axis=-1)


def kidiq_momiq(mom_iq: jax.Array, kid_score: jax.Array) -> None:
    """kidiq-kidscore_momiq: flat beta, sigma ~ HalfCauchy(2.5)."""
    x = _with_intercept(mom_iq)
    beta = numpyro.sample("beta", _flat(constraints.real, x.shape[-1:]))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("kid_score", dist.Normal(x @ beta, sigma), obs=kid_score)


def mesquite_log(
    diam1: jax.Array,
    diam2: jax.Array,
    canopy_height: jax.Array,
    total_height: jax.Array,
    density: jax.Array,
    group: jax.Array,
    weight: jax.Array,
) -> None:
    """mesquite-logmesquite: log-linear regression, flat beta and sigma > 0."""
    logs = [jnp.log(v) for v in (diam1, diam2, canopy_height, total_height, density)]
    x = _with_intercept(*logs, group)
    beta = numpyro.sample("beta", _flat(constraints.real, x.shape[-1:]))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample("log_weight", dist.Normal(x @ beta, sigma), obs=jnp.log(weight))


def ark(lags: jax.Array, y: jax.Array) -> None:
    """arK-arK: AR(K) with ``lags[i, k] = y[t_i - k - 1]`` for the modelled t."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, 10.0).expand(lags.shape[-1:]).to_event(1)
    )
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y)


def garch11(y: jax.Array, sigma1: jax.Array) -> None:
    """garch-garch11: flat priors on mu, alpha0 > 0 and the triangle of (a1, b1).

    ``beta1 = (1 - alpha1) * beta1_unit`` with ``beta1_unit`` flat on (0, 1); the
    factor ``log(1 - alpha1)`` is that map's Jacobian, which keeps the prior
    flat on (alpha1, beta1) as in Stan.
    """
    mu = numpyro.sample("mu", _flat(constraints.real))
    alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
    alpha1 = numpyro.sample("alpha1", _flat(constraints.unit_interval))
    beta1_unit = numpyro.sample("beta1_unit", _flat(constraints.unit_interval))
    numpyro.factor("beta1_jacobian", jnp.log1p(-alpha1))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)

    def step(var_prev: jax.Array, y_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
        var = alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * var_prev
        return var, var

    _, var = jax.lax.scan(step, sigma1**2, y[:-1])
    sigma = jnp.concatenate([jnp.reshape(sigma1, (1,)), jnp.sqrt(var)])
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def earnings_height(height: jax.Array, earn: jax.Array) -> None:
    """earnings-logearn_height: flat beta, flat sigma > 0."""
    x = _with_intercept(height)
    beta = numpyro.sample("beta", _flat(constraints.real, x.shape[-1:]))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample("log_earn", dist.Normal(x @ beta, sigma), obs=jnp.log(earn))


def blr(x: jax.Array, y: jax.Array) -> None:
    """sblrc-blr: beta ~ N(0, 10), sigma ~ HalfNormal(10)."""
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, 10.0).expand(x.shape[-1:]).to_event(1)
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(x @ beta, sigma), obs=y)


def gauss_mix(y: jax.Array) -> None:
    """low_dim_gauss_mix: ordered mu ~ N(0, 2), sigma ~ HalfNormal(2), theta."""
    mu = numpyro.sample("mu", _flat(constraints.ordered_vector, (_NUM_COMPONENTS,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample(
        "sigma", dist.HalfNormal(2.0).expand((_NUM_COMPONENTS,)).to_event(1)
    )
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = dist.Categorical(probs=jnp.stack([theta, 1.0 - theta]))
    numpyro.sample("y", dist.MixtureSameFamily(weights, dist.Normal(mu, sigma)), obs=y)


def kilpisjarvi(
    x: jax.Array,
    y: jax.Array,
    pmualpha: jax.Array,
    psalpha: jax.Array,
    pmubeta: jax.Array,
    psbeta: jax.Array,
) -> None:
    """kilpisjarvi_mod-kilpisjarvi: normal priors from data, flat sigma > 0."""
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def arma11(y: jax.Array) -> None:
    """arma-arma11: ARMA(1, 1) with err[0] = 0, the recursion run by ``scan``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    err1 = y[0] - (mu + phi * mu)

    def step(
        err_prev: jax.Array, y_pair: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        y_prev, y_t = y_pair
        err = y_t - (mu + phi * y_prev + theta * err_prev)
        return err, err

    _, errs = jax.lax.scan(step, err1, (y[:-1], y[1:]))
    err = jnp.concatenate([jnp.reshape(err1, (1,)), errs])
    numpyro.sample("err", dist.Normal(0.0, sigma), obs=err)


def diamonds(xc: jax.Array, x_mean: jax.Array, y: jax.Array) -> None:
    """diamonds-diamonds: b ~ N(0, 1) on centered columns, Student-t priors.

    ``xc`` is ``X`` without its column of ones, centered; ``x_mean`` holds the
    column means, so ``b_Intercept`` is the intercept on the uncentered scale.
    """
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand(xc.shape[-1:]).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    # |StudentT(3, 0, 10)| is the half-t: NumPyro has no HalfStudentT.
    sigma = numpyro.sample(
        "sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0))
    )
    numpyro.deterministic("b_Intercept", intercept - x_mean @ b)
    numpyro.sample("Y", dist.Normal(intercept + xc @ b, sigma), obs=y)


def _float(values: Any) -> jax.Array:
    """Data as an array of JAX's default float dtype."""
    return jnp.asarray(values, dtype=jnp.result_type(float))


def _fields(*names: str) -> Callable[[dict[str, Any]], tuple[jax.Array, ...]]:
    """Argument builder returning the named data fields, in order, as arrays."""

    def build(data: dict[str, Any]) -> tuple[jax.Array, ...]:
        return tuple(_float(data[n]) for n in names)

    return build


def _ark_args(data: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """Builds the (T-K, K) lag matrix and the modelled targets y[K:]."""
    y = np.asarray(data["y"], dtype=float)
    k, t = int(data["K"]), int(data["T"])
    lags = np.stack([y[k - j - 1 : t - j - 1] for j in range(k)], axis=-1)
    return _float(lags), _float(y[k:])


def _diamonds_args(data: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Drops ``X``'s column of ones and centers the rest (brms' ``Xc``)."""
    x = np.asarray(data["X"], dtype=float)[:, 1:]
    x_mean = x.mean(axis=0)
    return _float(x - x_mean), _float(x_mean), _float(data["Y"])


def stan_draws(
    samples: dict[str, np.ndarray], sites: Sequence[str]
) -> dict[str, np.ndarray]:
    """Flattens ``sites`` to Stan names: ``beta`` (c, d, 2) -> ``beta[1]``, ...

    Args:
        samples: Site name -> array of shape (chains, draws, *site_shape).
        sites: Sites to convert.

    Returns:
        Stan parameter name -> (chains, draws) array.
    """
    out: dict[str, np.ndarray] = {}
    for site in sites:
        x = np.asarray(samples[site])
        if x.ndim == 2:
            out[site] = x
            continue
        for index in np.ndindex(*x.shape[2:]):
            name = ",".join(str(i + 1) for i in index)
            out[f"{site}[{name}]"] = x[(slice(None), slice(None), *index)]
    return out


class Posterior(NamedTuple):
    """A reference posterior: model, data, reference summary and name map.

    Attributes:
        name: posteriordb folder name under ``DATA_DIR``.
        model: NumPyro model taking ``args(data)`` positionally.
        args: Builds the model's array arguments from ``data.json``.
        reference: Stan parameter name -> (mean, sd) of the reference draws.
        stan_draws: Maps sampled sites to Stan parameter names.
        sampler_kwargs: Extra sampler settings this posterior needs.
        x64: Sample in float64 (model arguments included).
    """

    name: str
    model: Callable[..., None]
    args: Callable[[dict[str, Any]], tuple[np.ndarray, ...]]
    reference: dict[str, tuple[float, float]]
    stan_draws: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    sampler_kwargs: dict[str, Any]
    x64: bool = False

    def data(self) -> dict[str, Any]:
        """Loads this posterior's ``data.json``."""
        return json.loads((DATA_DIR / self.name / "data.json").read_text())


def _reference(name: str) -> dict[str, tuple[float, float]]:
    """Reads (mean, sd) per parameter from ``reference.json``."""
    params = json.loads((DATA_DIR / name / "reference.json").read_text())["params"]
    return {k: (float(v["mean"]), float(v["sd"])) for k, v in params.items()}


def _posterior(
    name: str,
    model: Callable[..., None],
    args: Callable[[dict[str, Any]], tuple[np.ndarray, ...]],
    sites: Sequence[str],
    x64: bool = False,
    **sampler_kwargs: Any,
) -> Posterior:
    """Bundles a posterior, reading its reference from ``DATA_DIR``."""
    return Posterior(
        name=name,
        model=model,
        args=args,
        reference=_reference(name),
        stan_draws=partial(stan_draws, sites=tuple(sites)),
        sampler_kwargs=sampler_kwargs,
        x64=x64,
    )


POSTERIORS: dict[str, Posterior] = {
    p.name: p
    for p in (
        _posterior(
            "kidiq-kidscore_momiq",
            kidiq_momiq,
            _fields("mom_iq", "kid_score"),
            ("beta", "sigma"),
        ),
        _posterior(
            "mesquite-logmesquite",
            mesquite_log,
            _fields(
                "diam1",
                "diam2",
                "canopy_height",
                "total_height",
                "density",
                "group",
                "weight",
            ),
            ("beta", "sigma"),
        ),
        _posterior("arK-arK", ark, _ark_args, ("alpha", "beta", "sigma")),
        _posterior(
            "garch-garch11",
            garch11,
            _fields("y", "sigma1"),
            ("mu", "alpha0", "alpha1", "beta1"),
        ),
        _posterior(
            "earnings-logearn_height",
            earnings_height,
            _fields("height", "earn"),
            ("beta", "sigma"),
        ),
        _posterior("sblrc-blr", blr, _fields("X", "y"), ("beta", "sigma")),
        _posterior(
            "low_dim_gauss_mix-low_dim_gauss_mix",
            gauss_mix,
            _fields("y"),
            ("mu", "sigma", "theta"),
        ),
        _posterior(
            "kilpisjarvi_mod-kilpisjarvi",
            kilpisjarvi,
            _fields("x", "y", "pmualpha", "psalpha", "pmubeta", "psbeta"),
            ("alpha", "beta", "sigma"),
        ),
        _posterior(
            "arma-arma11", arma11, _fields("y"), ("mu", "phi", "theta", "sigma")
        ),
        _posterior(
            "diamonds-diamonds",
            diamonds,
            _diamonds_args,
            ("b", "Intercept", "sigma", "b_Intercept"),
            dense_mass=True,
        ),
    )
}
