"""The compiled SPMD programs: ``jit(shard_map(per_device))`` for init and chunks.

Why ``shard_map`` and not plain ``jit`` on sharded inputs: NUTS is a
``while_loop``. Under GSPMD the loop predicate of the vmapped tree builder
becomes a collective, so every device waits for the longest tree anywhere.
Under ``shard_map`` each device runs its own loop and stops on its own.

A chunk program runs ``n_draws`` draws of ``per_draw`` transitions each; both
are runtime scalars, as is ``collect`` (keep draws or not), so warmup chunks,
sampling chunks, thinning and a short last chunk all reuse one executable.
"""

from __future__ import annotations

import dataclasses
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

from chainmesh.kernels.nuts import NUTSKernel, extra_fields
from chainmesh.keys import chain_key, with_values
from chainmesh.mesh import CHAIN, SHARD
from chainmesh.model import ModelInfo, postprocess_fn

COUNTERS = ("leapfrog_steps", "lockstep_steps", "divergences")
"""Per-device counters a chunk returns, summed over every transition it ran.

``leapfrog_steps`` and ``divergences`` count real chains only (padding chains
and padding shards are masked out); ``lockstep_steps`` is what the device paid:
lanes x the longest trajectory of the block, per transition.
"""

LOW_BITS = 20
"""Counters are exact int64 totals kept as two int32 words: ``hi * 2**20 + lo``."""


def wide_total(words: Any) -> list[int]:
    """Host side: ``(..., len(COUNTERS), 2)`` words -> exact Python int totals."""
    import numpy as np

    words = np.asarray(words, dtype=np.int64).reshape(-1, len(COUNTERS), 2).sum(0)
    return [int(hi) * (1 << LOW_BITS) + int(lo) for lo, hi in words]


def _add_wide(acc: jax.Array, x: jax.Array) -> jax.Array:
    """Add int32 ``x`` (one per counter) to the two-word counters ``acc``.

    Int32 alone overflows on large runs (4096 chains x 1023 steps x 100
    draws); the low word carries into the high one after every transition.
    """
    lo = acc[:, 0] + x
    return jnp.stack([lo & ((1 << LOW_BITS) - 1), acc[:, 1] + (lo >> LOW_BITS)], -1)


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


@dataclasses.dataclass
class Programs:
    """Compiled executables and model facts for one cache key.

    The chunk program is compiled after the first init succeeded, so a model
    with an invalid init fails before paying for the NUTS compilation.
    """

    info: ModelInfo
    kernel: NUTSKernel
    inits: dict[Any, Callable[..., tuple[HMCState, jax.Array]]] = dataclasses.field(
        default_factory=dict
    )
    chunk: Callable[..., ChunkOut] | None = None


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
    """
    lanes = real.size

    def buffer(s):
        return jnp.zeros((size, *s.shape), s.dtype)

    draws = jax.tree.map(buffer, jax.eval_shape(post, state.z))
    extra = jax.tree.map(buffer, extra_fields(state))

    def transition(_, carry):
        s, counts = carry
        s = step(s)
        steps = s.num_steps.astype(jnp.int32)
        used = jnp.where(real, steps, 0).sum()
        diverged = jnp.logical_and(real, s.diverging).sum()
        per_step = jnp.stack([used, steps.max() * lanes, diverged])
        counts = _add_wide(counts, per_step.astype(jnp.int32))
        return s, counts

    def one_draw(j, carry):
        s, d, e, counts = carry
        s, counts = lax.fori_loop(0, per_draw, transition, (s, counts))
        e = _write(e, j, extra_fields(s))
        d = lax.cond(collect, lambda d: _write(d, j, post(s.z)), lambda d: d, d)
        return s, d, e, counts

    carry = (state, draws, extra, jnp.zeros((len(COUNTERS), 2), jnp.int32))
    state, draws, extra, counts = lax.fori_loop(0, n_draws, one_draw, carry)
    lead = real.ndim
    return state, _draw_axis_last(draws, lead), _draw_axis_last(extra, lead), counts


def _chunk_fn(
    model: Callable, kernel: NUTSKernel, inner: str, size: int, sharded: bool
) -> Callable:
    """The per-device chunk: the device's lanes under ``inner``.

    ``vmap``: every lane of the device (chains, or shards x chains) in one
    vectorized transition. ``map``: one chain after another (``lax.map``); on
    a shard mesh each chain's transition is still vectorized over shards.
    """

    def chain_fns(args, kwargs):
        step = partial(kernel.step, args=args, kwargs=kwargs)
        return step, postprocess_fn(model, args, kwargs)

    def over_shards(pick: int, inner_map: Callable, args, kwargs):
        """A block function vmapped over shards, with each shard's data."""

        def block(x):
            def one_shard(xs, a, k):
                return inner_map(chain_fns(a, k)[pick])(xs)

            return jax.vmap(one_shard)(x, args, kwargs)

        return block

    def per_device(state, real, n_draws, per_draw, collect, args, kwargs):
        run = partial(_block_chunk, size=size, n_draws=n_draws, per_draw=per_draw)
        if inner == "vmap":
            if sharded:
                step = over_shards(0, jax.vmap, args, kwargs)
                post = over_shards(1, jax.vmap, args, kwargs)
            else:
                step, post = map(jax.vmap, chain_fns(args, kwargs))
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

            lanes = jax.tree.map(partial(rearrange, pattern=to_chains), (state, real))
            s, d, e, c = lax.map(one_chain, lanes)
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
    """Run a per-chain function over a block: vmap (lockstep) or lax.map."""
    if inner == "vmap":
        return jax.vmap(fn)
    return lambda *xs: lax.map(lambda x: fn(*x), xs)


