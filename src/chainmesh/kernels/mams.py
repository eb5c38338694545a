"""MAMS over a block of chains, tuned from statistics pooled over a mesh.

MAMS, the Metropolis-adjusted microcanonical sampler (Robnik, Cohn-Gordon &
Seljak 2025), moves each chain along the isokinetic dynamics from a fresh
uniformly random velocity, for a trajectory of jittered length, and accepts
the end point with the Metropolis test on the energy error
(``isokinetic.transition``). Every chain of the mesh runs the same number of
steps in a transition (a Halton jitter of the shared length: uniform on
``(0, 2 L)``), so a vectorized block never waits for a lane.

During warmup the step size, the trajectory length ``L`` and the metric
(``"diag"``, ``"fisher"`` or ``"lowrank"``) adapt from statistics pooled over
every real chain of the mesh (``mams_adapt``: one collective per warmup
transition, one more at each ``"lowrank"`` window end; none per step, none
after warmup). After warmup everything is frozen: exact for the target.

``init_adapt`` and ``build_step`` have the interface of ``chees``'s, so
``chees_chains.build_block_kernel`` makes either a ``Sampler`` kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chainmesh.kernels import isokinetic, mams_adapt, metric_window
from chainmesh.kernels.chees import (
    ChEESInfo,
    ChEESState,
    _flat,
    advance,
    block_init,
    halton,
)
from chainmesh.kernels.ensemble import AxisName, first_lane, mass_schedule
from chainmesh.kernels.mams_adapt import MAMSAdaptState
from chainmesh.kernels.metric_window import DrawBuffer

INITIAL_STEPS = 4.0
"""Steps per trajectory before the first update of ``L`` (``L = 4 eps``);
the length rule reaches its target within tens of transitions from there."""


State = ChEESState
"""The block state: ChEES's, with a ``MAMSAdaptState`` as ``adapt``."""

Info = ChEESInfo
"""Per-lane facts about a transition: ChEES's, ``num_steps`` counting
gradients (two per step) and ``energy`` the potential."""


def init(
    positions: Any, potential_fn: Callable, step_size: float = 1.0, metric: str = "diag"
) -> State:
    """The state of a block of chains at ``positions``.

    Args:
        positions: Pytree of unconstrained values, leaves ``(lanes, ...)``.
        potential_fn: Negative log density of one chain's position pytree.
        step_size: Initial HMC-scale step size (``init_adapt``).
        metric: ``"diag"``, ``"fisher"`` or ``"lowrank"``.
    """
    return block_init(
        positions, potential_fn, partial(init_adapt, step_size=step_size), metric
    )


def init_adapt(
    dim: int, dtype: Any, step_size: Any = 1.0, metric: str = "diag"
) -> MAMSAdaptState:
    """The shared adaptation state before the first transition (one copy).

    Args:
        dim: Coordinates of one chain's flat position (at least 2).
        dtype: Floating dtype of the positions.
        step_size: An HMC step size for the initial metric (NumPyro's
            initial one); a unit velocity covers ``sqrt(dim)`` times less
            ground per unit time, so MAMS starts at ``sqrt(dim)`` times it.
        metric: ``"diag"``, ``"fisher"`` or ``"lowrank"``.
    """
    eps = jnp.asarray(step_size, dtype) * np.sqrt(dim)
    return mams_adapt.init(dim, dtype, eps, INITIAL_STEPS * eps, metric)


def burn_in_length(collect: np.ndarray) -> int:
    """Unadjusted transitions that start the warmup: the first half of Stan's
    initial fast buffer (none without slow windows).

    From a tail of the posterior the chains of a mesh sit at potentials that
    differ by orders of magnitude, and one shared step size cannot serve
    them: on sblrc (8 chains from NumPyro's ``init_to_median``, potentials
    1e4 to 9e6) dual averaging on the pooled acceptance took the step to
    1e-8, where the far chains never moved again. A unit velocity moves a
    chain by exactly the step size per step whatever the gradient, so
    unadjusted isokinetic steps bring every chain in at the initial step size
    and the length rule's pace (LAPS burns in the same way, Robnik & Seljak
    2026); the step size is held meanwhile and adapts from the first adjusted
    transition on.
    """
    starts = np.flatnonzero(collect)
    return int(starts[0]) // 2 if starts.size else 0


def build_step(
    potential_fn: Callable,
    num_warmup: int,
    target_accept: float = 0.9,
    axis_name: AxisName = None,
    *,
    max_num_steps: int = 1023,
    max_delta_energy: float = 1000.0,
    metric: str = "diag",
) -> Callable[[jax.Array, State, jax.Array], tuple[State, Info]]:
    """Build ``step(keys, state, real) -> (state, info)`` for a block of chains.

    Call ``step`` inside ``shard_map`` over a mesh whose ``axis_name`` axes
    carry chains (or outside one with ``axis_name=None``). ``keys`` holds one
    PRNG key per lane, so a chain's velocity and acceptance draws depend on
    its own key only; ``real`` is False on padding lanes, which never enter a
    pooled statistic.

    Args:
        potential_fn: Negative log density of one chain's position pytree.
        num_warmup: Adaptive transitions; later ones are frozen MAMS.
        target_accept: Target mean acceptance probability.
        axis_name: Mesh axis or axes to pool over; None: the local block.
        max_num_steps: Cap on the gradient evaluations of a transition.
        max_delta_energy: Energy error beyond which a transition diverges.
        metric: The metric adapted (``metric_window``).
    """
    collect, window_end = mass_schedule(num_warmup)
    slots = jnp.asarray(metric_window.buffer_slots(num_warmup))
    max_steps = max(max_num_steps // isokinetic.GRADIENTS_PER_STEP, 1)
    burn_in = burn_in_length(collect)
    hyper = mams_adapt.Hyper(
        num_warmup, target_accept, max_steps, burn_in, jnp.asarray(collect),
        jnp.asarray(window_end), metric, axis_name,
    )  # fmt: skip

    def step(keys: jax.Array, state: State, real: jax.Array) -> tuple[State, Info]:
        a = first_lane(state.adapt)
        x0, unravel = _flat(state.position)
        lanes, dtype = x0.shape[0], x0.dtype

        warm = a.step < num_warmup
        eps = jnp.exp(jnp.where(warm, a.log_step_size, a.log_step_size_avg))
        length = jnp.exp(jnp.where(warm, a.log_length, a.log_length_avg))
        jitter = halton(a.step, dtype)
        num_steps = jnp.clip(jnp.ceil(2.0 * jitter * length / eps), 1, max_steps)
        num_steps = num_steps.astype(jnp.int32)

        def potential(q: jax.Array) -> jax.Array:
            return potential_fn(unravel(q))

        start = (x0, state.potential_energy, _flat(state.grad)[0])
        adjusted = ~warm | (a.step >= burn_in)
        moved = isokinetic.transition(
            potential, keys, start, eps, a.metric, num_steps, adjusted
        )

        def adapt(a: MAMSAdaptState, kept: DrawBuffer) -> MAMSAdaptState:
            stats = mams_adapt.Stats(
                x0, state.potential_energy, moved, real, eps * num_steps, kept
            )
            return mams_adapt.adapt(a, stats, hyper)

        new = advance(state, a, warm, moved, unravel, slots, hyper.window_end, adapt)
        info = Info(
            accept_prob=moved.accept_prob,
            num_steps=jnp.full((lanes,), num_steps * isokinetic.GRADIENTS_PER_STEP),
            diverging=moved.delta > max_delta_energy,
            energy=moved.potential_energy,
            step_size=jnp.full((lanes,), eps),
        )
        return new, info

    return step
