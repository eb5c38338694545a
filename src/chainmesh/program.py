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
from collections import OrderedDict
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

from chainmesh.init import chain_key, with_values
from chainmesh.kernel import NUTSKernel, extra_fields
from chainmesh.mesh import CHAIN, SHARD
from chainmesh.model import ModelInfo, postprocess_fn

COUNTERS = ("leapfrog_steps", "lockstep_steps", "divergences")
"""Per-device counters a chunk returns, summed over its transitions."""


class ChunkOut(NamedTuple):
    """What one chunk call returns (global arrays, chain axis sharded).

    Attributes:
        state: NUTS state after the chunk, ``(chains, ...)``.
        draws: Site name -> ``(chains, chunk, *site_shape)``, constrained.
        extra: Field name -> ``(chains, chunk)``.
        counters: ``(devices, 3)``, see ``COUNTERS``.
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


def _over_chains(fn: Callable, inner: str) -> Callable:
    """Run a per-chain function over a block: vmap (lockstep) or lax.map."""
    if inner == "vmap":
        return jax.vmap(fn)
    return lambda *xs: lax.map(lambda x: fn(*x), xs)


def _write(buffers: Any, j: jax.Array, values: Any) -> Any:
    return jax.tree.map(lambda b, v: b.at[j].set(v), buffers, values)


def _block_chunk(
    step: Callable,
    post: Callable,
    size: int,
    state: HMCState,
    n_draws: jax.Array,
    per_draw: jax.Array,
    collect: jax.Array,
) -> tuple[HMCState, dict, dict, jax.Array]:
    """Run ``n_draws x per_draw`` transitions of ``step`` on a block of chains.

    ``step`` and ``post`` act on the whole block (leading chain axis), so the
    per-transition maximum of leapfrog steps over the block is visible here:
    that is what vmapped NUTS pays for.
    """
    local = state.i.shape[0]

    def buffer(s):
        return jnp.zeros((size, *s.shape), s.dtype)

    draws = jax.tree.map(buffer, jax.eval_shape(post, state.z))
    extra = jax.tree.map(buffer, extra_fields(state))

    def transition(_, carry):
        s, counts = carry
        s = step(s)
        steps = s.num_steps.astype(jnp.int32)
        used = jnp.stack([steps.sum(), steps.max() * local, s.diverging.sum()])
        return s, counts + used.astype(jnp.int32)

    def one_draw(j, carry):
        s, d, e, counts = carry
        s, counts = lax.fori_loop(0, per_draw, transition, (s, counts))
        e = _write(e, j, extra_fields(s))
        d = lax.cond(collect, lambda d: _write(d, j, post(s.z)), lambda d: d, d)
        return s, d, e, counts

    carry = (state, draws, extra, jnp.zeros(len(COUNTERS), jnp.int32))
    state, draws, extra, counts = lax.fori_loop(0, n_draws, one_draw, carry)
    to_chain_major = partial(rearrange, pattern="k c ... -> c k ...")
    return (
        state,
        jax.tree.map(to_chain_major, draws),
        jax.tree.map(to_chain_major, extra),
        counts,
    )


def _single_as_block(fn: Callable) -> Callable:
    """Apply a per-chain function to a block holding exactly one chain."""

    def block_fn(tree):
        out = fn(jax.tree.map(lambda x: x[0], tree))
        return jax.tree.map(lambda x: x[None], out)

    return block_fn


def _chunk_fn(model: Callable, kernel: NUTSKernel, inner: str, size: int) -> Callable:
    def per_device(state, n_draws, per_draw, collect, args, kwargs):
        step = partial(kernel.step, args=args, kwargs=kwargs)
        post = postprocess_fn(model, args, kwargs)
        run = partial(_block_chunk, size=size, n_draws=n_draws, per_draw=per_draw)
        if inner == "vmap":
            s, d, e, c = run(
                jax.vmap(step), jax.vmap(post), state=state, collect=collect
            )
        else:
            # lax.map: one chain after another; no chain waits for another's tree.
            def one_chain(chain_state):
                block = jax.tree.map(lambda x: x[None], chain_state)
                out = run(
                    _single_as_block(step),
                    _single_as_block(post),
                    state=block,
                    collect=collect,
                )
                return out

            s, d, e, c = lax.map(one_chain, state)
            s = jax.tree.map(lambda x: x[:, 0], s)
            merge = partial(rearrange, pattern="c one ... -> (c one) ...")
            d, e, c = jax.tree.map(merge, d), jax.tree.map(merge, e), c.sum(0)
        return ChunkOut(s, d, e, c[None])

    return per_device


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
    """Compile the chunk program for ``(state, n_draws, per_draw, collect, args,
    kwargs)``; the state argument is donated. With ``sharded``, state and data
    carry a leading shard axis and every array a chain axis after it."""
    fn, rep = _chunk_fn(model, kernel, inner, size), P()
    if not sharded:
        in_specs, out_specs = (P(CHAIN), rep, rep, rep, rep, rep), P(CHAIN)
    else:
        fn = _over_shards(fn, (True, False, False, False, True, True))
        data = P(SHARD)
        in_specs = (P(SHARD, CHAIN), rep, rep, rep, data, data)
        out_specs = P(SHARD, CHAIN)
    program = jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        ),
        donate_argnums=0,
    )
    return program.lower(*chunk_args).compile()


class ProgramCache:
    """A small LRU of compiled programs, keyed by everything they depend on."""

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, Programs] = OrderedDict()

    def get(self, key: Any) -> Programs | None:
        """The programs for ``key``, marked as recently used, or None."""
        programs = self._entries.get(key)
        if programs is not None:
            self._entries.move_to_end(key)
        return programs

    def put(self, key: Any, programs: Programs) -> None:
        """Store ``programs``; drop the least recently used beyond ``maxsize``."""
        self._entries[key] = programs
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self, model: Callable | None = None) -> None:
        """Drop every entry, or only those of ``model``."""
        if model is None:
            self._entries.clear()
            return
        for key in [k for k in self._entries if k[0] == model]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


CACHE = ProgramCache()
"""Process-wide cache shared by all samplers (so ``cm.sample`` is warm too)."""
