"""The compiled SPMD programs: ``jit(shard_map(per_device))`` for init and chunks.

Why ``shard_map`` and not plain ``jit`` on sharded inputs: NUTS is a
``while_loop``. Under GSPMD the loop predicate of the vmapped tree builder
becomes a collective, so every device waits for the longest tree anywhere.
Under ``shard_map`` each device runs its own loop and stops on its own.

A chunk program runs ``n_draws`` draws of ``per_draw`` transitions each; both
are runtime scalars, as are ``collect`` (keep draws or not) and ``jump`` (end
warmup early), so warmup chunks, sampling chunks, thinning, a short last chunk
and an automatic run's decisions all reuse one executable.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from numpyro.infer.hmc import HMCState

from chainmesh.counters import (
    COUNTERS,
    LOW_BITS,
    _add_wide,
    bound_words,
    slowest_times,
    wide_total,
)
from chainmesh.kernels.base import Kernel
from chainmesh.keys import chain_key, with_values
from chainmesh.mesh import CHAIN, SHARD
from chainmesh.model import postprocess_fn

LOCKSTEP = COUNTERS.index("lockstep_steps")

__all__ = [
    "COUNTERS",
    "LOW_BITS",
    "ChunkOut",
    "chunk_program",
    "init_program",
    "wide_total",
]


class ChunkOut(NamedTuple):
    """What one chunk call returns (global arrays, chain axis sharded).

    Attributes:
        state: NUTS state after the chunk, ``(chains, ...)`` (``(shards,
            chains, ...)`` on a shard mesh).
        draws: Site name -> ``(chains, chunk, *site_shape)``, constrained.
        extra: Field name -> ``(chains, chunk)``.
        counters: ``(devices..., len(COUNTERS), 2)`` words, see ``wide_total``.
    """

    state: HMCState
    draws: dict[str, jax.Array]
    extra: dict[str, jax.Array]
    counters: jax.Array


def _write(buffers: Any, j: jax.Array, values: Any) -> Any:
    return jax.tree.map(lambda b, v: b.at[j].set(v), buffers, values)


def _draw_axis_last(tree: Any, lead: int) -> Any:
    """``(draw, *lanes, ...) -> (*lanes, draw, ...)`` for ``lead`` lane axes."""
    lanes = " ".join(f"l{i}" for i in range(lead))
    pattern = f"k {lanes} ... -> {lanes} k ..."
    return jax.tree.map(partial(rearrange, pattern=pattern), tree)


def _block_chunk(
    step: Callable,
    post: Callable,
    fields: Callable,
    size: int,
    state: HMCState,
    real: jax.Array,
    n_draws: jax.Array,
    per_draw: jax.Array,
    collect: jax.Array,
) -> tuple[HMCState, dict, dict, jax.Array]:
    """Run ``n_draws x per_draw`` transitions of ``step`` on a block of lanes.

    ``step`` and ``post`` act on the whole block (leading lane axes shaped like
    ``real``: chains, or shards x chains), so the longest trajectory of the
    block is visible here: that is what one vectorized transition pays for.
    ``post`` maps positions ``z`` to draws, ``fields`` a state to its extra
    fields.
    """
    lanes = real.size

    def buffer(s):
        return jnp.zeros((size, *s.shape), s.dtype)

    draws = jax.tree.map(buffer, jax.eval_shape(post, state.z))
    extra = jax.tree.map(buffer, fields(state))

    def transition(_, carry):
        s, counts, totals = carry
        s = step(s)
        steps = s.num_steps.astype(jnp.int32)
        used = jnp.where(real, steps, 0).sum()
        diverged = jnp.logical_and(real, s.diverging).sum()
        per_step = jnp.stack([used, steps.max() * lanes, diverged])
        counts = _add_wide(counts, per_step.astype(jnp.int32))
        return s, counts, totals + steps

    def one_draw(j, carry):
        s, d, e, counts, totals = carry
        s, counts, totals = lax.fori_loop(0, per_draw, transition, (s, counts, totals))
        e = _write(e, j, fields(s))
        d = lax.cond(collect, lambda d: _write(d, j, post(s.z)), lambda d: d, d)
        return s, d, e, counts, totals

    counts = jnp.zeros((len(COUNTERS) - 1, 2), jnp.int32)
    carry = (state, draws, extra, counts, jnp.zeros(real.shape, jnp.int32))
    state, draws, extra, counts, totals = lax.fori_loop(0, n_draws, one_draw, carry)
    # The bound: lanes x the longest lane's total in this chunk.
    counts = jnp.concatenate([counts, bound_words(totals.ravel(), lanes)[None]])
    lead = real.ndim
    return state, _draw_axis_last(draws, lead), _draw_axis_last(extra, lead), counts


def _chunk_fn(
    model: Callable,
    kernel: Kernel,
    inner: str,
    size: int,
    sharded: bool,
    lanes: int | None = None,
) -> Callable:
    """The per-device chunk: the device's lanes under ``inner``.

    ``vmap``: every lane of the device (chains, or shards x chains) in one
    vectorized transition. ``map``: one chain after another (``lax.map``); on
    a shard mesh each chain's transition is still vectorized over shards.
    ``async``: the kernel's own chunk loop (``lanes`` lanes per data set).
    """

    def chain_fns(args, kwargs):
        """One chain's transition (None for a block kernel) and draw map."""
        step = kernel.step and partial(kernel.step, args=args, kwargs=kwargs)
        return step, postprocess_fn(model, args, kwargs)

    def over_shards(pick: int, inner_map: Callable, args, kwargs):
        """A block function vmapped over shards, with each shard's data."""

        def block(x):
            def one_shard(xs, a, k):
                return inner_map(chain_fns(a, k)[pick])(xs)

            return jax.vmap(one_shard)(x, args, kwargs)

        return block

    def per_device(state, real, n_draws, per_draw, collect, jump, args, kwargs):
        if kernel.skip is not None:  # num_warmup="auto" ends warmup early
            state = kernel.skip(state, jump)
        run = partial(
            _block_chunk,
            fields=kernel.fields,
            size=size,
            n_draws=n_draws,
            per_draw=per_draw,
        )
        if kernel.chunk is not None:
            # Lane-asynchronous: the kernel runs the chunk loop itself.
            def one_block(state, real, args, kwargs):
                post = jax.vmap(postprocess_fn(model, args, kwargs))
                return kernel.chunk(
                    state, real, n_draws, per_draw, collect, size=size,
                    post=post, args=args, kwargs=kwargs, lanes=lanes,
                )  # fmt: skip

            if sharded:  # one loop per data set, vmapped over the device's sets
                s, d, e, c = jax.vmap(one_block)(state, real, args, kwargs)
                # The vmapped loop runs every set's lanes until the slowest
                # set's loop ends: the device pays sets x that set's lanes.
                paid = slowest_times(c[:, LOCKSTEP], c.shape[0])
                c = c.sum(0).at[LOCKSTEP].set(paid)
            else:
                s, d, e, c = one_block(state, real, args, kwargs)
        elif kernel.block is not None:
            # A block kernel (pooled adaptation) acts on the device's chains
            # at once, with collectives over the mesh's chain axis.
            if sharded:

                def step(x):
                    def one_shard(xs, a, k, r):
                        return kernel.block(a, k, r)(xs)

                    return jax.vmap(one_shard)(x, args, kwargs, real)

                post = over_shards(1, jax.vmap, args, kwargs)
            else:
                step = kernel.block(args, kwargs, real)
                post = jax.vmap(chain_fns(args, kwargs)[1])
            s, d, e, c = run(step, post, state=state, real=real, collect=collect)
        elif inner == "vmap":
            if sharded:
                step = over_shards(0, jax.vmap, args, kwargs)
                post = over_shards(1, jax.vmap, args, kwargs)
            else:
                # One chain per device: no batching to do, and an unbatched
                # NUTS compiles in about half the time of a vmapped one.
                batch = _single_as_block if real.shape[0] == 1 else jax.vmap
                step, post = map(batch, chain_fns(args, kwargs))
            s, d, e, c = run(step, post, state=state, real=real, collect=collect)
        else:
            # lax.map: one chain after another; no chain waits for another's tree.
            if sharded:
                step = over_shards(0, lambda f: f, args, kwargs)
                post = over_shards(1, lambda f: f, args, kwargs)
                to_chains = "s c ... -> c s ..."
            else:
                step, post = map(_single_as_block, chain_fns(args, kwargs))
                to_chains = "c ... -> c 1 ..."

            def one_chain(block):
                return run(step, post, state=block[0], real=block[1], collect=collect)

            chains = jax.tree.map(partial(rearrange, pattern=to_chains), (state, real))
            s, d, e, c = lax.map(one_chain, chains)
            back = "c s ... -> s c ..." if sharded else "c 1 ... -> c ..."
            s = jax.tree.map(partial(rearrange, pattern=back), s)
            d, e = (jax.tree.map(partial(rearrange, pattern=back), t) for t in (d, e))
            c = c.sum(0)
        return ChunkOut(s, d, e, c.reshape((1,) * (1 + sharded) + c.shape))

    return per_device


