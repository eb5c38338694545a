"""ChEES-HMC's warmup: one update of the shared adaptation state.

After each warmup transition, every device gathers every lane's start,
proposal, momentum, new position and acceptance (one collective, in chain
order), and computes the same pooled sums from them: dual averaging of the
step size on the harmonic mean acceptance probability, Adam on the ChEES
criterion for the log trajectory length, and the metric window's moments
(``metric_window``). At a window's end the window's metric replaces the
current one. ``chees.build_step`` calls ``adapt`` while ``step < num_warmup``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from chainmesh.kernels import hmc, metric_window, metrics
from chainmesh.kernels.ensemble import AxisName
from chainmesh.kernels.metric_window import DrawBuffer, MetricWindow

DA_GAMMA, DA_T0, DA_KAPPA = 0.05, 10.0, 0.75
"""Nesterov dual averaging constants (Stan's and NumPyro's)."""

MAX_LOG_UPDATE = 0.35
"""Largest change of the log trajectory length per transition (about log(2)/2)."""

RESTART_LENGTH = 2.0
"""Trajectory length after a mass matrix update, except the last one. In the
new metric the marginal standard deviations are about 1, so the ChEES optimum
of a near-Gaussian posterior is above 1 (about 1.6 for independent
coordinates, more with correlations). Below its optimum the ChEES gradient
points up; far above it the criterion is flat, and Adam would not bring a
long length back. Measured with 64 chains, 500 warmup + 1000 draws:
restarting at 2 instead of 1 raised the min bulk ESS by 21% (logistic
regression), 30% (eight schools) and 41% (100-d Gaussian) with the min ESS of
the squares within 3%; 4 raised the mean's ESS 2.5-3.6x but lowered the
squares' by 17-26%.

