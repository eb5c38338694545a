"""The host loop: chunks in order, draws to host, one progress bar.

The only module with a Python loop over time, a progress bar and host copies.
Chunk ``k + 1`` is dispatched before chunk ``k``'s draws are read, so the copy
to host overlaps device work; the sampler state never leaves the devices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from chainmesh.config import SamplerConfig
from chainmesh.layout import replicate
from chainmesh.program import COUNTERS, ChunkOut


class Chunk(NamedTuple):
    """One compiled call: ``n_draws`` draws of ``per_draw`` transitions."""

    phase: str
    n_draws: int
    per_draw: int
    collect: bool
    offset: int


def schedule(config: SamplerConfig) -> Iterator[Chunk]:
    """The chunks of a run: warmup, then sampling (NumPyro's thinning).

    Sampling runs ``num_samples`` transitions and keeps ``num_samples //
    thinning`` draws, the last transition of each group of ``thinning``; the
    ``num_samples % thinning`` transitions left over run first, uncollected.
    """
    size = config.chunk
    for offset in range(0, config.num_warmup, size):
        yield Chunk("warmup", min(size, config.num_warmup - offset), 1, False, offset)
    skip = config.num_samples % config.thinning
    if skip:
        yield Chunk("sample", skip, 1, False, 0)
    kept = config.num_samples // config.thinning
    for offset in range(0, kept, size):
        yield Chunk("sample", min(size, kept - offset), config.thinning, True, offset)


@dataclasses.dataclass
class RunOutput:
    """Draws and bookkeeping of one run, real chains only."""

    state: Any
    draws: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    counters: dict[str, dict[str, int]]
    warmup_s: float
    sampling_s: float


def _empty(outputs: dict[str, jax.Array], keep: tuple[int, ...], draws: int) -> dict:
    lead = len(keep) + 1
    return {
        name: np.empty((*keep, draws, *x.shape[lead:]), dtype=x.dtype)
        for name, x in outputs.items()
    }


def drive(
    chunk_program: Callable[..., ChunkOut],
    state: Any,
    args: tuple,
    kwargs: dict,
    config: SamplerConfig,
    mesh: Mesh,
    keep: tuple[int, ...] | None = None,
) -> RunOutput:
    """Run every chunk of ``schedule(config)`` and gather the kept draws.

    Args:
        keep: Leading axes to keep before the draw axis: ``(num_chains,)`` by
            default, ``(num_shards, num_chains)`` on a shard mesh; padding
            beyond them is dropped here.
    """
    keep = (config.num_chains,) if keep is None else keep
    kept = config.num_samples // config.thinning
    real = tuple(slice(0, k) for k in keep)
    counters = {p: dict.fromkeys(COUNTERS, 0) for p in ("warmup", "sample")}
    host: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(
        total=config.num_warmup + config.num_samples,
        disable=not config.progress_bar,
        desc="warmup",
        unit="it",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    marks = {"warmup": t0}

    def consume(chunk: Chunk, out: ChunkOut) -> None:
        counts = np.asarray(out.counters).reshape(-1, len(COUNTERS)).sum(axis=0)
        for name, value in zip(COUNTERS, counts, strict=True):
            counters[chunk.phase][name] += int(value)
        marks[chunk.phase] = time.perf_counter()
        if chunk.collect:
            if not host:
                host["draws"] = _empty(out.draws, keep, kept)
                host["extra"] = _empty(out.extra, keep, kept)
            window = (*real, slice(chunk.offset, chunk.offset + chunk.n_draws))
            for group in ("draws", "extra"):
                for name, x in getattr(out, group).items():
                    chunk_draws = (*real, slice(0, chunk.n_draws))
                    host[group][name][window] = np.asarray(x)[chunk_draws]
        bar.set_description(chunk.phase)
        bar.set_postfix(divergences=counters["sample"]["divergences"], refresh=False)
        bar.update(chunk.n_draws * chunk.per_draw)

    scalar = lambda v, dtype: replicate(np.asarray(v, dtype=dtype), mesh)  # noqa: E731
    pending = None
    try:
        for chunk in schedule(config):
            out = chunk_program(
                state,
                scalar(chunk.n_draws, np.int32),
                scalar(chunk.per_draw, np.int32),
                scalar(chunk.collect, np.bool_),
                args,
                kwargs,
            )
            state = out.state
            if chunk.collect:
                for x in (*out.draws.values(), *out.extra.values()):
                    x.copy_to_host_async()
            if pending is not None:
                consume(*pending)
            pending = (chunk, out)
        consume(*pending)
    finally:
        bar.close()
    warmup_end = marks["warmup"] if config.num_warmup else t0
    return RunOutput(
        state=state,
        draws=host["draws"],
        extra=host["extra"],
        counters=counters,
        warmup_s=warmup_end - t0,
        sampling_s=marks["sample"] - warmup_end,
    )
