"""ChEES-HMC and MAMS as ``Sampler`` kernels: per-chain state, pooled block step.

``chees`` and ``mams`` implement block transitions and their pooled
adaptation, with one interface (``init_adapt``, ``build_step``, ``State``);
this module gives either the state layout the programs expect (one pytree per chain,
with ``z``, ``num_steps``, ``diverging`` and the extra fields), NumPyro's
initialization (init strategies; initial step size 1, as NumPyro's NUTS), and
per-chain keys: a chain's momentum and acceptance draws come from its own
``rng_key``, split once per transition as NumPyro does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from chainmesh.config import SamplerConfig
from chainmesh.kernels import chees, mams, metric_window
from chainmesh.kernels.base import Kernel, named_fields, skip_counter
from chainmesh.kernels.nuts import build_nuts
from chainmesh.kernels.pooled_nuts import POOL_AXIS
from chainmesh.model import ModelInfo, potential_fn_gen


class ChEESChain(NamedTuple):
    """One chain's ChEES (or MAMS) state (a block stacks these on a leading axis).

    Attributes:
        i: Transitions taken.
        z: Unconstrained position, site name -> value.
        z_grad: Gradient of the potential at ``z``.
        potential_energy: Potential at ``z``.
        energy: Hamiltonian after the last transition.
        num_steps: Leapfrog steps of the last transition (equal on every chain).
        accept_prob: Its Metropolis acceptance probability.
        diverging: Whether its energy error exceeded the threshold.
        step_size: The step size it used.
        rng_key: The chain's key, split once per transition.
        adapt: The shared adaptation state (equal on every chain): a
            ``ChEESAdaptState`` or a ``MAMSAdaptState``.
        buffer: The chain's draws kept for the low-rank metric estimate.
    """

    i: jax.Array
    z: Any
    z_grad: Any
    potential_energy: jax.Array
    energy: jax.Array
    num_steps: jax.Array
    accept_prob: jax.Array
    diverging: jax.Array
    step_size: jax.Array
    rng_key: jax.Array
    adapt: Any
    buffer: metric_window.DrawBuffer


def build_chees(model: Callable, config: SamplerConfig, info: ModelInfo) -> Kernel:
    """ChEES-HMC for ``model`` (``kernel="chees"``), pooled over the mesh.

    The warmup length, acceptance target and ``2**max_tree_depth - 1`` step
    cap come from ``config``; the adaptation pools over every real chain of
    the ``chain`` mesh axis (never over data shards).
    """
    return build_block_kernel(model, config, info, chees, _skip)


def build_mams(model: Callable, config: SamplerConfig, info: ModelInfo) -> Kernel:
    """MAMS for ``model`` (``kernel="mams"``), tuned from the whole mesh.

    Like ``build_chees``: ``config`` gives the warmup length, the acceptance
    target and the cap of ``2**max_tree_depth - 1`` gradients a transition.

    Raises:
        ValueError: The model has fewer than 2 unconstrained coordinates (a
            unit velocity cannot turn on a line); raised while the kernel is
            built, before anything compiles.
    """
    dim = sum(int(np.prod(s.shape)) for s in info.unconstrained.values())
    if dim < 2:
        raise ValueError(
            f"kernel='mams' needs at least 2 unconstrained coordinates (its "
            f"velocity turns on a sphere); the model has {dim}. Use "
            "kernel='nuts' or kernel='chees' for a one-parameter model"
        )
    return build_block_kernel(model, config, info, mams, skip_counter_adapt)


def build_block_kernel(
    model: Callable, config: SamplerConfig, info: ModelInfo, module: Any, skip: Callable
) -> Kernel:
    """A ``Kernel`` of the block transition of ``module`` (``chees`` or
    ``mams``), with ``skip`` its ``Kernel.skip``."""
    nuts = build_nuts(model, config, info)
    enum = bool(info.enumerated)
    max_steps = 2**config.max_tree_depth - 1

    def init(key: jax.Array, strategy: Any, args: tuple, kwargs: dict):
        state, valid = nuts.init(key, strategy, args, kwargs)
        flat, _ = ravel_pytree(state.z)
        adapt = module.init_adapt(
            flat.size, flat.dtype, state.adapt_state.step_size, metric=config.metric
        )
        zero = jnp.zeros_like(state.accept_prob)
        chain = ChEESChain(
            i=state.i,
            z=state.z,
            z_grad=state.z_grad,
            potential_energy=state.potential_energy,
            energy=state.energy,
            num_steps=jnp.zeros((), jnp.int32),
            accept_prob=zero,
            diverging=jnp.array(False),
            step_size=state.adapt_state.step_size,
            rng_key=state.rng_key,
            adapt=adapt,
            buffer=metric_window.buffer_init(config.metric, flat.size, flat.dtype),
        )
        return chain, valid

    def block(args: tuple, kwargs: dict, real: jax.Array) -> Callable:
        potential = potential_fn_gen(model, enum)(*args, **kwargs)
        step = module.build_step(
            potential,
            config.num_warmup,
            config.target_accept_prob,
            POOL_AXIS,
            max_num_steps=max_steps,
            metric=config.metric,
        )

        def run(s: ChEESChain) -> ChEESChain:
            keys = jax.vmap(jax.random.split)(s.rng_key)
            moved, out = step(
                keys[:, 1],
                module.State(s.z, s.potential_energy, s.z_grad, s.adapt, s.buffer),
                real,
            )
            return ChEESChain(
                i=s.i + 1,
                z=moved.position,
                z_grad=moved.grad,
                potential_energy=moved.potential_energy,
                energy=out.energy,
                num_steps=out.num_steps,
                accept_prob=out.accept_prob,
                diverging=out.diverging,
                step_size=out.step_size,
                rng_key=keys[:, 0],
                adapt=moved.adapt,
                buffer=moved.buffer,
            )

        return run

    return Kernel(init=init, step=None, block=block, fields=_fields, skip=skip)


def _skip(s: ChEESChain, to: jax.Array) -> ChEESChain:
    """Jump to transition ``to`` (the final buffer): the trajectory length
    goes on from the last window's average, as after the last window."""
    a, jump = s.adapt, to >= 0
    length = jnp.where(jump, a.log_trajectory_length_kept, a.log_trajectory_length)
    average = jnp.where(jump, length, a.log_trajectory_length_avg)
    adapt = a._replace(
        step=jnp.where(jump, to, a.step).astype(a.step.dtype),
        log_trajectory_length=length,
        log_trajectory_length_avg=average,
    )
    return skip_counter(s, to)._replace(adapt=adapt)


def skip_counter_adapt(s: ChEESChain, to: jax.Array) -> ChEESChain:
    """Jump to transition ``to``: the counters move, the adaptation goes on
    from where the last window end left it."""
    a = s.adapt
    step = jnp.where(to >= 0, to, a.step).astype(a.step.dtype)
    return skip_counter(s, to)._replace(adapt=a._replace(step=step))


def _fields(state: ChEESChain) -> dict[str, jax.Array]:
    return named_fields(state, state.step_size)
