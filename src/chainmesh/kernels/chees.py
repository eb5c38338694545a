"""ChEES-HMC over a block of chains, adapted from statistics pooled over a mesh.

ChEES-HMC (Hoffman, Radul & Sountsov, AISTATS 2021) is HMC whose chains all
run the same number of leapfrog steps in a transition: a jittered trajectory
length shared by every chain. During warmup, the step size follows dual
averaging on the harmonic mean of the acceptance probabilities, the trajectory
length follows Adam on the ChEES criterion, and the metric (``"diag"``,
``"fisher"`` or ``"lowrank"``, ``metric_window``) is estimated from the
draws, each from statistics pooled over every real chain of the mesh
(``ensemble.gather_lanes``: one collective per warmup transition, and for
``"lowrank"`` one more at each window's end to gather the lanes' buffers;
none per leapfrog step, none after warmup). After warmup everything is
frozen: plain Metropolis-adjusted HMC.

``init`` and ``build_step`` act on a block of lanes (leading axis). The
adaptation state is the same on every lane and is stored replicated per lane,
so every leaf of the state is lane-shaped (one partition spec for all).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from chainmesh.kernels import hmc, metric_window, metrics
from chainmesh.kernels.ensemble import (
    AxisName,
    first_lane,
    gather_lanes,
    mass_schedule,
    replicate,
)
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

HALTON_BITS = 24
"""Bits of the base-2 Halton jitter; it repeats every 2**24 transitions."""


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

    @property
    def inv_mass(self) -> jax.Array:
        """The diagonal of the inverse mass matrix."""
        return metrics.inverse_mass_diagonal(self.metric)


class ChEESState(NamedTuple):
    """State of a block of chains; every leaf has the leading lane axis.

    Attributes:
        position: Pytree of unconstrained values, leaves ``(lanes, ...)``.
        potential_energy: ``(lanes,)``.
        grad: Gradient of the potential, structured like ``position``.
        adapt: ``ChEESAdaptState`` replicated on every lane.
        buffer: Each lane's draws kept for the low-rank estimate (None
            unless ``"lowrank"``).
    """

    position: Any
    potential_energy: jax.Array
    grad: Any
    adapt: ChEESAdaptState
    buffer: DrawBuffer


class ChEESInfo(NamedTuple):
    """Per-lane facts about one transition, each ``(lanes,)``.

    Attributes:
        accept_prob: Metropolis acceptance probability of the proposal.
        num_steps: Leapfrog steps (int32), equal on every lane.
        diverging: Energy error above ``max_delta_energy`` or not finite.
        energy: Hamiltonian at the new state.
        step_size: Step size used.
    """

    accept_prob: jax.Array
    num_steps: jax.Array
    diverging: jax.Array
    energy: jax.Array
    step_size: jax.Array


def halton(i: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Base-2 Halton (van der Corput) number of index ``i + 1``, in (0, 1)."""
    bits = jnp.arange(HALTON_BITS, dtype=jnp.int32)
    digits = ((i.astype(jnp.int32) + 1) >> bits) & 1
    return (digits * 0.5 ** (bits + 1.0)).sum().astype(dtype)


def _flat(tree: Any) -> tuple[jax.Array, Callable]:
    """Lane pytree -> ``(lanes, d)`` matrix, and the unravel of one lane."""
    _, unravel = ravel_pytree(first_lane(tree))
    return jax.vmap(lambda t: ravel_pytree(t)[0])(tree), unravel


def init(
    positions: Any,
    potential_fn: Callable,
    step_size: float = 1.0,
    trajectory_length: float = RESTART_LENGTH,
    metric: str = "diag",
) -> ChEESState:
    """The state of a block of chains at ``positions``.

    Args:
        positions: Pytree of unconstrained values, leaves ``(lanes, ...)``.
        potential_fn: Negative log density of one chain's position pytree.
        step_size: Initial step size (dual averaging adjusts it).
        trajectory_length: Initial trajectory length (Adam adjusts it).
        metric: ``"diag"``, ``"fisher"`` or ``"lowrank"``.
    """
    potential, grad = jax.vmap(jax.value_and_grad(potential_fn))(positions)
    flat, _ = _flat(positions)
    lanes, dim = flat.shape
    adapt = init_adapt(dim, flat.dtype, step_size, trajectory_length, metric)
    buffer = metric_window.buffer_init(metric, dim, flat.dtype)
    return ChEESState(
        positions, potential, grad, replicate(adapt, lanes), replicate(buffer, lanes)
    )


