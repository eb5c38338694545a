"""What every transition kernel provides to the compiled programs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

EXTRA_FIELDS = (
    "potential_energy",
    "energy",
    "diverging",
    "accept_prob",
    "num_steps",
    "step_size",
)
"""Per-draw fields recorded next to the draws (``tree_depth`` is derived)."""


class Kernel(NamedTuple):
    """A transition kernel as pure functions over chains.

    The state is a pytree with a leading chain axis in a block; it has the
    fields ``z`` (unconstrained position, site name -> value), ``num_steps``
    and ``diverging``, which the programs read.

    Attributes:
        init: ``(key, strategy, args, kwargs) -> (state, is_valid)``, one chain.
        step: ``(state, args, kwargs) -> state``, one transition of one chain;
            None when the kernel only acts on a whole block.
        block: None (a block is ``step`` vmapped), or a kernel that acts on a
            device's whole block of chains (pooled adaptation, collectives
            over the mesh): ``(args, kwargs, real) -> (block state -> block
            state)``, called inside ``shard_map``; ``real`` is False on
            padding lanes.
        fields: ``state -> {name: value}``, the ``EXTRA_FIELDS`` of a state.
        chunk: None, or a kernel that runs a whole chunk on a device's block
            itself (lane-asynchronous NUTS, ``async_nuts.AsyncNUTS.chunk``).
        skip: ``(block state, to) -> block state``: move the warmup to
            transition ``to`` of its schedule (the first of the final
            step-size buffer, ``num_warmup="auto"``); ``to`` is a traced
            int32 and a negative one leaves the state as it is.
    """

    init: Callable[..., tuple[Any, jax.Array]]
    step: Callable[..., Any] | None
    block: Callable[..., Callable] | None = None
    fields: Callable[[Any], dict[str, jax.Array]] | None = None
    chunk: Callable[..., tuple] | None = None
    skip: Callable[[Any, jax.Array], Any] | None = None


def named_fields(state: Any, step_size: jax.Array) -> dict[str, jax.Array]:
    """The ``EXTRA_FIELDS`` of a state that holds all but the step size as
    attributes of those names."""
    fields = {name: getattr(state, name) for name in EXTRA_FIELDS[:-1]}
    return fields | {"step_size": step_size}


def skip_counter(state: Any, to: jax.Array) -> Any:
    """``Kernel.skip`` of a kernel whose schedule reads only ``state.i``."""
    return state._replace(i=jnp.where(to >= 0, to, state.i).astype(state.i.dtype))
