"""MAMS's warmup: one update of the shared adaptation state.

After each warmup transition every device sums the same statistics over every
real lane of the mesh (one collective, summed in chain order): the mean
acceptance probability, the cross-chain moments of the positions before and
after the transition in the metric's whitened coordinates, and the metric
window's moments (``metric_window``). From them:

- the step size follows dual averaging on the mean acceptance probability
  (target 0.9, the MAMS paper's);
- the trajectory length ``L`` follows the MAMS paper's rule, ``L = LENGTH_FACTOR``
  x the integration time per effective draw, with the effective draws per
  transition of each coordinate read from the ensemble's lag-1
  autocorrelation ``rho`` as ``(1 - rho) / (1 + rho)`` (exact for a Gaussian
  target, where a transition with a fresh velocity is an AR(1) step on every
  eigen-direction) and averaged over coordinates as BlackJAX's tuner does.
  The paper estimates it from one chain's draws after a tuning stage; the
  ensemble measures it after every transition, so ``L`` moves towards it
  all along the warmup (a step of ``LENGTH_GAIN`` in log space, at most a
  factor 2);
- the metric is the window's estimate at each window end; ``L`` and the step
  size are carried into the new whitened coordinates by the change of their
  root mean square scale, and dual averaging restarts there.

After warmup everything is frozen: the step size and ``L`` are their averages
over the last stretch of the warmup.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chainmesh.kernels import isokinetic, metric_window, metrics
from chainmesh.kernels.chees_adapt import (
    dual_averaging,
    step_size_fields,
    window_metric,
)
from chainmesh.kernels.ensemble import AxisName, pooled_sum, welford_variance
from chainmesh.kernels.metric_window import DrawBuffer, MetricWindow

LENGTH_FACTOR = 0.5
"""``L`` over the integration time per effective draw (BlackJAX's MAMS tuner
uses 0.5). On a Gaussian with a uniformly jittered length its fixed point is
an autocorrelation of 1/3 per transition (two transitions per effective draw
of the mean)."""

MAX_LENGTH = 8.0
"""Cap of ``L`` over ``sqrt(sum of the whitened variances)`` (MCLMC's scale
of ``L``, about ``sqrt(d)`` in a fitting metric). Where the effective draws
per transition stay below ``LENGTH_FACTOR`` however long the trajectory,
the rule alone would lengthen it to the step cap; the best lengths measured
here were 1.6-3.8x that scale (eight schools, the logistic regression, the
100-d AR(1) Gaussian)."""

LENGTH_GAIN = 0.1
"""Step of ``log L`` towards its target per warmup transition."""

MEMORY = 0.9
"""Decay per transition of the autocorrelation sums (about 10 transitions)."""

RESOLUTION = 16.0
NOISE = 0.05
SIGNAL = 4.0
"""A transition informs the step size where the rounding of its potentials
(``RESOLUTION`` float epsilons of the larger) is below ``NOISE``, or its
energy error is above ``SIGNAL`` times that rounding (``_informative``)."""

RHO_RANGE = (-0.9, 0.999)
"""Clip of a coordinate's lag-1 autocorrelation (antithetic to frozen)."""


class MAMSAdaptState(NamedTuple):
    """The shared adaptation state (scalars and ``(d,)`` vectors).

    Attributes:
        step: Transitions taken; also the index of the Halton jitter.
        log_step_size: Dual averaging iterate, used during warmup.
        log_step_size_avg: Its weighted average, the step size after warmup.
        da_mu: Dual averaging shrinkage target, ``log(10 * step_size)``.
        da_h_bar: Dual averaging running mean of ``target - accept``.
        window_count: Updates since the last metric change.
        log_length: ``log L`` used during warmup.
        log_length_avg: Its average since the last metric change (weights
            ``k**-0.5``), ``L`` after warmup.
        lag: ``(3, d)`` decayed cross-chain sums of ``w0 w0``, ``w0 w1`` and
            ``w1 w1`` (whitened positions before and after a transition).
        time: ``(2,)`` decayed sums of the transitions' integration times
            and of their weights (the mean time the ``lag`` sums saw).
        metric: The inverse mass matrix (``metrics.Metric``).
        window: Pooled moments of the current metric window.
    """

    step: jax.Array
    log_step_size: jax.Array
    log_step_size_avg: jax.Array
    da_mu: jax.Array
    da_h_bar: jax.Array
    window_count: jax.Array
    log_length: jax.Array
    log_length_avg: jax.Array
    lag: jax.Array
    time: jax.Array
    metric: metrics.Metric
    window: MetricWindow

    @property
    def inv_mass(self) -> jax.Array:
        """The diagonal of the inverse mass matrix."""
        return metrics.inverse_mass_diagonal(self.metric)