def init_adapt(
    dim: int,
    dtype: Any,
    step_size: Any = 1.0,
    trajectory_length: float = RESTART_LENGTH,
    metric: str = "diag",
) -> ChEESAdaptState:
    """The shared adaptation state before the first transition (one copy).

    Args:
        dim: Coordinates of one chain's flat position.
        dtype: Floating dtype of the positions.
        step_size: Initial step size.
        trajectory_length: Initial trajectory length.
        metric: ``"diag"``, ``"fisher"`` or ``"lowrank"``.
    """
    log_eps = jnp.log(jnp.asarray(step_size, dtype))
    log_t = jnp.log(jnp.asarray(trajectory_length, dtype))
    zero = jnp.zeros((), dtype)
    return ChEESAdaptState(
        step=jnp.zeros((), jnp.int32),
        log_step_size=log_eps,
        log_step_size_avg=log_eps,
        da_mu=log_eps + jnp.log(10.0).astype(dtype),
        da_h_bar=zero,
        window_count=zero,
        log_trajectory_length=log_t,
        log_trajectory_length_avg=log_t,
        adam_m=zero,
        adam_v=zero,
        metric=metric_window.initial_metric(metric, dim, dtype),
        window=metric_window.window_init(metric, dim, dtype),
    )


def build_step(
    potential_fn: Callable,
    num_warmup: int,
    target_accept: float = 0.651,
    axis_name: AxisName = None,
    *,
    learning_rate: float = 0.025,
    adam_betas: tuple[float, float] = (0.0, 0.95),
    max_num_steps: int = 1000,
    max_delta_energy: float = 1000.0,
    metric: str = "diag",
) -> Callable[[jax.Array, ChEESState, jax.Array], tuple[ChEESState, ChEESInfo]]:
    """Build ``step(keys, state, real) -> (state, info)`` for a block of chains.

    Call ``step`` inside ``shard_map`` over a mesh whose ``axis_name`` axes
    carry chains (or outside one with ``axis_name=None``). ``keys`` holds one
    PRNG key per lane (``(lanes,)`` typed keys or ``(lanes, 2)`` raw), so a
    chain's momentum and acceptance draws depend on its own key only;
    ``real`` is False on padding lanes, which never enter a pooled statistic.

    Args:
        potential_fn: Negative log density of one chain's position pytree.
        num_warmup: Adaptive transitions; later ones are frozen HMC.
        target_accept: Target harmonic-mean acceptance probability.
        axis_name: Mesh axis or axes to pool over; None: the local block.
        learning_rate: Adam's learning rate on the log trajectory length.
        adam_betas: Adam's ``(beta1, beta2)``; the paper's ``(0, 0.95)``.
        max_num_steps: Cap on the leapfrog steps of a transition.
        max_delta_energy: Energy error beyond which a transition diverges.
        metric: The metric adapted: ``"diag"`` (Stan's regularized
            variance), ``"fisher"`` or ``"lowrank"`` (``metric_window``).
    """
    collect, window_end = mass_schedule(num_warmup)
    slots = jnp.asarray(metric_window.buffer_slots(num_warmup))
    restart = window_end.copy()
    restart[np.flatnonzero(window_end)[-1:]] = False  # not after the last window
    gather = partial(gather_lanes, axis_name=axis_name)
    hyper = _Hyper(
        num_warmup, target_accept, gather, learning_rate, *adam_betas,
        max_num_steps, *map(jnp.asarray, (collect, window_end, restart)),
        metric, axis_name,
    )  # fmt: skip

    def step(
        keys: jax.Array, state: ChEESState, real: jax.Array
    ) -> tuple[ChEESState, ChEESInfo]:
        a = first_lane(state.adapt)
        x0, unravel = _flat(state.position)
        lanes, dtype = x0.shape[0], x0.dtype

        warm = a.step < num_warmup
        eps = jnp.exp(jnp.where(warm, a.log_step_size, a.log_step_size_avg))
        length = jnp.exp(
            jnp.where(warm, a.log_trajectory_length, a.log_trajectory_length_avg)
        )
        jitter = halton(a.step, dtype)
        num_steps = jnp.clip(jnp.ceil(jitter * length / eps), 1, max_num_steps)
        num_steps = num_steps.astype(jnp.int32)

        def potential(q: jax.Array) -> jax.Array:
            return potential_fn(unravel(q))

        start = (x0, state.potential_energy, _flat(state.grad)[0])
        moved = hmc.transition(potential, keys, start, eps, a.metric, num_steps)
        t = jnp.minimum(a.step, max(num_warmup, 1) - 1)
        slot = jnp.where(warm, slots[t], -1)
        kept = metric_window.record(state.buffer, slot, moved.x, moved.grad)

        def adapt(a: ChEESAdaptState) -> ChEESAdaptState:
            return _adapt(a, _Stats(x0, moved, real, jitter * length, kept), hyper)

        ended = warm & hyper.window_end[t]
        buffer = metric_window.restart(kept, ended)
        a = lax.cond(warm, adapt, lambda a: a._replace(step=a.step + 1), a)
        new = ChEESState(
            jax.vmap(unravel)(moved.x),
            moved.potential_energy,
            jax.vmap(unravel)(moved.grad),
            replicate(a, lanes),
            buffer,
        )
        info = ChEESInfo(
            accept_prob=moved.accept_prob,
            num_steps=jnp.full((lanes,), num_steps),
            diverging=moved.delta > max_delta_energy,
            energy=moved.energy,
            step_size=jnp.full((lanes,), eps),
        )
        return new, info

    return step


