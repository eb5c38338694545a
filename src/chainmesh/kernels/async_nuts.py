"""Lane-asynchronous NUTS: a device's chains advance one leapfrog step each.

Under ``vmap`` a block of chains runs NUTS in lockstep: each transition lasts
as long as the longest tree of the block. Here a chunk is one ``while_loop``
whose every iteration takes one leapfrog step on every lane (one vectorized
gradient). A lane carries its own trajectory (``async_tree``); when its tree
is done it finishes the transition on its own (adaptation, counters, its
draw) and starts the next one at the next iteration. It is NumPyro's NUTS
transition for transition: the same keys, splits and updates as
``sample_kernel``, so chain ``i``'s draws depend on its own state only (they
equal those of ``vmap(sample_kernel)`` to the last bit on CPU; the vectorized
gradient rounds differently from an unbatched one).

With fewer lanes than chains, a lane that finishes a transition hands its
chain back and takes the ready chain with the fewest transitions done in the
chunk (then the lowest index), so the lanes stay busy until the work runs out.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax, random
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import HMCState
from numpyro.infer.hmc_util import IntegratorState, warmup_adapter

from chainmesh.config import SamplerConfig
from chainmesh.counters import _add_wide, bound_words
from chainmesh.kernels import async_tree as at
from chainmesh.kernels.nuts import extra_fields
from chainmesh.model import ModelInfo, potential_fn_gen

ASYNC_COUNTERS = ("leapfrog_steps", "lockstep_steps", "divergences", "bound_steps")
"""Per-device counters of an async chunk (two int32 words each).