After the last window the length is kept (Adam goes on from the window's
average, less noisy than its last iterate when few chains pool): the last
metric differs little from the one the length was learned in, and
restarting there left only the 50-transition terminal buffer to learn it
again. Measured (64 chains on one device, 500 + 1000, two seeds; min bulk
ESS per 1000 sampling gradients, means / centred squares): on a 20-d
Gaussian with equicorrelation 0.9, restarting at every window end sampled
with T = 2.4 (4.5 / 13), keeping the average at the last one with T = 9.5
(24.9 / 21.8), keeping the last iterate T = 9.4 (24.5 / 21.8); eight
schools changed within seed noise (79 / 115 before, 77 / 109 after), so did
the logistic regression with the last iterate (215 / 240, 219 / 239).
Keeping the length at every window end, or rescaling it by the root mean
square change of the marginal sds, carries a length learned in a poor early
metric into the last window: eight schools then samples with T = 5.7 and
loses a third of the means' ESS and 70% of the squares'."""


class ChEESAdaptState(NamedTuple):
    """The shared adaptation state (scalars and ``(d,)`` vectors).

    Attributes:
        step: Transitions taken; also the index of the Halton jitter.
        log_step_size: Dual averaging iterate, used during warmup.
        log_step_size_avg: Its weighted average, the step size after warmup.
        da_mu: Dual averaging shrinkage target, ``log(10 * step_size)``.
        da_h_bar: Dual averaging running mean of ``target - accept``.
        window_count: Updates since the last mass matrix change (dual
            averaging's counter, and the weight of the trajectory average).
        log_trajectory_length: Adam iterate, used during warmup.
        log_trajectory_length_avg: Its average (weights ``k**-0.5``), the
            trajectory length after warmup.
        adam_m: Adam's first moment of the ChEES gradient.
        adam_v: Adam's second moment.
        metric: The inverse mass matrix (``metrics.Metric``, O(d k)).
        window: Pooled moments of the current metric window.
        log_trajectory_length_kept: The length the last window end kept
            before restarting (its window's average): where a warmup that
            ends early (``skip``) goes on from, as after the last window.
    """

    step: jax.Array
    log_step_size: jax.Array
    log_step_size_avg: jax.Array
    da_mu: jax.Array
    da_h_bar: jax.Array
    window_count: jax.Array
    log_trajectory_length: jax.Array
    log_trajectory_length_avg: jax.Array
    adam_m: jax.Array
    adam_v: jax.Array
    metric: metrics.Metric
    window: MetricWindow
    log_trajectory_length_kept: jax.Array

    @property
    def inv_mass(self) -> jax.Array:
        """The diagonal of the inverse mass matrix."""
        return metrics.inverse_mass_diagonal(self.metric)


class Hyper(NamedTuple):
    """Static settings of the adaptation (``build_step``'s arguments)."""

    num_warmup: int
    target_accept: float
    gather: Callable  # (per-lane tree, real) -> (every lane's tree, real)
    learning_rate: float
    beta1: float
    beta2: float
    max_num_steps: int
    collect: jax.Array  # bool per warmup transition: add draws to the window
    window_end: jax.Array  # bool per warmup transition: update the mass matrix
    restart: jax.Array  # bool per warmup transition: restart the length
    metric: str  # "diag", "fisher" or "lowrank"
    axis_name: AxisName  # to gather the lanes' buffers over


class Stats(NamedTuple):
    """What the adaptation needs from one transition."""

    x0: jax.Array  # (lanes, d) positions before it
    moved: hmc.Moved  # proposals, momenta, new positions, acceptance
    real: jax.Array  # (lanes,) bool
    time: jax.Array  # its jittered trajectory length
    buffer: DrawBuffer | None  # lanes' kept draws, this transition's included


def step_size_fields(step_size: Any, dtype: Any) -> dict:
    """Dual averaging's fields of an adaptation state before its first update
    (``step_size`` the initial one), as keyword arguments."""
    log_eps = jnp.log(jnp.asarray(step_size, dtype))
    zero = jnp.zeros((), dtype)
    return {
        "step": jnp.zeros((), jnp.int32),
        "log_step_size": log_eps,
        "log_step_size_avg": log_eps,
        "da_mu": log_eps + jnp.log(10.0).astype(dtype),
        "da_h_bar": zero,
        "window_count": zero,
    }


def dual_averaging(
    a: Any, count: jax.Array, error: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Nesterov dual averaging of ``log step_size`` (Stan's constants) after
    ``count`` updates since the last restart, on ``error = target - accept``.

    Returns:
        The new iterate, its weighted average and the running mean error.
    """
    h_bar = (1 - 1 / (count + DA_T0)) * a.da_h_bar + error / (count + DA_T0)
    log_eps = a.da_mu - jnp.sqrt(count) / DA_GAMMA * h_bar
    eta = count**-DA_KAPPA
    return log_eps, eta * log_eps + (1 - eta) * a.log_step_size_avg, h_bar


def window_metric(
    a: Any, batch: dict, stats: Any, hyper: Any
) -> tuple[jax.Array, MetricWindow, jax.Array, metrics.Metric]:
    """The window's moments with this transition's pooled ``batch`` merged,
    and at a window's end its metric (ChEES's and MAMS's states and hypers).

    Outside the slow windows only the mean moves, to the batch mean: the
    shift of the next window's sums and of the kernels' centring.

    Returns:
        ``(t, window, ended, metric)``: the warmup transition's index, the
        merged window, whether it ended the window, the metric after it.
    """
    t = jnp.minimum(a.step, hyper.num_warmup - 1)
    window = metric_window.merge(a.window, batch, hyper.collect[t])
    ended = hyper.window_end[t]

    def estimate() -> metrics.Metric:
        return metric_window.estimate(
            hyper.metric, window, stats.buffer, stats.real, hyper.axis_name,
            a.metric,
        )  # fmt: skip

    return t, window, ended, lax.cond(ended, estimate, lambda: a.metric)


def chees_gradient(
    a: ChEESAdaptState, stats: Stats, hyper: Hyper
) -> tuple[dict, jax.Array]:
    """Pooled statistics and the ChEES gradient with respect to the log
    trajectory length, acceptance-weighted, from every lane of the mesh
    (one collective; every device computes the same sums in chain order)."""
    per_lane = {
        "x0": stats.x0,
        "x1": stats.moved.x1,
        "p1": stats.moved.p1,
        "x": stats.moved.x,
        "accept_prob": stats.moved.accept_prob,
    }
    if hyper.metric == "fisher":
        per_lane["grad"] = stats.moved.grad
    lanes, real = hyper.gather(per_lane, stats.real)
    accept_prob = lanes["accept_prob"]

    def total(v: jax.Array) -> jax.Array:
        """Sum over the real lanes (padding lanes never enter)."""
        mask = real.reshape(real.shape + (1,) * (v.ndim - 1))
        return jnp.where(mask, v, jnp.zeros((), v.dtype)).sum(0)

    # ChEES lives in the whitened space of the current metric Sigma = L L^T:
    # positions L^{-1} x and velocities d(L^{-1} x)/dt = L^T p. Positions are
    # centred about the running mean, a shift known on every lane, so that
    # float32 does not cancel when the mean is large against the sd.
    shift = a.window.draws.mean
    w0 = metrics.whiten(a.metric, lanes["x0"] - shift)
    w1 = metrics.whiten(a.metric, lanes["x1"] - shift)
    v1 = metrics.whitened_velocity(a.metric, lanes["p1"])
    finite = jnp.isfinite(w1).all(-1) & jnp.isfinite(v1).all(-1)
    weight = jnp.where(finite & real, accept_prob, 0.0)
    w1, v1 = (jnp.where(finite[:, None], z, 0.0) for z in (w1, v1))
    pooled = {
        "n": total(jnp.ones_like(accept_prob)),
        "inv_accept": total(1.0 / jnp.maximum(accept_prob, 1e-10)),
        "batch": jax.tree.map(
            total, metric_window.batch(a.window, lanes["x"], lanes.get("grad"))
        ),
    }
    weights = total(weight) + 1e-20
    c1 = w1 - total(weight[:, None] * w1) / weights
    c0 = w0 - total(w0) / pooled["n"]
    change = ((c1 * c1).sum(-1) - (c0 * c0).sum(-1)) * (c1 * v1).sum(-1)
    change = jnp.where(jnp.isfinite(change), weight * change, 0.0)
    grad = stats.time * total(change) / weights
    return pooled, jnp.where(jnp.isfinite(grad), grad, 0.0)


def adapt(a: ChEESAdaptState, stats: Stats, hyper: Hyper) -> ChEESAdaptState:
    """One warmup update of the shared parameters from pooled statistics."""
    dtype = stats.x0.dtype
    pooled, grad = chees_gradient(a, stats, hyper)

    # Step size: dual averaging on the harmonic mean acceptance probability.
    count = a.window_count + 1.0
    error = hyper.target_accept - pooled["n"] / pooled["inv_accept"]
    log_eps, log_eps_avg, h_bar = dual_averaging(a, count, error)

    # Trajectory length: Adam ascent on ChEES in log space, clipped, averaged.
    k = (a.step + 1).astype(dtype)
    m = hyper.beta1 * a.adam_m + (1 - hyper.beta1) * grad
    v = hyper.beta2 * a.adam_v + (1 - hyper.beta2) * grad**2
    m_hat, v_hat = m / (1 - hyper.beta1**k), v / (1 - hyper.beta2**k)
    update = hyper.learning_rate * m_hat / (jnp.sqrt(v_hat) + 1e-8)
    log_t = a.log_trajectory_length + jnp.clip(update, -MAX_LOG_UPDATE, MAX_LOG_UPDATE)
    log_t = jnp.minimum(log_t, log_eps + jnp.log(hyper.max_num_steps))
    w = count**-0.5
    log_t_avg = w * log_t + (1 - w) * a.log_trajectory_length_avg

    # Mass matrix: pooled moments of the slow windows; at a window's end, the
    # new mass matrix restarts dual averaging and the trajectory average.
    t, window, ended, metric = window_metric(a, pooled["batch"], stats, hyper)
    # A new metric changes the time scale: restart the length where ChEES's
    # gradient is informative, except after the last window, where Adam goes
    # on from the window's average length (see RESTART_LENGTH).
    log_t = jnp.where(ended, log_t_avg, log_t)
    kept_length = jnp.where(ended, log_t, a.log_trajectory_length_kept)
    log_t = jnp.where(hyper.restart[t], jnp.log(RESTART_LENGTH).astype(dtype), log_t)
    zero = jnp.zeros((), dtype)
    emptied = metric_window.emptied(window)
    return ChEESAdaptState(
        step=a.step + 1,
        log_step_size=log_eps,
        log_step_size_avg=jnp.where(ended, log_eps, log_eps_avg),
        da_mu=jnp.where(ended, log_eps + jnp.log(10.0).astype(dtype), a.da_mu),
        da_h_bar=jnp.where(ended, zero, h_bar),
        window_count=jnp.where(ended, zero, count),
        log_trajectory_length=log_t,
        log_trajectory_length_avg=jnp.where(ended, log_t, log_t_avg),
        adam_m=m,
        adam_v=v,
        metric=metric,
        window=jax.tree.map(partial(jnp.where, ended), emptied, window),
        log_trajectory_length_kept=kept_length,
    )