class _Hyper(NamedTuple):
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


class _Stats(NamedTuple):
    """What the adaptation needs from one transition."""

    x0: jax.Array  # (lanes, d) positions before it
    moved: hmc.Moved  # proposals, momenta, new positions, acceptance
    real: jax.Array  # (lanes,) bool
    time: jax.Array  # its jittered trajectory length
    buffer: DrawBuffer | None  # lanes' kept draws, this transition's included


def _chees_gradient(
    a: ChEESAdaptState, stats: _Stats, hyper: _Hyper
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


def _adapt(a: ChEESAdaptState, stats: _Stats, hyper: _Hyper) -> ChEESAdaptState:
    """One warmup update of the shared parameters from pooled statistics."""
    dtype = stats.x0.dtype
    pooled, grad = _chees_gradient(a, stats, hyper)

    # Step size: dual averaging on the harmonic mean acceptance probability.
    count = a.window_count + 1.0
    error = hyper.target_accept - pooled["n"] / pooled["inv_accept"]
    h_bar = (1 - 1 / (count + DA_T0)) * a.da_h_bar + error / (count + DA_T0)
    log_eps = a.da_mu - jnp.sqrt(count) / DA_GAMMA * h_bar
    eta = count**-DA_KAPPA
    log_eps_avg = eta * log_eps + (1 - eta) * a.log_step_size_avg

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
    t = jnp.minimum(a.step, hyper.num_warmup - 1)
    # Outside the slow windows (count 0) only the mean moves, to the batch
    # mean: the shift of the next window's sums and of the ChEES centring.
    window = metric_window.merge(a.window, pooled["batch"], hyper.collect[t])
    ended = hyper.window_end[t]

    def estimate() -> metrics.Metric:
        return metric_window.estimate(
            hyper.metric, window, stats.buffer, stats.real, hyper.axis_name
        )

    metric = lax.cond(ended, estimate, lambda: a.metric)
    # A new metric changes the time scale: restart the length where ChEES's
    # gradient is informative, except after the last window, where Adam goes
    # on from the window's average length (see RESTART_LENGTH).
    log_t = jnp.where(ended, log_t_avg, log_t)
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
    )