class Hyper(NamedTuple):
    """Static settings of the adaptation (``mams.build_step``'s arguments)."""

    num_warmup: int
    target_accept: float
    max_num_steps: int
    burn_in: int  # unadjusted transitions first, the step size held
    collect: jax.Array  # bool per warmup transition: add draws to the window
    window_end: jax.Array  # bool per warmup transition: update the metric
    metric: str  # "diag", "fisher" or "lowrank"
    axis_name: AxisName  # to pool and gather the lanes' statistics over


class Stats(NamedTuple):
    """What the adaptation needs from one transition."""

    x0: jax.Array  # (lanes, d) positions before it
    u0: jax.Array  # (lanes,) potentials before it
    moved: isokinetic.Moved
    real: jax.Array  # (lanes,) bool
    time: jax.Array  # its integration time: step size x steps
    buffer: DrawBuffer | None  # lanes' kept draws, this transition's included


def init(dim: int, dtype, step_size, length, metric: str) -> MAMSAdaptState:
    """The adaptation state before the first transition (one copy)."""
    log_length = jnp.log(jnp.asarray(length, dtype))
    return MAMSAdaptState(
        **step_size_fields(step_size, dtype),
        log_length=log_length,
        log_length_avg=log_length,
        lag=jnp.zeros((3, dim), dtype),
        time=jnp.zeros(2, dtype),
        metric=metric_window.initial_metric(metric, dim, dtype),
        window=metric_window.window_init(metric, dim, dtype),
    )


def _informative(u0: jax.Array, u1: jax.Array, delta: jax.Array) -> jax.Array:
    """Lanes whose acceptance says something of the step size: the rounding
    of their potentials (``RESOLUTION`` float epsilons of the larger) is below
    ``NOISE``, or their energy error is well above that rounding. Far out in
    the tails the potential is huge (2e5-4e8 on sblrc from uniform(-2, 2),
    float32) and its rounding alone moves the energy error by 1-16 at any step
    size; dual averaging towards 0.9 on that noise took the step to 1e-10 and
    froze every chain there."""
    size = jnp.maximum(jnp.abs(u0), jnp.abs(u1))
    rounding = jnp.finfo(u0.dtype).eps * RESOLUTION * size
    large = ~jnp.isfinite(delta) | (jnp.abs(delta) > SIGNAL * rounding)
    return jnp.isfinite(size) & ((rounding < NOISE) | large)


def _pooled(a: MAMSAdaptState, stats: Stats, hyper: Hyper) -> dict:
    """Sums over every real lane of the mesh, in chain order (one collective)."""
    shift = a.window.draws.mean
    w0 = metrics.whiten(a.metric, stats.x0 - shift)
    w1 = metrics.whiten(a.metric, stats.moved.x - shift)
    finite = jnp.isfinite(w0).all(-1) & jnp.isfinite(w1).all(-1)
    w0, w1 = (jnp.where(finite[:, None], w, 0.0) for w in (w0, w1))
    one = jnp.ones_like(stats.moved.accept_prob)
    informed = _informative(stats.u0, stats.moved.potential_energy, stats.moved.delta)
    accept = jnp.where(jnp.isnan(stats.moved.accept_prob), 0.0, stats.moved.accept_prob)
    per_lane = {
        "n": informed.astype(one.dtype),
        "accept": jnp.where(informed, accept, 0.0),
        "finite": finite.astype(one.dtype),
        "w": jnp.stack([w0, w1], axis=1),
        "ww": jnp.stack([w0 * w0, w0 * w1, w1 * w1], axis=1),
        "batch": metric_window.batch(
            a.window,
            stats.moved.x,
            stats.moved.grad if hyper.metric == "fisher" else None,
        ),
    }
    return pooled_sum(per_lane, stats.real, hyper.axis_name, reproducible=True)


