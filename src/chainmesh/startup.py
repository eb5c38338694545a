"""The start of a run: data split and placed, programs found or built, init run.

Everything before the first chunk: static arguments are split from data (a
model that turns out to need an array's value is retried with it static),
the programs are looked up in the process-wide cache or lowered and compiled
side by side, and the init program gives every chain its first state.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from chainmesh import arguments, persistent, placement
from chainmesh.building import STAGES, Programs, build
from chainmesh.cache import CACHE, COMPILE_LOCK, signature
from chainmesh.init_strategies import resolve_init_strategy
from chainmesh.kernels import build_kernel
from chainmesh.keys import layout_init_params, seed_keys
from chainmesh.model import inspect_model, invalid_init_error, prepared
from chainmesh.program import chunk_program, init_program
from chainmesh.validation import check_finite


class Started(NamedTuple):
    """A run after its init program: programs, placed data, initial state."""

    programs: Programs
    data: tuple
    state: Any
    real: Any
    compile_s: float
    compilations: int
    init_s: float
    stages: dict[str, float]
    static: tuple[str, ...]


def _programs(
    sampler: Any, call: arguments.Call
) -> tuple[Programs, tuple, arguments.Call, arguments.BoundModel]:
    """Place the call's data, look up (or inspect and build) the programs.

    Returns ``(programs, placed data, call, bound model)``. A model that
    needs an array argument's value while it is traced is retried with that
    argument static (once per sampler, with a warning); if nothing helps, the
    model's own error is raised (``arguments.find_static``).
    """
    config, mesh = sampler.config, sampler.mesh
    if config.check_data:
        check_finite(*call.passed)  # as the user passed them, for the names
    place = placement.shard_data if sampler._batched else placement.replicate
    data = place((call.args, call.kwargs), mesh)
    bound = call.model
    key = sampler._cache_key(signature(data), bound)
    programs = CACHE.get(key)  # a warm call never waits for another's compile
    if programs is not None:
        return programs, data, call, bound
    with COMPILE_LOCK:
        programs = CACHE.get(key)  # compiled while this thread waited?
        if programs is not None:
            return programs, data, call, bound
        try:
            info = inspect_model(bound, *sampler._one_dataset(data))
        except arguments.NEEDS_VALUE as err:
            found = arguments.find_static(call, err, sampler._batched)
            warnings.warn(
                f"{getattr(sampler.model, '__name__', 'the model')} needs the "
                f"values of {found} while it is traced; chainmesh compiles them "
                "into the program (static), so a new value compiles again. To keep "
                "every call compile-free, compute what the model needs from them "
                "outside (e.g. a Python int) and pass that instead",
                UserWarning,
                stacklevel=5,
            )
            found_programs = _programs(sampler, call.with_static(found))
            # Kept static for later calls only once the model traced with them.
            sampler._auto_static = (*sampler._auto_static, *found)
            return found_programs
        except Exception as err:
            _note_static(err, call)
            raise
        kernel = build_kernel(prepared(bound, info), config, info)
        programs = Programs(info=info, kernel=kernel)
        CACHE.put(key, programs)
    return programs, data, call, bound


def _check_var_names(names: tuple[str, ...] | None, info: Any) -> None:
    """Refuse ``var_names`` that are not sites of the model (before compiling)."""
    sites = (*info.latent, *info.deterministic)
    unknown = sorted(set(names or ()) - set(sites))
    if unknown:
        raise ValueError(
            f"var_names names {unknown}, which the model does not sample; pass "
            f"names of its sample or deterministic sites: {sorted(sites)}"
        )


def _note_static(err: Exception, split: Any) -> None:
    """Say which static values the model got, on an error while tracing it."""
    if split.names:
        shown = dict(zip(split.names, split.values, strict=True))
        err.add_note(
            f"chainmesh passed {shown!r} to the model as static Python values "
            "(not arrays); pass an array where the model expects data"
        )


def start(sampler: Any, seed: Any, call: arguments.Call, init_params: Any) -> Started:
    """Validate and place the call's data, find or build the programs, run init."""
    config, plan, mesh = sampler.config, sampler.plan, sampler.mesh
    if config.init_strategy == "init_to_value" and init_params is None:
        raise ValueError(
            "init_strategy='init_to_value' needs init_params (site name -> "
            "value); pass them, or choose another init_strategy"
        )
    programs, data, split, bound = _programs(sampler, call)
    sampler.info = programs.info
    _check_var_names(config.var_names, programs.info)
    dtype = np.dtype(jax.numpy.result_type(float))
    values = layout_init_params(
        init_params, programs.info.latent, plan.num_chains, plan.total_chains, dtype
    )
    missing = sorted(set(programs.info.latent) - set(values))
    if config.init_strategy == "init_to_value" and missing:
        warnings.warn(
            f"init_params gives no value for sites {missing}; they start from "
            "init_to_uniform (NumPyro's init_to_value fallback). Pass values "
            "for them, or pick init_strategy='init_to_median' to fill them in",
            UserWarning,
            stacklevel=5,
        )
    root, given, use_given = seed_keys(
        seed, plan.num_chains, plan.total_chains, batched=sampler._batched
    )
    chains = np.arange(plan.total_chains, dtype=np.int32)
    init_args = (
        placement.replicate(root, mesh),
        placement.shard_chains(chains, mesh),
        placement.shard_chains(given, mesh),
        placement.replicate(np.asarray(use_given), mesh),
        placement.shard_chains(values, mesh),
        *data,
    )
    if sampler._batched:
        shards = np.arange(len(sampler._lanes()), dtype=np.int32)
        shards = placement.shard_data(shards, mesh)
        init_args = (init_args[0], shards, *init_args[1:])
    lanes = (placement.shard_data if sampler._batched else placement.shard_chains)(
        sampler._lanes(), mesh
    )
    stages = dict.fromkeys(STAGES, 0.0)
    values_key = signature(values)
    compile_s, built = 0.0, 0
    if values_key not in programs.inits or programs.chunk is None:
        # Only a cold call takes the lock and opens the disk cache.
        t0 = time.perf_counter()
        built = _build(
            sampler,
            programs,
            split,
            bound,
            (init_args, values_key),
            lanes,
            data,
            stages,
        )
        compile_s = time.perf_counter() - t0 if built else 0.0
    t0 = time.perf_counter()
    state, valid = programs.inits[values_key](*init_args)
    _check_init(sampler, bound, state, placement.to_host(valid), data)
    init_s = time.perf_counter() - t0
    return Started(
        programs, data, state, lanes, compile_s, built, init_s, stages, split.names
    )


