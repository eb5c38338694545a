"""NUTS with a gradient-informed metric: ``metric="fisher"`` or ``"lowrank"``.

NumPyro's NUTS holds a diagonal or a dense inverse mass matrix and nothing
else (its U-turn criterion reads the matrix's ``ndim``). A metric held as
``Sigma = L L^T`` (``metrics.Metric``, O(d k)) is used the equivalent way:
every transition runs NumPyro's NUTS, with the identity metric and its own
adaptation off, on the whitened coordinates ``y = L^{-1} x`` of the potential
``U(L y)``. Hamiltonian dynamics, its energy and the no-U-turn criterion are
invariant under this change of variables, so the transition is NUTS with
metric ``Sigma``. Positions and gradients stay in the model's coordinates in
the state (draws, checkpoints and extra fields see nothing new); a rejected
transition keeps the exact previous position.

Adaptation, after every warmup transition (``block``):

- step size: NumPyro's dual averaging on ``target - mean acceptance``;
- metric: the window's draws and gradients (``metric_window``): pooled
  moments for ``"fisher"``, a buffer of draws for ``"lowrank"``; at each
  slow window's end the new metric replaces the old one and dual averaging
  restarts from the current step size (NumPyro's rule), with Stan's windows.

``adapt="ensemble"`` pools both over every real chain of the mesh: one
collective per warmup transition, plus one ``all_gather`` of the buffers at
a window's end for ``"lowrank"``. ``adapt="chain"`` runs the same update on
each chain alone (no collective), with a longer buffer (``CHAIN_BUFFER``)
since one chain has fewer draws to learn from.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import HMCState, hmc
from numpyro.infer.hmc_util import HMCAdaptState, dual_averaging
from numpyro.infer.util import ParamInfo

from chainmesh.config import SamplerConfig
from chainmesh.kernels import metric_window, metrics
from chainmesh.kernels.base import Kernel, named_fields, skip_counter
from chainmesh.kernels.ensemble import (
    AxisName,
    first_lane,
    mass_schedule,
    pooled_sum,
    replicate,
)
from chainmesh.kernels.metric_window import DrawBuffer, MetricWindow
from chainmesh.kernels.nuts import build_nuts
from chainmesh.kernels.pooled_nuts import POOL_AXIS
from chainmesh.model import ModelInfo, potential_fn

SITE = "y"
"""The one site of the whitened potential NumPyro's NUTS runs on."""

CHAIN_BUFFER = 128
"""Draws a chain keeps of a window for its own low-rank estimate
(``adapt="chain"``); pooled estimates keep ``metric_window.BUFFER`` per chain."""


class MetricAdapt(NamedTuple):
    """Adaptation state: per chain, or shared (replicated) when pooled.

    Attributes:
        step: NumPyro's adaptation state for the whitened NUTS (identity
            metric); its ``step_size`` and ``ss_state`` are the step size
            and its dual averaging.
        metric: The current metric ``Sigma = L L^T``.
        window: Moments of the current metric window.
    """

    step: HMCAdaptState
    metric: metrics.Metric
    window: MetricWindow


class MetricNUTSState(NamedTuple):
    """One chain's state (a block stacks these on a leading axis).

    Attributes:
        i: Transitions taken.
        z: Unconstrained position, site name -> value.
        z_grad: Gradient of the potential at ``z``.
        potential_energy: Potential at ``z``.
        energy: Hamiltonian after the last transition.
        num_steps: Leapfrog steps of the last transition.
        accept_prob: Its acceptance probability (NUTS's tree average).
        diverging: Whether it diverged.
        rng_key: The chain's key (NumPyro splits it once per transition).
        adapt: The adaptation state.
        buffer: Draws kept for the low-rank estimate (None otherwise).
    """

    i: jax.Array
    z: Any
    z_grad: Any
    potential_energy: jax.Array
    energy: jax.Array
    num_steps: jax.Array
    accept_prob: jax.Array
    diverging: jax.Array
    rng_key: jax.Array
    adapt: MetricAdapt
    buffer: DrawBuffer | None