def _single_as_block(fn: Callable) -> Callable:
    """Apply a per-chain function to a block holding exactly one chain."""

    def block_fn(tree):
        out = fn(jax.tree.map(lambda x: x[0], tree))
        return jax.tree.map(lambda x: x[None], out)

    return block_fn


def _over_chains(fn: Callable, inner: str) -> Callable:
    """Run a per-chain function over a block: vmap (lockstep) or lax.map.

    A block of one chain runs the function unbatched (a smaller program).
    """

    def run(*xs):
        if jax.tree.leaves(xs)[0].shape[0] == 1:
            return _single_as_block(lambda x: fn(*x))(xs)
        if inner == "vmap":
            return jax.vmap(fn)(*xs)
        return lax.map(lambda x: fn(*x), xs)

    return run


def _init_fn(kernel: Kernel, strategy: Any, inner: str) -> Callable:
    def per_device(root, chains, given, use_given, values, args, kwargs):
        def one(chain, key, vals):
            init = with_values(vals, strategy) if vals else strategy
            key = jnp.where(use_given, key, chain_key(root, chain))
            return kernel.init(key, init, args, kwargs)

        return _over_chains(one, inner)(chains, given, values)

    return per_device


def _over_shards(fn: Callable, batched: tuple[bool, ...]) -> Callable:
    """vmap a per-device function over a leading block of data shards.

    ``batched`` says which arguments carry the shard axis (state, data); the
    others (scalars, chain ids) are shared by every shard.
    """
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))


