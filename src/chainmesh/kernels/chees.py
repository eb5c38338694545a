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

from chainmesh.kernels import chees_adapt, hmc, metric_window
from chainmesh.kernels.chees_adapt import RESTART_LENGTH, ChEESAdaptState
from chainmesh.kernels.ensemble import (
    AxisName,
    first_lane,
    gather_lanes,
    mass_schedule,
    replicate,
)
from chainmesh.kernels.metric_window import DrawBuffer

HALTON_BITS = 24
"""Bits of the base-2 Halton jitter; it repeats every 2**24 transitions."""


class ChEESState(NamedTuple):
    """State of a block of chains; every leaf has the leading lane axis.

    Attributes:
        position: Pytree of unconstrained values, leaves ``(lanes, ...)``.
        potential_energy: ``(lanes,)``.
        grad: Gradient of the potential, structured like ``position``.
        adapt: ``ChEESAdaptState`` (MAMS: ``MAMSAdaptState``) replicated
            on every lane.
        buffer: Each lane's draws kept for the low-rank estimate (None
            unless ``"lowrank"``).
    """

    position: Any
    potential_energy: jax.Array
    grad: Any
    adapt: Any
    buffer: DrawBuffer


State = ChEESState
"""The block state under the name ``chees_chains.build_block_kernel`` reads."""


class ChEESInfo(NamedTuple):
    """Per-lane facts about one transition, each ``(lanes,)``.

    Attributes:
        accept_prob: Metropolis acceptance probability of the proposal.
        num_steps: Leapfrog steps (int32), equal on every lane (MAMS:
            gradients, two per step).
        diverging: Energy error above ``max_delta_energy`` or not finite.
        energy: Hamiltonian at the new state (MAMS: the potential; its
            kinetic energy is constant).
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
    return block_init(
        positions,
        potential_fn,
        partial(init_adapt, step_size=step_size, trajectory_length=trajectory_length),
        metric,
    )


def block_init(
    positions: Any, potential_fn: Callable, init_adapt: Callable, metric: str
) -> ChEESState:
    """The state of a block of chains at ``positions``, its shared adaptation
    state ``init_adapt(dim, dtype, metric=metric)`` (ChEES's or MAMS's)."""
    potential, grad = jax.vmap(jax.value_and_grad(potential_fn))(positions)
    flat, _ = _flat(positions)
    lanes, dim = flat.shape
    adapt = init_adapt(dim, flat.dtype, metric=metric)
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
    log_t = jnp.log(jnp.asarray(trajectory_length, dtype))
    zero = jnp.zeros((), dtype)
    return ChEESAdaptState(
        **chees_adapt.step_size_fields(step_size, dtype),
        log_trajectory_length=log_t,
        log_trajectory_length_avg=log_t,
        adam_m=zero,
        adam_v=zero,
        metric=metric_window.initial_metric(metric, dim, dtype),
        window=metric_window.window_init(metric, dim, dtype),
        log_trajectory_length_kept=log_t,
    )


def advance(
    state: ChEESState,
    a: Any,
    warm: jax.Array,
    moved: Any,
    unravel: Callable,
    slots: jax.Array,
    window_end: jax.Array,
    adapt: Callable[[Any, DrawBuffer], Any],
) -> ChEESState:
    """The block's state after a transition (ChEES's and MAMS's).

    During warmup the new draws go to their buffer slot (``slots``), the
    buffer restarts after a window end, and ``adapt(a, kept)`` updates the
    shared state ``a`` from the buffer with this transition's draws; after
    warmup only the counter moves.

    Args:
        state: The block's state before the transition.
        a: Its shared adaptation state (one copy).
        warm: Whether the transition was a warmup one.
        moved: The transition: new flat positions ``x``, ``potential_energy``
            and ``grad`` of every lane.
        unravel: One lane's flat position -> pytree.
        slots: Buffer slot per warmup transition (-1: none).
        window_end: Bool per warmup transition: a metric window ends.
        adapt: The warmup update of the shared state.
    """
    t = jnp.minimum(a.step, window_end.shape[0] - 1)
    slot = jnp.where(warm, slots[t], -1)
    kept = metric_window.record(state.buffer, slot, moved.x, moved.grad)
    buffer = metric_window.restart(kept, warm & window_end[t])
    a = lax.cond(
        warm, lambda a: adapt(a, kept), lambda a: a._replace(step=a.step + 1), a
    )
    return ChEESState(
        jax.vmap(unravel)(moved.x),
        moved.potential_energy,
        jax.vmap(unravel)(moved.grad),
        replicate(a, moved.x.shape[0]),
        buffer,
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
    hyper = chees_adapt.Hyper(
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

        def adapt(a: ChEESAdaptState, kept: DrawBuffer) -> ChEESAdaptState:
            return chees_adapt.adapt(
                a, chees_adapt.Stats(x0, moved, real, jitter * length, kept), hyper
            )

        new = advance(state, a, warm, moved, unravel, slots, hyper.window_end, adapt)
        info = ChEESInfo(
            accept_prob=moved.accept_prob,
            num_steps=jnp.full((lanes,), num_steps),
            diverging=moved.delta > max_delta_energy,
            energy=moved.energy,
            step_size=jnp.full((lanes,), eps),
        )
        return new, info

    return step