def build_metric_nuts(
    model: Callable, config: SamplerConfig, info: ModelInfo
) -> Kernel:
    """NUTS adapting ``config.metric`` (``"fisher"`` or ``"lowrank"``),
    pooled over the mesh under ``adapt="ensemble"``, per chain otherwise."""
    nuts = build_nuts(model, config, info)
    enum = bool(info.enumerated)
    kind, pooled = config.metric, config.adapt == "ensemble"
    size = metric_window.BUFFER if pooled else CHAIN_BUFFER
    unravel = _unraveler(info)

    def whitened_gen(metric: metrics.Metric, args: tuple, kwargs: dict) -> Callable:
        pe = potential_fn(model, args, kwargs, enum)
        return lambda y: pe(unravel(metrics.unwhiten(metric, y[SITE])))

    init_white, sample_white = hmc(potential_fn_gen=whitened_gen)

    def start_white(y, pe, grad, step_size, key, metric, args, kwargs):
        return init_white(
            ParamInfo({SITE: y}, pe, {SITE: grad}),
            num_warmup=0,
            step_size=step_size,
            target_accept_prob=config.target_accept_prob,
            max_tree_depth=config.max_tree_depth,
            model_args=(metric, args, kwargs),
            rng_key=key,
        )

    def init(key: jax.Array, strategy: Any, args: tuple, kwargs: dict):
        state, valid = nuts.init(key, strategy, args, kwargs)
        flat, _ = ravel_pytree(state.z)
        dim, dtype = flat.size, flat.dtype
        metric = metric_window.initial_metric(kind, dim, dtype)
        grad = ravel_pytree(state.z_grad)[0]
        white = start_white(
            flat, state.potential_energy, grad, state.adapt_state.step_size,
            state.rng_key, metric, args, kwargs,
        )  # fmt: skip
        adapt = MetricAdapt(
            white.adapt_state, metric, metric_window.window_init(kind, dim, dtype)
        )
        chain = MetricNUTSState(
            i=state.i,
            z=state.z,
            z_grad=state.z_grad,
            potential_energy=state.potential_energy,
            energy=state.energy,
            num_steps=state.num_steps,
            accept_prob=state.accept_prob,
            diverging=state.diverging,
            rng_key=state.rng_key,
            adapt=adapt,
            buffer=metric_window.buffer_init(kind, dim, dtype, size),
        )
        return chain, valid

    def transition(s: MetricNUTSState, args: tuple, kwargs: dict) -> MetricNUTSState:
        """One NUTS transition of one chain under its current metric."""
        m = s.adapt.metric
        x, grad = ravel_pytree(s.z)[0], ravel_pytree(s.z_grad)[0]
        y = metrics.whiten(m, x)
        white = HMCState(
            s.i, {SITE: y}, {SITE: metrics.whitened_velocity(m, grad)},
            s.potential_energy, s.energy, None, jnp.zeros((), x.dtype),
            s.num_steps, s.accept_prob, s.accept_prob, s.diverging,
            s.adapt.step, s.rng_key,
        )  # fmt: skip
        model_args = (m, args, kwargs)
        jax.eval_shape(
            start_white, y, s.potential_energy, y, s.adapt.step.step_size,
            s.rng_key, m, args, kwargs,
        )  # fmt: skip
        new = sample_white(white, model_args=model_args)
        moved = jnp.any(new.z[SITE] != y)
        x_new = jnp.where(moved, metrics.unwhiten(m, new.z[SITE]), x)
        grad_new = jnp.where(
            moved, metrics.unwhiten_gradient(m, new.z_grad[SITE]), grad
        )
        return s._replace(
            i=s.i + 1,
            z=unravel(x_new),
            z_grad=unravel(grad_new),
            potential_energy=new.potential_energy,
            energy=new.energy,
            num_steps=new.num_steps,
            accept_prob=new.accept_prob,
            diverging=new.diverging,
            rng_key=new.rng_key,
        )

    adapt_block = _adaptation(config.num_warmup, config.target_accept_prob, kind, size)

    def block(args: tuple, kwargs: dict, real: jax.Array) -> Callable:
        step = jax.vmap(partial(transition, args=args, kwargs=kwargs))
        if pooled:
            update = partial(adapt_block, real=real, axis_name=POOL_AXIS)
        else:

            def update(t: jax.Array, s: MetricNUTSState) -> MetricNUTSState:
                one = partial(adapt_block, t, real=jnp.ones(1, bool), axis_name=None)
                lane = jax.vmap(lambda c: first_lane(one(replicate(c, 1))))
                return lane(s)

        def run(s: MetricNUTSState) -> MetricNUTSState:
            t = s.i[0]  # every lane is at the same transition
            s = step(s)
            if config.num_warmup == 0:
                return s
            warm = t < config.num_warmup
            last = jnp.minimum(t, config.num_warmup - 1)  # an index of the schedule
            return lax.cond(warm, partial(update, last), lambda b: b, s)

        return run

    return Kernel(init=init, step=None, block=block, fields=_fields, skip=skip_counter)