``leapfrog_steps``/``divergences``: real chains only. ``lockstep_steps``: lane
steps executed (iterations x lanes, idle or not). ``bound_steps``: the fewest
any schedule could execute: lanes x max(ceil(all steps / lanes), the longest
chain's steps).
"""


class AsyncNUTS(NamedTuple):
    """Lane-asynchronous NUTS for a device's block of chains.

    Attributes:
        chunk: ``(state, real, n_draws, per_draw, collect, *, size, post, args,
            kwargs, lanes=None) -> (state, draws, extra, counts)``, the
            contract of ``program._block_chunk`` with ``ASYNC_COUNTERS``.
    """

    chunk: Callable[..., tuple[HMCState, dict, dict, jax.Array]]


class Lane(NamedTuple):
    """A lane's transition in progress.

    ``state`` is its chain's state when the transition began, ``next_key``
    the chain's key after it, ``key`` the tree builder's key.
    """

    state: HMCState
    next_key: jax.Array
    energy0: jax.Array
    tree: at.Tree
    sub: at.Subtree
    key: jax.Array


class _Carry(NamedTuple):
    lanes: Lane
    active: jax.Array  # (L,) the lane runs a transition
    chain: jax.Array  # (L,) its chain (C: none)
    pool: HMCState | None  # (C, ...) states of chains not on a lane (L < C)
    done: jax.Array  # (C,) transitions finished in this chunk
    steps: jax.Array  # (C,) leapfrog steps taken in this chunk
    z: jax.Array  # (C, size, D) unconstrained draws
    extra: dict[str, jax.Array]  # (C, size) per-draw fields
    counts: jax.Array  # (3, 2) words: leapfrog, lockstep, divergences


def _flat(tree: Any) -> jax.Array:
    return ravel_pytree(tree)[0]


def _where_lanes(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-lane select between two pytrees with lanes on axis 0."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def _blank(states: HMCState, flat: jax.Array, max_depth: int) -> Lane:
    """A lane of zeros shaped for ``states`` (a block), before its first start."""
    lanes = states.potential_energy.shape[0]

    def zeros(*shape, dtype=flat.dtype):
        return jnp.zeros((lanes, *shape), dtype)

    vec, num, no = zeros(flat.size), zeros(), zeros(dtype=bool)
    count, keys = zeros(dtype=states.num_steps.dtype), states.rng_key
    tree = at.Tree(
        *[vec] * 8, num, num, zeros(dtype=jnp.int32), num, vec, no, no, num, count
    )
    ckpts = zeros(max_depth, flat.size)
    sub = at.Subtree(
        *[vec] * 5, num, num, num, vec, no, no, num, count, ckpts, ckpts, keys, keys, no
    )
    return Lane(states, keys, num, tree, sub, keys)


def _block(blocks: dict) -> jax.Array:
    """The one mass-matrix block chainmesh adapts (all sites, sorted)."""
    return next(iter(blocks.values()))


def _flat_state(state: HMCState) -> HMCState:
    """A chain's state with flat ``z`` and ``z_grad`` (inside a chunk)."""
    return state._replace(z=_flat(state.z), z_grad=_flat(state.z_grad))


def _sites_state(state: HMCState, unravel: Callable) -> HMCState:
    """The inverse of ``_flat_state``."""
    return state._replace(z=unravel(state.z), z_grad=unravel(state.z_grad))


def _momentum(mass_matrix_sqrt: jax.Array, key: jax.Array) -> jax.Array:
    """NumPyro's ``momentum_generator`` for one block, flat (same keys)."""
    (key,) = random.split(key, 1)
    eps = random.normal(key, mass_matrix_sqrt.shape[:1])
    if mass_matrix_sqrt.ndim == 1:
        return jnp.multiply(mass_matrix_sqrt, eps)
    return jnp.dot(mass_matrix_sqrt, eps)


def build_async(model: Callable, config: SamplerConfig, info: ModelInfo) -> AsyncNUTS:
    """Lane-asynchronous NUTS for ``model``, adapted as ``build_nuts`` adapts.

    Args:
        model: NumPyro model (``model.prepared``: enumeration applied).
        config: Sampler configuration (warmup length, target, depth, mass).
        info: The model's sites.
    """
    gen = potential_fn_gen(model, bool(info.enumerated))
    dense_mass = [tuple(sorted(info.latent))] if config.dense_mass else []
    _, wa_update = warmup_adapter(
        config.num_warmup,
        dense_mass=dense_mass,
        target_accept_prob=config.target_accept_prob,
    )
    num_warmup, max_depth = config.num_warmup, config.max_tree_depth

    def begin(state: HMCState) -> tuple:
        """``sample_kernel`` up to ``build_tree``'s loop: ``(next key,
        energy, one-point tree, tree key)`` of a flat state."""
        next_key, key_momentum, key = random.split(state.rng_key, 3)
        adapt = state.adapt_state
        r = _momentum(_block(adapt.mass_matrix_sqrt), key_momentum)
        energy0 = state.potential_energy + at.kinetic_energy(
            _block(adapt.inverse_mass_matrix), r
        )
        tree = at.new_tree(state.z, r, state.z_grad, state.potential_energy, energy0)
        return next_key, energy0, tree, key

    def finish(lane: Lane, tree: at.Tree, adapted: Any) -> HMCState:
        """``sample_kernel`` after ``build_tree``: the chain's next flat state
        (``adapted``: the adaptation state ``wa_update`` returns)."""
        s = lane.state
        accept_prob = tree.sum_accept / tree.n_prop
        warm = s.i < num_warmup
        itr = s.i + 1
        n = jnp.where(warm, itr, itr - num_warmup)
        mean = s.mean_accept_prob + (accept_prob - s.mean_accept_prob) / n
        return HMCState(
            itr, tree.z_prop, tree.g_prop, tree.pe_prop, tree.energy_prop, s.r,
            s.trajectory_length, tree.n_prop, accept_prob, mean, tree.diverging,
            at.select(warm, adapted, s.adapt_state), lane.next_key,
        )  # fmt: skip

    def step(lane: Lane, value_and_grad: Callable):
        """One leaf on a lane: ``(lane, tree with the subtree in, subtree
        done, tree done)``; the lane's tree is kept (see ``restart``).

        A lane without work steps too (lanes are vectorized): it runs
        transitions that nothing records, so its values stay finite.
        """
        adapt = lane.state.adapt_state
        combined, sub, sub_done, tree_done = at.advance(
            lane.tree, lane.sub, value_and_grad, _block(adapt.inverse_mass_matrix),
            adapt.step_size, lane.energy0, max_depth,
        )  # fmt: skip
        return lane._replace(sub=sub), combined, sub_done, tree_done

    def restart(lane: Lane, combined, state: HMCState, fresh, sub_done) -> Lane:
        """The lane's next doubling: of a new transition of ``state`` when
        ``fresh``, else of its tree (``combined`` in) when ``sub_done``."""
        tree = at.select(sub_done, combined, lane.tree)
        kept = (lane.next_key, lane.energy0, tree, lane.key)
        next_key, energy0, tree, key = at.select(fresh, begin(state), kept)
        sub, new_key = at.start_doubling(tree, key, lane.sub)
        sub, key = at.select(fresh | sub_done, (sub, new_key), (lane.sub, key))
        return Lane(state, next_key, energy0, tree, sub, key)

    def chunk(
        state: HMCState,
        real: jax.Array,
        n_draws: jax.Array,
        per_draw: jax.Array,
        collect: jax.Array,
        *,
        size: int,
        post: Callable,
        args: tuple,
        kwargs: dict,
        lanes: int | None = None,
    ) -> tuple[HMCState, dict, dict, jax.Array]:
        """Run ``n_draws x per_draw`` transitions of every chain of the block.

        Args:
            state: The block's NUTS states, chains on axis 0.
            real: ``(C,)`` False for padding chains (run, not counted).
            n_draws: Draws per chain (runtime), at most ``size``.
            per_draw: Transitions per draw (runtime thinning).
            collect: Write the draws (the extra fields are always written).
            size: Draw slots of the buffers.
            post: Unconstrained z of a block -> constrained draws.
            args: Model positional arguments (the data).
            kwargs: Model keyword arguments.
            lanes: Lanes (default and at most: one per chain).

        Returns:
            ``(state, draws, extra, counts)``: draws and extra ``(C, size,
            ...)``, counts ``(len(ASYNC_COUNTERS), 2)`` words.
        """
        if lanes is not None and lanes < 1:
            raise ValueError(f"lanes must be None or >= 1, got {lanes}")
        num_chains = real.shape[0]
        width = num_chains if lanes is None else min(lanes, num_chains)
        potential = gen(*args, **kwargs)
        flat0, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], state.z))
        blocks = tuple(state.adapt_state.inverse_mass_matrix)
        if blocks != (tuple(sorted(state.z)),):
            raise ValueError(f"expected one mass-matrix block of all sites: {blocks}")
        state = jax.vmap(_flat_state)(state)

        def value_and_grad(z):
            return jax.value_and_grad(lambda q: potential(unravel(q)))(z)

        lane_step = jax.vmap(partial(step, value_and_grad=value_and_grad))
        lane_restart = jax.vmap(restart)

        def adapt(state: HMCState, tree: at.Tree) -> Any:
            accept_prob = tree.sum_accept / tree.n_prop
            z_info = IntegratorState(unravel(tree.z_prop), None, tree.pe_prop, None)
            return wa_update(state.i, accept_prob, z_info, state.adapt_state)

        def lane_finish(lanes_: Lane, combined: at.Tree) -> HMCState:
            """Every lane's would-be next state. Past warmup (the phase of the
            block, not a lane's transition) the adaptation is not computed."""
            adapted = lax.cond(
                jnp.any(lanes_.state.i < num_warmup),
                lambda: jax.vmap(adapt)(lanes_.state, combined),
                lambda: lanes_.state.adapt_state,
            )
            return jax.vmap(finish)(lanes_, combined, adapted)

        owed = jnp.asarray(n_draws * per_draw, jnp.int32)
        none = jnp.int32(num_chains)

        def assign(pool, chain, free, done):
            """Free lanes take ready chains: fewest done first, then lowest index."""
            busy = jnp.zeros(num_chains + 1, bool).at[chain].set(~free)[:-1]
            ready = (done < owed) & ~busy
            rank = jnp.cumsum(free) - 1
            gets = free & (rank < ready.sum())
            key = jnp.where(ready, done, jnp.iinfo(jnp.int32).max)
            pick = jnp.argsort(key, stable=True)[jnp.clip(rank, 0, width - 1)]
            chain = jnp.where(gets, pick, jnp.where(free, none, chain))
            states = jax.tree.map(lambda x: jnp.take(x, chain, 0, mode="clip"), pool)
            return chain, gets, states

        done = jnp.zeros(num_chains, jnp.int32)
        if width == num_chains:
            chain, active, pool, states = (
                jnp.arange(num_chains),
                owed > done,
                None,
                state,
            )
        else:
            pool = state
            chain, active, states = assign(
                pool, jnp.full(width, none), jnp.ones(width, bool), done
            )
        every = jnp.ones(width, bool)
        blank = _blank(states, flat0, max_depth)
        lanes0 = lane_restart(blank, blank.tree, states, every, every)
        extra = jax.tree.map(
            lambda v: jnp.zeros((num_chains, size), v.dtype),
            extra_fields(jax.tree.map(lambda x: x[0], state)),
        )
        z = jnp.zeros((num_chains, size, flat0.size), flat0.dtype)
        counts = jnp.zeros((3, 2), jnp.int32)
        carry = _Carry(lanes0, active, chain, pool, done, done, z, extra, counts)

        def body(c: _Carry) -> _Carry:
            lanes_, combined, sub_done, tree_done = lane_step(c.lanes)
            new = lane_finish(lanes_, combined)
            ends = c.active & tree_done
            if c.pool is None:  # lane i runs chain i
                done, steps = c.done + ends, c.steps + c.active
                t = done
            else:
                at_end = jnp.where(ends, c.chain, none)
                done = c.done.at[at_end].add(1, mode="drop")
                on = jnp.where(c.active, c.chain, none)
                steps = c.steps.at[on].add(1, mode="drop")
                t = done.at[c.chain].get(mode="fill", fill_value=0)
            row = jnp.where(ends & (t % per_draw == 0), c.chain, none)
            col = t // per_draw - 1
            z = c.z.at[row, col].set(combined.z_prop, mode="drop")
            extra = jax.tree.map(
                lambda b, v: b.at[row, col].set(v, mode="drop"),
                c.extra,
                extra_fields(new),
            )
            is_real = real.at[c.chain].get(mode="fill", fill_value=False)
            counted = [
                (c.active & is_real).sum(),
                jnp.asarray(width),
                (ends & is_real & new.diverging).sum(),
            ]
            counts = _add_wide(c.counts, jnp.stack(counted).astype(jnp.int32))
            if c.pool is None:
                states = _where_lanes(ends, new, lanes_.state)
                chain, pool, fresh = c.chain, None, tree_done
                active = c.active & ~(ends & (t >= owed))
            else:
                pool = jax.tree.map(
                    lambda p, x: p.at[at_end].set(x, mode="drop"), c.pool, new
                )
                chain, gets, states = assign(pool, c.chain, ends | ~c.active, done)
                states = _where_lanes(gets, states, lanes_.state)
                active = (c.active & ~ends) | gets
                fresh = tree_done | gets
            lanes_ = lane_restart(lanes_, combined, states, fresh, sub_done)
            return _Carry(lanes_, active, chain, pool, done, steps, z, extra, counts)

        out = lax.while_loop(lambda c: c.active.any(), body, carry)

        def constrained(zs):
            sites = jax.vmap(jax.vmap(unravel))(zs)
            d = jax.vmap(post, in_axes=1, out_axes=1)(sites)
            keep = jnp.arange(size) < n_draws
            return jax.tree.map(
                lambda x: jnp.where(keep.reshape(1, size, *(1,) * (x.ndim - 2)), x, 0),
                d,
            )

        shapes = jax.eval_shape(constrained, out.z)
        draws = lax.cond(
            collect,
            constrained,
            lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            out.z,
        )
        counts = jnp.concatenate([out.counts, bound_words(out.steps, width)[None]])
        final = out.lanes.state if out.pool is None else out.pool
        final = jax.vmap(partial(_sites_state, unravel=unravel))(final)
        return final, draws, out.extra, counts

    return AsyncNUTS(chunk=chunk)
