"""A fixed-length HMC transition of a block of lanes, each with its own key.

Positions are flat ``(lanes, d)`` vectors; step size, metric (a diagonal or
low-rank-modified inverse mass matrix, ``metrics.Metric``, O(d k) per
operation) and number of leapfrog steps are shared by the lanes, so a
vectorized block runs no step that a lane does not need. One gradient per
leapfrog step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from chainmesh.kernels import metrics


class Moved(NamedTuple):
    """One HMC transition of every lane; vectors are ``(lanes, d)``.

    Attributes:
        x1: The proposals.
        p1: The momenta at the proposals.
        x: The new positions: the proposal where accepted.
        potential_energy: ``(lanes,)`` at ``x``.
        grad: Gradient of the potential at ``x``.
        energy: ``(lanes,)`` Hamiltonian at the new state.
        delta: ``(lanes,)`` energy error of the proposal, inf if not finite.
        accept_prob: ``(lanes,)`` Metropolis acceptance probability.
    """

    x1: jax.Array
    p1: jax.Array
    x: jax.Array
    potential_energy: jax.Array
    grad: jax.Array
    energy: jax.Array
    delta: jax.Array
    accept_prob: jax.Array


def transition(
    potential: Callable,
    keys: jax.Array,
    start: tuple[jax.Array, jax.Array, jax.Array],
    eps: jax.Array,
    metric: metrics.Metric | jax.Array,
    num_steps: jax.Array,
) -> Moved:
    """``num_steps`` leapfrog steps of every lane, then the Metropolis test.

    Args:
        potential: Potential energy of one lane's flat position ``(d,)``.
        keys: One PRNG key per lane: its momentum and its uniform.
        start: ``(x, potential energy, grad)`` of every lane.
        eps: Step size (shared).
        metric: The inverse mass matrix (shared): a ``metrics.Metric``, or
            a ``(d,)`` diagonal.
        num_steps: Leapfrog steps (shared, traced).
    """
    x0, u0, g0 = start
    if not isinstance(metric, metrics.Metric):
        metric = metrics.diagonal(metric)
    value_and_grad = jax.vmap(jax.value_and_grad(potential))
    pairs = jax.vmap(jax.random.split)(keys)
    key_p, key_u = pairs[:, 0], pairs[:, 1]
    noise = jax.vmap(partial(jax.random.normal, shape=x0.shape[1:], dtype=x0.dtype))
    p0 = metrics.momentum(metric, noise(key_p))

    def leapfrog(_, carry):
        x, p, _u, g = carry
        p = p - 0.5 * eps * g
        x = x + eps * metrics.velocity(metric, p)
        u, g = value_and_grad(x)
        return x, p - 0.5 * eps * g, u, g

    x1, p1, u1, g1 = lax.fori_loop(0, num_steps, leapfrog, (x0, p0, u0, g0))
    h0 = u0 + metrics.kinetic_energy(metric, p0)
    h1 = u1 + metrics.kinetic_energy(metric, p1)
    delta = jnp.where(jnp.isnan(h1 - h0), jnp.inf, h1 - h0)
    accept_prob = jnp.minimum(jnp.exp(-delta), 1.0)
    uniform = jax.vmap(partial(jax.random.uniform, dtype=x0.dtype))(key_u)
    accept = uniform < accept_prob

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)), new, old)

    x, u, g, h = pick(x1, x0), pick(u1, u0), pick(g1, g0), pick(h1, h0)
    return Moved(x1, p1, x, u, g, h, delta, accept_prob)