def init_program(
    kernel: Kernel, strategy: Any, inner: str, mesh: Mesh, sharded: bool = False
) -> Any:
    """The jitted init program (see ``Sampler``): per-chain keys, inits, state.

    It takes ``(root, chains, given, use_given, values, args, kwargs)``:
    chain ``i`` uses ``given[i]`` if ``use_given`` else ``fold_in(root, i)``;
    with ``sharded``, ``shards`` follows ``root`` and shard ``k`` uses the root
    key ``fold_in(root, k)`` and its own data.
    """
    fn, rep, lane = _init_fn(kernel, strategy, inner), P(), P(CHAIN)
    if not sharded:
        in_specs = (rep, lane, lane, rep, lane, rep, rep)
        out_specs = lane
    else:
        per_shard = _over_shards(fn, (True, False, False, False, False, True, True))

        def fn(root, shards, chains, given, use_given, values, args, kwargs):
            roots = jax.vmap(chain_key, in_axes=(None, 0))(root, shards)
            return per_shard(roots, chains, given, use_given, values, args, kwargs)

        data = P(SHARD)
        in_specs = (rep, data, lane, lane, rep, lane, data, data)
        out_specs = P(SHARD, CHAIN)
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )


def chunk_program(
    model: Callable,
    kernel: Kernel,
    inner: str,
    size: int,
    mesh: Mesh,
    sharded: bool = False,
    lanes: int | None = None,
) -> Any:
    """The jitted chunk program for ``(state, real, n_draws, per_draw, collect,
    jump, args, kwargs)``; ``real`` marks the lanes that are not padding,
    ``jump`` >= 0 first moves the warmup to that transition (``Kernel.skip``),
    the state argument is donated. With ``sharded``, state, ``real`` and data carry a
    leading shard axis and state and ``real`` a chain axis after it."""
    fn, rep = _chunk_fn(model, kernel, inner, size, sharded, lanes), P()
    if not sharded:
        lanes = P(CHAIN)
        in_specs = (lanes, lanes, rep, rep, rep, rep, rep, rep)
    else:
        lanes, data = P(SHARD, CHAIN), P(SHARD)
        in_specs = (lanes, lanes, rep, rep, rep, rep, data, data)
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=lanes, check_vma=False
        ),
        donate_argnums=0,
    )
