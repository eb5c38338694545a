"""Building programs: lower, compile side by side, keep them per cache key.

A cold run lowers its init and chunk programs, then compiles them in threads
(XLA releases the GIL); ``Programs`` holds the executables of one cache key.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpyro.infer.hmc import HMCState

from chainmesh import persistent
from chainmesh.kernels.base import Kernel
from chainmesh.mesh import CHAIN, SHARD
from chainmesh.model import ModelInfo

STAGES = ("trace_s", "lower_s", "xla_s")
"""Where building programs spends its time: tracing the Python functions to a
jaxpr, lowering it to StableHLO, and XLA's compilation (or a load from the disk
cache; wall time, with the programs of one run compiled concurrently)."""


def _add(stages: dict[str, float] | None, name: str, seconds: float) -> None:
    if stages is not None:
        stages[name] = stages.get(name, 0.0) + seconds


def lower(program: Any, args: tuple, stages: dict[str, float] | None = None) -> Any:
    """``program.trace(*args).lower()``, adding each stage's seconds."""
    t0 = time.perf_counter()
    traced = program.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    _add(stages, "trace_s", t1 - t0)
    _add(stages, "lower_s", time.perf_counter() - t1)
    return lowered


def compile_all(lowered: list[Any], stages: dict[str, float] | None = None) -> list:
    """XLA-compile several lowered programs at once (XLA releases the GIL).

    A cold run builds an init and a chunk program; compiled side by side they
    cost the longer of the two instead of the sum (on two or more cores).
    """
    if not lowered:
        return []
    t0 = time.perf_counter()
    if len(lowered) == 1:
        out = [lowered[0].compile()]
    else:

        def compile_one(x: Any) -> Any:
            with persistent.inherit():
                return x.compile()

        with ThreadPoolExecutor(len(lowered)) as pool:
            out = list(pool.map(compile_one, lowered))
    _add(stages, "xla_s", time.perf_counter() - t0)
    return out


def abstract_state(lowered_init: Any, mesh: Mesh, sharded: bool) -> Any:
    """The state the init program returns, as placed abstract values."""
    lanes = NamedSharding(mesh, P(SHARD, CHAIN) if sharded else P(CHAIN))
    state = lowered_init.out_info[0]
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=lanes), state
    )


@dataclasses.dataclass
class Programs:
    """Compiled executables and model facts for one cache key.

    A cold run lowers both programs, then compiles them side by side.
    """

    info: ModelInfo
    kernel: Kernel
    inits: dict[Any, Callable[..., tuple[HMCState, jax.Array]]] = dataclasses.field(
        default_factory=dict
    )
    chunk: Callable[..., Any] | None = None
    state: Any = None  # the placed abstract state, once an init was lowered


def build(
    programs: Programs,
    init: tuple[Any, tuple, Any],
    chunk: tuple[Any, tuple] | None,
    mesh: Mesh,
    sharded: bool,
    stages: dict[str, float] | None = None,
) -> int:
    """Lower what ``programs`` lacks, compile it side by side; programs built.

    Args:
        init: ``(jitted init program, its arguments, key in programs.inits)``.
        chunk: ``(jitted chunk program, its arguments after the state)``, or
            None when ``programs.chunk`` exists.
    """
    todo: list[tuple[str, Any]] = []
    program, init_args, key = init
    if key not in programs.inits:
        lowered = lower(program, init_args, stages)
        programs.state = abstract_state(lowered, mesh, sharded)
        todo.append((key, lowered))
    if chunk is not None and programs.chunk is None:
        program, rest = chunk
        todo.append(("chunk", lower(program, (programs.state, *rest), stages)))
    for (name, _), compiled in zip(
        todo, compile_all([x for _, x in todo], stages), strict=True
    ):
        if name == "chunk":
            programs.chunk = compiled
        else:
            programs.inits[name] = compiled
    return len(todo)