def _init_fn(kernel: NUTSKernel, strategy: Any, inner: str) -> Callable:
    def per_device(root, chains, values, args, kwargs):
        def one(chain, vals):
            init = with_values(vals, strategy) if vals else strategy
            return kernel.init(chain_key(root, chain), init, args, kwargs)

        return _over_chains(one, inner)(chains, values)

    return per_device


def _over_shards(fn: Callable, batched: tuple[bool, ...]) -> Callable:
    """vmap a per-device function over a leading block of data shards.

    ``batched`` says which arguments carry the shard axis (state, data); the
    others (scalars, chain ids) are shared by every shard.
    """
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))


def compile_init(
    kernel: NUTSKernel,
    strategy: Any,
    inner: str,
    mesh: Mesh,
    init_args: tuple,
    sharded: bool = False,
) -> Callable[..., tuple[HMCState, jax.Array]]:
    """Compile the init program.

    Args:
        init_args: ``(root, chains, values, args, kwargs)``, or with
            ``sharded`` ``(root, shards, chains, values, args, kwargs)`` where
            shard ``k`` uses the root key ``fold_in(root, k)`` and its own data.
    """
    fn, rep = _init_fn(kernel, strategy, inner), P()
    if not sharded:
        in_specs, out_specs = (rep, P(CHAIN), P(CHAIN), rep, rep), P(CHAIN)
    else:
        per_shard = _over_shards(fn, (True, False, False, True, True))

        def fn(root, shards, chains, values, args, kwargs):
            roots = jax.vmap(chain_key, in_axes=(None, 0))(root, shards)
            return per_shard(roots, chains, values, args, kwargs)

        data = P(SHARD)
        in_specs = (rep, data, P(CHAIN), P(CHAIN), data, data)
        out_specs = P(SHARD, CHAIN)
    program = jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )
    return program.lower(*init_args).compile()


def compile_chunk(
    model: Callable,
    kernel: NUTSKernel,
    inner: str,
    size: int,
    mesh: Mesh,
    chunk_args: tuple,
    sharded: bool = False,
) -> Callable[..., ChunkOut]:
    """Compile the chunk program for ``(state, real, n_draws, per_draw, collect,
    args, kwargs)``; ``real`` marks the lanes that are not padding, the state
    argument is donated. With ``sharded``, state, ``real`` and data carry a
    leading shard axis and state and ``real`` a chain axis after it."""
    fn, rep = _chunk_fn(model, kernel, inner, size, sharded), P()
    if not sharded:
        lanes = P(CHAIN)
        in_specs = (lanes, lanes, rep, rep, rep, rep, rep)
    else:
        lanes, data = P(SHARD, CHAIN), P(SHARD)
        in_specs = (lanes, lanes, rep, rep, rep, data, data)
    program = jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=lanes, check_vma=False
        ),
        donate_argnums=0,
    )
    return program.lower(*chunk_args).compile()
