"""A Metropolis-adjusted isokinetic trajectory of a block of lanes (MAMS).

The microcanonical (isokinetic, ESH) dynamics move a position ``x`` with a
velocity ``u`` of unit norm in the metric's whitened coordinates ``y =
L^{-1} x`` (``Sigma = L L^T``): ``dx/dt = L u``, and the gradient of the log
density turns ``u`` on the sphere. The velocity update of a step has a closed
form (Steeg & Galstyan 2021; Robnik et al. 2023), and with it the change of
the kinetic energy that makes the Metropolis test exact (Robnik, Cohn-Gordon
& Seljak 2025, MAMS). The integrator is the minimal-norm (McLachlan)
two-stage splitting ``B(b1) A(1/2) B(1 - 2 b1) A(1/2) B(b1)``: two gradients
per step, the last one reused by the next step.

Positions are flat ``(lanes, d)`` vectors; step size, metric and number of
steps are shared by the lanes (``d >= 2``: on a line the velocity cannot
turn).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from chainmesh.kernels import metrics

MINIMAL_NORM_B1 = 0.1931833275037836
"""The minimal-norm integrator's outer velocity coefficient (McLachlan 1995)."""

GRADIENTS_PER_STEP = 2
"""Gradient evaluations of one minimal-norm step."""


class Moved(NamedTuple):
    """One MAMS transition of every lane; vectors are ``(lanes, d)``.

    Attributes:
        x1: The proposals.
        x: The new positions: the proposal where accepted.
        potential_energy: ``(lanes,)`` at ``x``.
        grad: Gradient of the potential at ``x``.
        delta: ``(lanes,)`` energy error of the proposal, inf if not finite.
        accept_prob: ``(lanes,)`` Metropolis acceptance probability.
    """

    x1: jax.Array
    x: jax.Array
    potential_energy: jax.Array
    grad: jax.Array
    delta: jax.Array
    accept_prob: jax.Array


def turn(u: jax.Array, force: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The isokinetic velocity update of ``u`` over time ``eps``.

    Args:
        u: ``(d,)`` unit velocity (whitened coordinates).
        force: ``(d,)`` gradient of the log density in whitened coordinates.
        eps: Time of the update.

    Returns:
        The new unit velocity and the kinetic energy change of the update.
    """
    dim = u.shape[-1]
    norm = jnp.linalg.norm(force)
    e = jnp.where(norm > 0, force / jnp.where(norm > 0, norm, 1.0), 0.0)
    along = jnp.dot(u, e)
    delta = eps * norm / (dim - 1)
    zeta = jnp.exp(-delta)
    raw = e * (1 - zeta) * (1 + zeta + along * (1 - zeta)) + 2 * zeta * u
    new = raw / jnp.linalg.norm(raw)
    kinetic = (delta - jnp.log(2.0) + jnp.log(1 + along + (1 - along) * zeta**2)) * (
        dim - 1
    )
    return new, kinetic


def transition(
    potential: Callable,
    keys: jax.Array,
    start: tuple[jax.Array, jax.Array, jax.Array],
    eps: jax.Array,
    metric: metrics.Metric,
    num_steps: jax.Array,
    adjusted: jax.Array | bool = True,
) -> Moved:
    """A fresh velocity, ``num_steps`` minimal-norm steps, the Metropolis test.

    Args:
        potential: Potential energy (negative log density) of one lane's flat
            position ``(d,)``.
        keys: One PRNG key per lane: its velocity and its uniform.
        start: ``(x, potential energy, grad of the potential)`` of every lane.
        eps: Step size (shared), in time units of the whitened coordinates.
        metric: The inverse mass matrix ``Sigma`` (shared).
        num_steps: Integrator steps (shared, traced); two gradients each.
        adjusted: False: accept every finite end point (an unadjusted
            burn-in step; ``accept_prob`` still reports the Metropolis one).
    """
    x0, u0, g0 = start
    value_and_grad = jax.vmap(jax.value_and_grad(potential))
    pairs = jax.vmap(jax.random.split)(keys)
    noise = jax.vmap(partial(jax.random.normal, shape=x0.shape[1:], dtype=x0.dtype))
    v = noise(pairs[:, 0])
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    b1 = jnp.asarray(MINIMAL_NORM_B1, x0.dtype)
    b2 = 1 - 2 * b1
    turns = jax.vmap(turn, in_axes=(0, 0, None))

    def kick(v, g, coef, kinetic):
        v, change = turns(v, -metrics.whitened_velocity(metric, g), coef * eps)
        return v, kinetic + change

    def drift(x, v):
        x = x + 0.5 * eps * metrics.unwhiten(metric, v)
        u, g = value_and_grad(x)
        return x, u, g

    def step(_, carry):
        x, v, _u, g, kinetic = carry
        v, kinetic = kick(v, g, b1, kinetic)
        x, _u, g = drift(x, v)
        v, kinetic = kick(v, g, b2, kinetic)
        x, u, g = drift(x, v)
        v, kinetic = kick(v, g, b1, kinetic)
        return x, v, u, g, kinetic

    kinetic0 = jnp.zeros_like(u0)
    x1, _, u1, g1, kinetic = lax.fori_loop(
        0, num_steps, step, (x0, v, u0, g0, kinetic0)
    )
    delta = u1 - u0 + kinetic
    delta = jnp.where(jnp.isfinite(delta), delta, jnp.inf)
    accept_prob = jnp.minimum(jnp.exp(-delta), 1.0)
    uniform = jax.vmap(partial(jax.random.uniform, dtype=x0.dtype))(pairs[:, 1])
    accept = jnp.where(adjusted, uniform < accept_prob, jnp.isfinite(delta))

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)), new, old)

    return Moved(x1, pick(x1, x0), pick(u1, u0), pick(g1, g0), delta, accept_prob)
