"""ArviZ ``InferenceData`` from a chainmesh ``Result``.

Groups and names follow ``arviz.from_numpyro``: ``posterior`` with ``chain`` and
``draw`` dims and site dims named after the model's plates where the shapes
allow it (``<site>_dim_<i>`` otherwise); ``sample_stats`` with ArviZ's names;
``observed_data`` from the model's observed sites. ArviZ is an optional extra
(``pip install chainmesh[arviz]``), imported only when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from einops import rearrange
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import log_likelihood as numpyro_log_likelihood
from numpyro.infer.initialization import init_to_uniform

from chainmesh.cache import COMPILE_LOCK

if TYPE_CHECKING:
    from arviz import InferenceData

    from chainmesh.result import Result

STAT_NAMES = {
    "potential_energy": "lp",
    "energy": "energy",
    "diverging": "diverging",
    "accept_prob": "acceptance_rate",
    "num_steps": "n_steps",
    "step_size": "step_size",
    "tree_depth": "tree_depth",
}
"""chainmesh extra field -> ArviZ ``sample_stats`` name (``lp`` is negated)."""


def _import_arviz():
    try:
        import arviz
    except ImportError as err:
        raise ImportError(
            "Result.to_arviz needs ArviZ: pip install chainmesh[arviz]"
        ) from err
    return arviz


def _trace(model: Callable, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """One concrete run of the model: site shapes, plates, observed values."""
    traced = substitute(seed(model, rng_seed=0), substitute_fn=init_to_uniform)
    return trace(traced).get_trace(*args, **kwargs)


def _site_dims(site: dict) -> list[str | None]:
    """Plate names at the positions of a site's batch dims; None elsewhere.

    A plate's ``dim`` counts from the right of the batch shape (event dims of a
    sample site come after it); a name is used only where the site's size
    equals the plate's, so broadcast or subsampled dims keep default names.
    """
    shape = np.shape(site["value"])
    event_dim = site["fn"].event_dim if site["type"] == "sample" else 0
    batch_ndim = len(shape) - event_dim
    dims: list[str | None] = [None] * len(shape)
    for frame in site["cond_indep_stack"]:
        pos = batch_ndim + frame.dim
        if 0 <= pos < batch_ndim and shape[pos] == frame.size:
            dims[pos] = frame.name
    return dims


def model_dims(model_trace: Mapping[str, dict]) -> dict[str, list[str | None]]:
    """Site name -> dims from the model's plates, for sites inside a plate.

    Example:
        >>> from numpyro.handlers import seed, trace
        >>> model_dims(trace(seed(model, 0)).get_trace(X, y))
        {'y': ['obs']}

    Args:
        model_trace: A NumPyro trace of the model (``numpyro.handlers.trace``).
    """
    out = {}
    for name, site in model_trace.items():
        if site["type"] not in ("sample", "deterministic"):
            continue
        dims = _site_dims(site)
        if any(d is not None for d in dims):
            out[name] = dims
    return out


def _observed_data(model_trace: Mapping[str, dict]) -> dict[str, np.ndarray]:
    """Observed site name -> its data, from a trace of the model."""
    return {
        name: np.asarray(site["value"])
        for name, site in model_trace.items()
        if site["type"] == "sample" and site["is_observed"]
    }


def _sample_stats(extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """chainmesh's extra fields under ArviZ's names; ``lp = -potential_energy``."""
    stats = {}
    for field, value in extra.items():
        name = STAT_NAMES.get(field, field)
        stats[name] = -np.asarray(value) if field == "potential_energy" else value
    return stats


def _by_chain(name: str, x: Any, num_chains: int, num_draws: int) -> np.ndarray:
    """``(chains, draws, ...)`` from grouped or chain-major flat draws."""
    x = np.asarray(x)
    if x.shape[:2] == (num_chains, num_draws):
        return x
    if x.ndim >= 1 and x.shape[0] == num_chains * num_draws:
        return rearrange(x, "(c d) ... -> c d ...", c=num_chains)
    raise ValueError(
        f"{name} has shape {x.shape}; expected ({num_chains}, {num_draws}, ...) "
        f"or ({num_chains * num_draws}, ...): one value per draw of the result"
    )


def to_arviz(
    result: Result,
    *,
    posterior_predictive: Mapping[str, Any] | None = None,
    log_likelihood: bool = False,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
) -> InferenceData:
    """Convert a ``Result`` to an ArviZ ``InferenceData``.

    Example:
        >>> idata = to_arviz(result)
        >>> idata.posterior["beta"].dims
        ('chain', 'draw', 'beta_dim_0')
        >>> float(arviz.bfmi(idata).min()) > 0.3
        True

    Args:
        result: What ``Sampler.run`` returned.
        posterior_predictive: Site name -> draws, e.g. from
            ``numpyro.infer.Predictive``, shaped ``(chains, draws, ...)`` or
            flat chain-major ``(chains * draws, ...)``.
        log_likelihood: Add the pointwise log likelihood of every observed
            site (for ``az.loo`` / ``az.waic``); one model evaluation per draw.
        coords: Extra coordinates, dim name -> values.
        dims: Site name -> dim names, overriding the names from plates.

    Returns:
        ``InferenceData`` with ``posterior``, ``sample_stats``, and, when the
        model has observed sites, ``observed_data`` (and ``log_likelihood``,
        ``posterior_predictive`` when asked for).

    Raises:
        ImportError: ArviZ is not installed.
    """
    az = _import_arviz()
    groups: dict[str, Any] = {
        "posterior": {k: np.asarray(v) for k, v in result.samples.items()},
        "sample_stats": _sample_stats(result.extra),
    }
    site_dims: dict[str, list[str | None]] = {}
    if result.model is not None:
        # NumPyro's handler stack is global: trace only under the lock that
        # every other trace in the process holds.
        with COMPILE_LOCK:
            model_trace = _trace(result.model, result.model_args, result.model_kwargs)
        site_dims = model_dims(model_trace)
        observed = _observed_data(model_trace)
        if observed:
            groups["observed_data"] = observed
        if log_likelihood:
            flat = result.get_samples(group_by_chain=False)
            with COMPILE_LOCK:
                pointwise = numpyro_log_likelihood(
                    result.model, flat, *result.model_args, **result.model_kwargs
                )
            groups["log_likelihood"] = {
                k: _by_chain(k, v, result.num_chains, result.num_draws)
                for k, v in pointwise.items()
            }
    elif log_likelihood:
        raise ValueError("log_likelihood=True needs result.model (set by run)")
    if posterior_predictive is not None:
        groups["posterior_predictive"] = {
            k: _by_chain(k, v, result.num_chains, result.num_draws)
            for k, v in posterior_predictive.items()
        }
    site_dims.update(dims or {})
    return az.from_dict(
        **groups,
        coords=dict(coords or {}),
        dims=site_dims,
        attrs={"inference_library": "chainmesh"},
    )
