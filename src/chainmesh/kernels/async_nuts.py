"""Lane-asynchronous NUTS: a device's chains advance one leapfrog step each.

Under ``vmap`` a block of chains runs NUTS in lockstep: each transition lasts
as long as the longest tree of the block. Here a chunk is one ``while_loop``
whose every iteration takes one leapfrog step on every lane (one vectorized
gradient). A lane carries its own trajectory (``async_tree``); when its tree
is done it finishes the transition on its own (adaptation, counters, its
draw) and starts the next one at the next iteration. It is NumPyro's NUTS
transition for transition: the same keys, splits and updates as
``sample_kernel``, so chain ``i`` draws what it would draw alone.

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
from numpyro.infer.hmc import HMCState, momentum_generator
from numpyro.infer.hmc_util import IntegratorState, warmup_adapter

from chainmesh.config import SamplerConfig
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


def _single_block(imm: dict, z: dict) -> jax.Array:
    """The one mass-matrix block chainmesh adapts, covering every site."""
    if len(imm) != 1 or next(iter(imm)) != tuple(sorted(z)):
        raise ValueError(f"expected one mass-matrix block of all sites, got {imm}")
    return next(iter(imm.values()))


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

    def start(state: HMCState, ckpts: jax.Array) -> Lane:
        """``sample_kernel`` up to ``build_tree``'s first doubling."""
        next_key, key_momentum, key = random.split(state.rng_key, 3)
        adapt = state.adapt_state
        r = momentum_generator(state.z, adapt.mass_matrix_sqrt, key_momentum)
        r = ravel_pytree(r)[0]
        imm = _single_block(adapt.inverse_mass_matrix, state.z)
        energy0 = state.potential_energy + at.kinetic_energy(imm, r)
        z, g = ravel_pytree(state.z)[0], ravel_pytree(state.z_grad)[0]
        tree = at.new_tree(z, r, g, state.potential_energy, energy0)
        sub, key = at.start_doubling(tree, key, ckpts)
        return Lane(state, next_key, energy0, tree, sub, key)

    def finish(lane: Lane, unravel: Callable) -> HMCState:
        """``sample_kernel`` after ``build_tree``: the chain's next state."""
        s, tree = lane.state, lane.tree
        accept_prob = tree.sum_accept / tree.n_prop
        z, z_grad = unravel(tree.z_prop), unravel(tree.g_prop)
        z_info = IntegratorState(z, None, tree.pe_prop, z_grad)
        warm = s.i < num_warmup
        adapt = wa_update(s.i, accept_prob, z_info, s.adapt_state)
        adapt = at.select(warm, adapt, s.adapt_state)
        itr = s.i + 1
        n = jnp.where(warm, itr, itr - num_warmup)
        mean = s.mean_accept_prob + (accept_prob - s.mean_accept_prob) / n
        return HMCState(
            itr, z, z_grad, tree.pe_prop, tree.energy_prop, s.r,
            s.trajectory_length, tree.n_prop, accept_prob, mean,
            tree.diverging, adapt, lane.next_key,
        )  # fmt: skip

    def step(lane: Lane, active, value_and_grad: Callable, unravel: Callable):
        """One leaf on a lane: ``(lane, subtree done, tree done, next state)``.

        An idle lane computes its step too (lanes are vectorized) but keeps
        its state, so it stays finite.
        """
        adapt = lane.state.adapt_state
        imm = _single_block(adapt.inverse_mass_matrix, lane.state.z)
        tree, sub, sub_done, tree_done = at.advance(
            lane.tree, lane.sub, value_and_grad, imm, adapt.step_size,
            lane.energy0, max_depth,
        )  # fmt: skip
        lane = at.select(active, lane._replace(tree=tree, sub=sub), lane)
        return lane, active & sub_done, active & tree_done, finish(lane, unravel)

    def restart(lane: Lane, state: HMCState, fresh, grow) -> Lane:
        """The lane's next doubling: of its tree when ``grow``, of a new
        transition of ``state`` when ``fresh``; ``state`` becomes its state."""
        ckpts = (lane.sub.r_ckpts, lane.sub.r_sum_ckpts)
        sub, key = at.start_doubling(lane.tree, lane.key, ckpts)
        lane = at.select(grow, lane._replace(sub=sub, key=key), lane)
        return at.select(fresh, start(state, ckpts), lane._replace(state=state))

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
        from chainmesh.program import _add_wide

        num_chains = real.shape[0]
        width = num_chains if lanes is None else min(lanes, num_chains)
        potential = gen(*args, **kwargs)
        flat0, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], state.z))

        def value_and_grad(z):
            return jax.value_and_grad(lambda q: potential(unravel(q)))(z)

        lane_step = jax.vmap(
            partial(step, value_and_grad=value_and_grad, unravel=unravel)
        )
        owed = (n_draws * per_draw).astype(jnp.int32)
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
        ckpts = jnp.zeros((width, max_depth, flat0.size), flat0.dtype)
        lanes0 = jax.vmap(start)(states, (ckpts, ckpts))
        extra = jax.tree.map(
            lambda v: jnp.zeros((num_chains, size), v.dtype),
            extra_fields(jax.tree.map(lambda x: x[0], state)),
        )
        z = jnp.zeros((num_chains, size, flat0.size), flat0.dtype)
        counts = jnp.zeros((3, 2), jnp.int32)
        carry = _Carry(lanes0, active, chain, pool, done, done, z, extra, counts)

        def body(c: _Carry) -> _Carry:
            lanes_, sub_done, tree_done, new = lane_step(c.lanes, c.active)
            on = jnp.where(c.active, c.chain, none)
            ends = jnp.where(tree_done, c.chain, none)
            done = c.done.at[ends].add(1, mode="drop")
            steps = c.steps.at[on].add(1, mode="drop")
            t = done.at[c.chain].get(mode="fill", fill_value=0)
            row = jnp.where(tree_done & (t % per_draw == 0), c.chain, none)
            col = t // per_draw - 1
            z = c.z.at[row, col].set(jax.vmap(_flat)(new.z), mode="drop")
            extra = jax.tree.map(
                lambda b, v: b.at[row, col].set(v, mode="drop"),
                c.extra,
                extra_fields(new),
            )
            is_real = real.at[c.chain].get(mode="fill", fill_value=False)
            counted = jnp.stack(
                [
                    (c.active & is_real).sum(),
                    jnp.asarray(width),
                    (tree_done & is_real & new.diverging).sum(),
                ]
            )
            counts = _add_wide(c.counts, counted.astype(jnp.int32))
            if c.pool is None:
                states = _where_lanes(tree_done, new, lanes_.state)
                fresh = tree_done & (t < owed)
                chain, pool = c.chain, None
                active = c.active & ~(tree_done & (t >= owed))
            else:
                pool = jax.tree.map(
                    lambda p, x: p.at[ends].set(x, mode="drop"), c.pool, new
                )
                chain, fresh, states = assign(
                    pool, c.chain, tree_done | ~c.active, done
                )
                states = _where_lanes(fresh, states, lanes_.state)
                active = (c.active & ~tree_done) | fresh
            grow = sub_done & ~tree_done
            lanes_ = jax.vmap(restart)(lanes_, states, fresh, grow)
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
        counts = jnp.concatenate([out.counts, _bound_words(out.steps, width)[None]])
        final = out.lanes.state if out.pool is None else out.pool
        return final, draws, out.extra, counts

    return AsyncNUTS(chunk=chunk)


def _bound_words(steps: jax.Array, width: int) -> jax.Array:
    """``width x max(ceil(sum(steps) / width), max(steps))`` as two words.

    Exact in int32 for any ``width < 2**20``: the product is built from
    10-bit pieces so no partial product overflows.
    """
    from chainmesh.program import LOW_BITS

    mask = (1 << LOW_BITS) - 1
    q, r = steps // width, steps % width
    v = jnp.maximum(q.sum() + (r.sum() + width - 1) // width, steps.max())
    lo_v, hi_v = v & mask, v >> LOW_BITS
    a, b = lo_v >> 10, lo_v & 1023
    lo = b * width + ((a * width) & 1023) * 1024
    hi = hi_v * width + ((a * width) >> 10)
    return jnp.stack([lo & mask, hi + (lo >> LOW_BITS)]).astype(jnp.int32)