def _unraveler(info: ModelInfo) -> Callable:
    """``ravel_pytree``'s inverse for the model's unconstrained sites, built
    abstractly (building a sampler must not compile: bad input is refused
    before any compilation)."""
    out = []

    def flat() -> jax.Array:
        prototype = {
            k: jnp.zeros(s.shape, s.dtype) for k, s in info.unconstrained.items()
        }
        vector, unravel = ravel_pytree(prototype)
        out.append(unravel)
        return vector

    jax.eval_shape(flat)
    return out[0]


def _adaptation(num_warmup: int, target: float, kind: str, size: int) -> Callable:
    """``(t, block, real, axis_name) -> block``: the update after warmup
    transition ``t``, its statistics pooled over the block's real lanes and
    ``axis_name`` (one collective; one more at a ``"lowrank"`` window end)."""
    # NumPy here, constants of the traced update below: building a sampler
    # must not compile (a host array put on a device compiles a program).
    slots = metric_window.buffer_slots(num_warmup, size)
    schedule = (*mass_schedule(num_warmup), slots)
    ss_init, ss_update = dual_averaging()

    def update(
        t: jax.Array, s: MetricNUTSState, real: jax.Array, axis_name: AxisName
    ) -> MetricNUTSState:
        collect, window_end, slots = (jnp.asarray(z) for z in schedule)
        a = first_lane(s.adapt)
        x = jax.vmap(lambda z: ravel_pytree(z)[0])(s.z)
        grad = jax.vmap(lambda z: ravel_pytree(z)[0])(s.z_grad)
        stats = {
            "n": jnp.ones_like(s.accept_prob),
            "accept": s.accept_prob,
            "batch": metric_window.batch(a.window, x, grad),
        }
        pooled = pooled_sum(stats, real, axis_name, reproducible=True)
        ss = ss_update(target - pooled["accept"] / pooled["n"], a.step.ss_state)
        log_eps = jnp.where(t == num_warmup - 1, ss[1], ss[0])
        finfo = jnp.finfo(x.dtype)
        eps = jnp.clip(jnp.exp(log_eps), finfo.tiny, finfo.max)
        window = metric_window.merge(a.window, pooled["batch"], collect[t])
        kept = metric_window.record(s.buffer, slots[t], x, grad)
        ended = window_end[t]

        def new_metric() -> metrics.Metric:
            return metric_window.estimate(kind, window, kept, real, axis_name, a.metric)

        metric = lax.cond(ended, new_metric, lambda: a.metric)
        # NumPyro's restart at a window end: prox_center = log(10 step size).
        restarted = ss_init(jnp.log(10.0).astype(eps.dtype) + jnp.log(eps))
        ss = jax.tree.map(partial(jnp.where, ended), restarted, ss)
        step = a.step._replace(step_size=eps, ss_state=ss)
        emptied = metric_window.emptied(window)
        window = jax.tree.map(partial(jnp.where, ended), emptied, window)
        lanes = s.accept_prob.shape[0]
        adapt = replicate(MetricAdapt(step, metric, window), lanes)
        return s._replace(adapt=adapt, buffer=metric_window.restart(kept, ended))

    return update


def _fields(state: MetricNUTSState) -> dict[str, jax.Array]:
    return named_fields(state, state.adapt.step.step_size)