def _build(
    sampler: Any,
    programs: Programs,
    split: Any,
    bound: Any,
    init: tuple[tuple, Any],
    lanes: Any,
    data: tuple,
    stages: dict[str, float],
) -> int:
    """Lower and compile the programs ``programs`` lacks; how many were built.

    Args:
        init: ``(init program arguments, key in programs.inits)``.
    """
    config, mesh = sampler.config, sampler.mesh
    init_args, values_key = init
    with COMPILE_LOCK, persistent.active(config.cache_dir):
        strategy = resolve_init_strategy(config.init_strategy)
        chunk = None
        if programs.chunk is None:
            scalars = [
                placement.replicate(np.asarray(v, dtype=t), mesh)
                for v, t in (
                    (1, np.int32),
                    (1, np.int32),
                    (True, np.bool_),
                    (-1, np.int32),
                )
            ]
            jitted = chunk_program(
                prepared(bound, programs.info),
                programs.kernel,
                config.inner,
                config.chunk,
                mesh,
                sampler._batched,
                config.lanes,
            )
            chunk = (jitted, (lanes, *scalars, *data))
        inner = "vmap" if config.inner == "async" else config.inner
        program = init_program(programs.kernel, strategy, inner, mesh, sampler._batched)
        try:
            return build(
                programs,
                (program, init_args, values_key),
                chunk,
                mesh,
                sampler._batched,
                stages,
            )
        except Exception as err:
            _note_static(err, split)
            raise


def _check_init(
    sampler: Any, model: Any, state: Any, valid: np.ndarray, data: tuple
) -> None:
    real = tuple(slice(0, k) for k in sampler._keep())
    bad = np.argwhere(~valid[real])
    if bad.size:
        z = {k: placement.to_host(v)[tuple(bad[0])] for k, v in state.z.items()}
        if sampler._batched:  # the first bad lane's data set
            data = jax.tree.map(lambda x: placement.to_host(x)[bad[0][0]], data)
        with COMPILE_LOCK:  # traces the model eagerly
            raise invalid_init_error(model, data, z, bad, sampler._batched)
