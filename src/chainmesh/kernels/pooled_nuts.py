"""NUTS with ensemble adaptation: step size and mass matrix pooled over the mesh.

Every chain runs NumPyro's NUTS transition, with its own adaptation switched
off; after each warmup transition, one block-level update adapts shared
parameters from statistics pooled over every real chain of the mesh
(``ensemble.pooled_sum``, one collective per warmup transition):

- step size: NumPyro's dual averaging on ``target - mean acceptance
  probability`` (the mean over chains instead of one chain's value);
- mass matrix: NumPyro's Welford moments of the slow windows, merged from
  every chain's draws (diagonal or dense), regularized as NumPyro does;
- the same windows (``build_adaptation_schedule``) and the same restarts: at
  a slow window's end the pooled (co)variance becomes the metric and dual
  averaging restarts from the current step size, as NumPyro's NUTS does.

The state stays NumPyro's ``HMCState``: each lane's ``adapt_state`` holds the
shared values (replicated), so extra fields, checkpoints and resume need
nothing new. After warmup no collective runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import HMCState
from numpyro.infer.hmc_util import (
    HMCAdaptState,
    dual_averaging,
    welford_covariance,
)

from chainmesh.config import SamplerConfig
from chainmesh.kernels.base import Kernel
from chainmesh.kernels.ensemble import (
    first_lane,
    mass_schedule,
    pooled_sum,
    replicate,
)
from chainmesh.kernels.nuts import build_nuts, extra_fields
from chainmesh.model import ModelInfo

POOL_AXIS = "chain"
"""The mesh axis whose devices' chains pool (``chainmesh.mesh.CHAIN``); a
data-shard axis is never pooled over, so CMC shards adapt on their own."""


def build_pooled_nuts(
    model: Callable, config: SamplerConfig, info: ModelInfo
) -> Kernel:
    """NUTS whose adaptation pools every chain of the mesh (``adapt="ensemble"``).

    Returns a kernel whose ``init`` is NUTS's (per chain) and whose ``block``
    builds the block step: a vmapped NUTS transition without per-chain
    adaptation, then the pooled update while ``state.i < num_warmup``.
    """
    nuts = build_nuts(model, config, info)
    frozen = build_nuts(model, dataclasses.replace(config, num_warmup=0), info)
    num_warmup = config.num_warmup
    schedule = mass_schedule(num_warmup)  # NumPy: building must not compile
    ss_init, ss_update = dual_averaging()
    _, _, mm_final = welford_covariance(diagonal=not config.dense_mass)
    target = config.target_accept_prob

    def block(args: tuple, kwargs: dict, real: jax.Array) -> Callable:
        step = jax.vmap(partial(frozen.step, args=args, kwargs=kwargs))
        pool = partial(pooled_sum, real=real, axis_name=POOL_AXIS, reproducible=True)

        def restart(adapt: HMCAdaptState) -> HMCAdaptState:
            """At a slow window's end: the pooled (co)variance is the metric,
            and dual averaging restarts from the current step size (NumPyro's
            rule: ``prox_center = log(10 step_size)``)."""
            adapt = _new_metric(adapt, mm_final)
            prox = jnp.log(10.0).astype(adapt.step_size.dtype) + jnp.log(
                adapt.step_size
            )
            return adapt._replace(ss_state=ss_init(prox))

        def update(t: jax.Array, state: HMCState) -> HMCState:
            """The pooled warmup update after transition ``t``."""
            collect, window_end = (jnp.asarray(z) for z in schedule)
            adapt = first_lane(state.adapt_state)
            flat = jax.vmap(lambda z: ravel_pytree(z)[0])(state.z)
            (block_name,) = adapt.mm_state
            mean, m2, n = adapt.mm_state[block_name]
            dx = flat - mean
            square = dx * dx if m2.ndim == 1 else jnp.einsum("li,lj->lij", dx, dx)
            stats = {
                "n": jnp.ones_like(state.accept_prob),
                "accept": state.accept_prob,
                "s1": dx,
            }
            pooled = lax.cond(
                collect[t],
                lambda: pool({**stats, "s2": square}),
                lambda: {**pool(stats), "s2": 0 * m2},
            )
            ss = ss_update(target - pooled["accept"] / pooled["n"], adapt.ss_state)
            log_eps, log_eps_avg = ss[0], ss[1]
            eps = jnp.exp(jnp.where(t == num_warmup - 1, log_eps_avg, log_eps))
            finfo = jnp.finfo(eps.dtype)
            adapt = adapt._replace(
                step_size=jnp.clip(eps, finfo.tiny, finfo.max),
                ss_state=ss,
                mm_state={block_name: _merge((mean, m2, n), pooled, collect[t])},
            )
            adapt = lax.cond(window_end[t], restart, lambda a: a, adapt)
            return _broadcast(state, adapt)

        def run(state: HMCState) -> HMCState:
            t = state.i[0]  # every lane is at the same transition
            state = step(state)
            if num_warmup == 0:
                return state
            return lax.cond(
                t < num_warmup, partial(update, jnp.minimum(t, num_warmup - 1)),
                lambda s: s, state,
            )  # fmt: skip

        return run

    return Kernel(
        nuts.init, frozen.step, block=block, fields=extra_fields, skip=nuts.skip
    )


def _broadcast(state: HMCState, adapt: HMCAdaptState) -> HMCState:
    """Every lane gets the shared adaptation state (each keeps its own key)."""
    lanes = state.accept_prob.shape[0]
    shared = replicate(adapt._replace(rng_key=None), lanes)
    return state._replace(
        adapt_state=shared._replace(rng_key=state.adapt_state.rng_key)
    )


def _merge(moments: tuple, pooled: dict, collect: jax.Array) -> tuple:
    """Merge pooled batch sums (about the running mean) into NumPyro's Welford
    moments ``(mean, m2, n)`` (Chan et al.). Outside the slow windows (where
    ``n`` is 0) only the mean moves, to the batch mean: it is the shift that
    the next window's first batch is summed about, so float32 never sums
    draws about zero (with mean / sd = 3e4, that cancels to a variance 40x
    too large, or negative)."""
    mean, m2, n = moments
    nb = pooled["n"]
    count = n + jnp.where(collect, nb, 0).astype(n.dtype)
    delta = pooled["s1"] / jnp.maximum(nb, 1.0)  # batch mean - running mean
    frac = nb / jnp.maximum(n.astype(nb.dtype) + nb, 1.0)
    outer = delta * delta if m2.ndim == 1 else jnp.outer(delta, delta)
    batch_m2 = pooled["s2"] - nb * outer
    new_m2 = m2 + batch_m2 + outer * n.astype(nb.dtype) * frac
    return mean + delta * frac, jnp.where(collect, new_m2, m2), count


def _new_metric(adapt: HMCAdaptState, mm_final: Callable) -> HMCAdaptState:
    """At a slow window's end: the pooled (co)variance becomes the metric, and
    the next window starts empty but keeps the running mean as its shift
    (NumPyro's ``welford_covariance`` reads only ``m2`` and ``n`` at the end,
    and its update of a state with ``n = 0`` sets the mean to the first draw;
    ``_merge`` sets it to the first batch's mean the same way)."""
    inverse, sqrt, sqrt_inv = mm_final(adapt.mm_state, regularize=True)
    empty = {
        k: (mean, jnp.zeros_like(m2), jnp.zeros_like(n))
        for k, (mean, m2, n) in adapt.mm_state.items()
    }
    return adapt._replace(
        inverse_mass_matrix=inverse,
        mass_matrix_sqrt=sqrt,
        mass_matrix_sqrt_inv=sqrt_inv,
        mm_state=empty,
    )
