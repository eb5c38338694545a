"""What a NumPyro model looks like to the sampler: sites, potential, constrain.

The model is traced abstractly (``jax.eval_shape``): no array is computed and
nothing is compiled, so bad models fail fast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np
import numpyro
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import constrain_fn, potential_energy


class ModelInfo(NamedTuple):
    """Static facts about a model for one argument signature.

    Attributes:
        latent: Latent continuous sample sites, name -> constrained shape.
        unconstrained: The same sites in unconstrained space (what NUTS
            moves), name -> ``jax.ShapeDtypeStruct``.
        deterministic: Names of ``numpyro.deterministic`` sites.
        observed: Names of observed sample sites.
        enumerated: Discrete latent sites marginalized by enumeration
            (``infer={"enumerate": "parallel"}``, as NumPyro's NUTS does).
        max_plate_nesting: Plates nested around any sample site (enumeration
            puts its dimensions to the left of them).
    """

    latent: dict[str, tuple[int, ...]]
    unconstrained: dict[str, jax.ShapeDtypeStruct]
    deterministic: tuple[str, ...]
    observed: tuple[str, ...]
    enumerated: tuple[str, ...] = ()
    max_plate_nesting: int = 0


def inspect_model(model: Callable, args: tuple, kwargs: dict) -> ModelInfo:
    """Trace ``model(*args, **kwargs)`` abstractly and check NUTS can run it.

    Raises:
        ValueError: The model has discrete latent sites, ``param`` sites, or
            no latent site at all.
    """
    sites: dict[str, dict[str, Any]] = {}

    def _record(a: tuple, k: dict) -> dict:
        # init_to_uniform: improper priors (ImproperUniform) cannot be sampled.
        traced = substitute(seed(model, rng_seed=0), substitute_fn=init_to_uniform)
        tr = trace(traced).get_trace(*a, **k)
        unconstrained = {}
        for name, site in tr.items():
            entry = {"type": site["type"], "shape": np.shape(site.get("value"))}
            if site["type"] == "sample":
                entry["observed"] = bool(site["is_observed"])
                entry["discrete"] = bool(site["fn"].support.is_discrete)
                entry["enumerate"] = (site.get("infer") or {}).get("enumerate")
                dims = [f.dim for f in site["cond_indep_stack"] if f.dim is not None]
                entry["nesting"] = -min(dims) if dims else 0
                if not (entry["observed"] or entry["discrete"]):
                    support = biject_to(site["fn"].support)
                    unconstrained[name] = support.inv(site["value"])
            sites[name] = entry
        return unconstrained

    unconstrained = jax.eval_shape(_record, args, kwargs)
    samples = {n: s for n, s in sites.items() if s["type"] == "sample"}
    discrete = [n for n, s in samples.items() if s["discrete"] and not s["observed"]]
    enumerated = tuple(n for n in discrete if samples[n]["enumerate"] == "parallel")
    if set(discrete) - set(enumerated):
        raise ValueError(
            f"model has discrete latent sites {sorted(set(discrete) - set(enumerated))}"
            "; NUTS samples continuous parameters only. Mark them "
            "infer={'enumerate': 'parallel'} to marginalize them by enumeration "
            "(as NumPyro's NUTS does; needs pip install 'chainmesh[enum]'), sum "
            "the likelihood over their values in the model, or pass them as data"
        )
    if enumerated:
        try:
            import funsor  # noqa: F401
        except ImportError:
            raise ValueError(
                f"model has enumerated discrete sites {list(enumerated)}; "
                "marginalizing them needs funsor: pip install 'chainmesh[enum]'"
            ) from None
    params = [n for n, s in sites.items() if s["type"] in ("param", "mutable")]
    if params:
        raise ValueError(
            f"model has param/mutable sites {params}; NUTS samples only "
            "`numpyro.sample` sites. Give them a prior with numpyro.sample, or "
            "pass fixed values as model arguments"
        )
    latent = {
        n: s["shape"]
        for n, s in samples.items()
        if not s["observed"] and n not in enumerated
    }
    if not latent:
        raise ValueError(
            "model has no latent sample site; there is nothing for NUTS to sample"
        )
    return ModelInfo(
        latent=latent,
        unconstrained=unconstrained,
        deterministic=tuple(
            n for n, s in sites.items() if s["type"] == "deterministic"
        ),
        observed=tuple(n for n, s in samples.items() if s["observed"]),
        enumerated=enumerated,
        max_plate_nesting=max((s["nesting"] for s in samples.values()), default=0),
    )


def prepared(model: Callable, info: ModelInfo) -> Callable:
    """The model NUTS runs: enumerated sites marginalized, if any (NumPyro's
    ``enum(config_enumerate(model), -max_plate_nesting - 1)``)."""
    if not info.enumerated:
        return model
    from numpyro.contrib.funsor import config_enumerate, enum

    return enum(config_enumerate(model), -info.max_plate_nesting - 1)


def potential_fn(
    model: Callable, args: tuple, kwargs: dict, enum: bool = False
) -> Callable:
    """Potential energy of unconstrained params, for this data (``enum``:
    enumerated discrete sites summed out, with funsor)."""
    return partial(potential_energy, model, args, kwargs, enum=enum)


def postprocess_fn(model: Callable, args: tuple, kwargs: dict) -> Callable:
    """Constrained latent values plus deterministic sites, for this data."""
    return partial(constrain_fn, model, args, kwargs, return_deterministic=True)


def potential_fn_gen(model: Callable, enum: bool = False) -> Callable:
    """``(*args, **kwargs) -> potential_fn``, the form NumPyro's ``hmc`` takes."""

    def gen(*args: Any, **kwargs: Any) -> Callable:
        return potential_fn(model, args, kwargs, enum)

    return gen


def nonfinite_sites(model: Callable, args: tuple, kwargs: dict, z: dict) -> list[str]:
    """Sites whose log density is not finite at unconstrained values ``z``.

    Used only to explain a failed initialization, so it runs eagerly.
    """
    with numpyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = constrain_fn(model, args, kwargs, z)
        tr = trace(substitute(seed(model, rng_seed=0), data=values)).get_trace(
            *args, **kwargs
        )
    bad = []
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log_prob = np.asarray(site["fn"].log_prob(site["value"]))
        if not np.all(np.isfinite(log_prob)) or not np.all(
            np.isfinite(np.asarray(site["value"]))
        ):
            bad.append(name)
    return bad


def invalid_init_error(
    model: Callable, data: tuple, z: dict, bad: np.ndarray, batched: bool
) -> ValueError:
    """The error for lanes without a valid initial point, naming sites.

    Args:
        data: ``(args, kwargs)`` of the first bad lane.
        z: Its unconstrained values.
        bad: Indices of the bad lanes: ``(chain,)`` or ``(data set, chain)``.
    """
    if batched:
        where_chain = f"(data set, chain) {[tuple(map(int, b)) for b in bad]}"
    else:
        where_chain = f"chains {bad[:, 0].tolist()}"
    sites = nonfinite_sites(model, *data, z)
    where = f"at sites {sites}" if sites else "(its gradient is not finite)"
    return ValueError(
        f"no valid initial point for {where_chain}: the log density is "
        f"not finite {where} after 100 tries. Check init_params are inside each "
        "site's support and the data are finite, or use another init_strategy "
        "(e.g. 'init_to_sample')"
    )
