"""Per-device counters of a chunk, kept exact as two int32 words each."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COUNTERS = ("leapfrog_steps", "lockstep_steps", "divergences", "bound_steps")
"""Per-device counters a chunk returns, summed over every transition it ran.

``leapfrog_steps`` and ``divergences`` count real chains only (padding chains
and padding shards are masked out); ``lockstep_steps`` is what the device paid:
lanes x the longest trajectory of the block, per transition (``vmap``), or
lanes x the iterations of the asynchronous loop (``async``; with data sets
vmapped on a device, each set's lanes run until the slowest set's loop ends,
so the device pays sets x lanes x that loop's iterations). ``bound_steps``
is what the best schedule of this chunk's work over the device's lanes would
pay, per chunk: lanes x the largest total of one chain (with more chains than
lanes, at least their sum spread evenly): no schedule that keeps each chain's
transitions in order can finish sooner.
"""

LOW_BITS = 20
"""Counters are exact int64 totals kept as two int32 words: ``hi * 2**20 + lo``."""


def wide_total(words: Any) -> list[int]:
    """Host side: ``(..., len(COUNTERS), 2)`` words -> exact Python int totals."""
    words = np.asarray(words, dtype=np.int64).reshape(-1, len(COUNTERS), 2).sum(0)
    return [int(hi) * (1 << LOW_BITS) + int(lo) for lo, hi in words]


def _add_wide(acc: jax.Array, x: jax.Array) -> jax.Array:
    """Add int32 ``x`` (one per counter) to the two-word counters ``acc``.

    Int32 alone overflows on large runs (4096 chains x 1023 steps x 100
    draws); the low word carries into the high one after every transition.
    """
    lo = acc[:, 0] + x
    return jnp.stack([lo & ((1 << LOW_BITS) - 1), acc[:, 1] + (lo >> LOW_BITS)], -1)


def bound_words(steps: jax.Array, width: int) -> jax.Array:
    """``width x max(ceil(sum(steps) / width), max(steps))`` as two words.

    Exact in int32 for any ``width < 2**20`` (see ``_times``).
    """
    mask = (1 << LOW_BITS) - 1
    q, r = steps // width, steps % width
    v = jnp.maximum(q.sum() + (r.sum() + width - 1) // width, steps.max())
    return _times(jnp.stack([v & mask, v >> LOW_BITS]), width)


def slowest_times(words: jax.Array, n: int) -> jax.Array:
    """``n x`` the largest of a stack of two-word counters (axis 0)."""
    lo, hi = words[..., 0], words[..., 1]
    top = hi.max(0)
    return _times(jnp.stack([jnp.where(hi == top, lo, -1).max(0), top], -1), n)


def _times(words: jax.Array, n: int) -> jax.Array:
    """Two-word counter(s) ``(..., 2)`` times ``n``, exact for ``n < 2**20``.

    The product is built from 10-bit pieces of the low word, so no partial
    product overflows int32.
    """
    mask = (1 << LOW_BITS) - 1
    lo_v, hi_v = words[..., 0], words[..., 1]
    a, b = lo_v >> 10, lo_v & 1023
    lo = b * n + ((a * n) & 1023) * 1024
    hi = hi_v * n + ((a * n) >> 10)
    return jnp.stack([lo & mask, hi + (lo >> LOW_BITS)], -1).astype(jnp.int32)