def _length_target(lag: jax.Array, time: jax.Array) -> jax.Array:
    """``log`` of ``LENGTH_FACTOR`` x the time per effective draw (``time``:
    the decayed sums of integration times and weights), at most
    ``MAX_LENGTH`` x the root of the summed whitened variances."""
    rho = lag[1] / jnp.sqrt(jnp.maximum(lag[0] * lag[2], 1e-30))
    rho = jnp.clip(jnp.where(jnp.isfinite(rho), rho, 0.0), *RHO_RANGE)
    per_transition = ((1 - rho) / (1 + rho)).mean()
    weight = jnp.maximum(time[1], 1e-30)
    target = LENGTH_FACTOR * (time[0] / weight) / per_transition
    return jnp.log(jnp.minimum(target, MAX_LENGTH * jnp.sqrt(lag[0].sum() / weight)))


def adapt(a: MAMSAdaptState, stats: Stats, hyper: Hyper) -> MAMSAdaptState:
    """One warmup update of the shared parameters from pooled statistics."""
    dtype = stats.x0.dtype
    pooled = _pooled(a, stats, hyper)
    n = jnp.maximum(pooled["finite"], 1.0)

    # Step size: dual averaging on the mean acceptance probability.
    # Lanes whose energy error is rounding only are left out; with none left
    # the step size and dual averaging stay as they are.
    informed = (pooled["n"] > 0) & (a.step >= hyper.burn_in)
    count = a.window_count + informed
    error = hyper.target_accept - pooled["accept"] / jnp.maximum(pooled["n"], 1.0)
    log_eps, log_eps_avg, h_bar = dual_averaging(a, jnp.maximum(count, 1.0), error)
    log_eps = jnp.where(informed, log_eps, a.log_step_size)
    log_eps_avg = jnp.where(informed, log_eps_avg, a.log_step_size_avg)
    h_bar = jnp.where(informed, h_bar, a.da_h_bar)

    # Trajectory length: towards LENGTH_FACTOR x the time per effective draw,
    # from the cross-chain lag-1 autocovariance of the whitened positions.
    mean = pooled["w"] / n  # (2, d)
    cov = pooled["ww"] / n - jnp.stack([mean[0] ** 2, mean[0] * mean[1], mean[1] ** 2])
    seen = pooled["finite"] > 1
    lag = MEMORY * a.lag + jnp.where(seen, cov, 0.0)
    time = MEMORY * a.time + jnp.where(seen, jnp.stack([stats.time, 1.0]), 0.0)
    target = _length_target(lag, time)
    move = jnp.clip(LENGTH_GAIN * (target - a.log_length), -jnp.log(2.0), jnp.log(2.0))
    move = jnp.where(jnp.isfinite(target) & (time[1] > 0), move, 0.0)
    log_length = a.log_length + move
    top = log_eps + jnp.log(hyper.max_num_steps / 2.0)  # jitter reaches 2 L
    log_length = jnp.minimum(log_length, top).astype(dtype)
    w = jnp.maximum(count, 1.0) ** -0.5
    log_length_avg = w * log_length + (1 - w) * a.log_length_avg

    # Metric: pooled moments of the slow windows, replaced at a window's end.
    _, window, ended, metric = window_metric(a, pooled["batch"], stats, hyper)
    # The new whitened coordinates change the scale of L and of the step:
    # carry both by the change of the root mean square whitened sd.
    var = welford_variance(window.draws)
    old = jnp.mean(var / metrics.inverse_mass_diagonal(a.metric))
    new = jnp.mean(var / metrics.inverse_mass_diagonal(metric))
    rescale = jnp.where(ended, 0.5 * jnp.log(new / old), 0.0)
    rescale = jnp.where(jnp.isfinite(rescale), rescale, 0.0).astype(dtype)
    log_length = log_length + rescale
    log_eps = jnp.where(ended, log_eps_avg, log_eps) + rescale
    zero = jnp.zeros((), dtype)
    return MAMSAdaptState(
        step=a.step + 1,
        log_step_size=log_eps,
        log_step_size_avg=jnp.where(ended, log_eps, log_eps_avg),
        da_mu=jnp.where(ended, log_eps + jnp.log(10.0).astype(dtype), a.da_mu),
        da_h_bar=jnp.where(ended, zero, h_bar),
        window_count=jnp.where(ended, zero, count),
        log_length=log_length,
        log_length_avg=jnp.where(ended, log_length, log_length_avg),
        lag=jnp.where(ended, jnp.zeros_like(lag), lag),
        time=jnp.where(ended, jnp.zeros_like(time), time),
        metric=metric,
        window=jax.tree.map(
            partial(jnp.where, ended), metric_window.emptied(window), window
        ),
    )
