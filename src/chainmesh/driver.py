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

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from chainmesh.config import SamplerConfig
from chainmesh.placement import replicate, to_host
from chainmesh.program import COUNTERS, ChunkOut, wide_total


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


PHASES = ("warmup", "sample")


@dataclasses.dataclass
class RunOutput:
    """Draws and bookkeeping of one run, real chains only.

    Counters and seconds cover the whole run, the part before a resume
    included, so rates stay honest after a resume.
    """

    state: Any
    draws: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    counters: dict[str, dict[str, int]]
    warmup_s: float
    sampling_s: float


@dataclasses.dataclass
class Progress:
    """Where a run stands: next chunk, draws kept, counters, seconds per phase."""

    next_chunk: int = 0
    filled: int = 0
    counters: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {p: dict.fromkeys(COUNTERS, 0) for p in PHASES}
    )
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(PHASES, 0.0)
    )


def allocate(store: Any, chunk_program: Any, keep: tuple[int, ...], kept: int) -> None:
    """Room in ``store`` for every site and extra field of the run."""
    lead = len(keep) + 1
    out = chunk_program.out_info
    for group in ("draws", "extra"):
        for name, x in getattr(out, group).items():
            shape = (*keep, kept, *x.shape[lead:])
            store.allocate(group, name, shape, np.dtype(x.dtype))


def drive(
    chunk_program: Callable[..., ChunkOut],
    state: Any,
    real: Any,
    args: tuple,
    kwargs: dict,
    config: SamplerConfig,
    mesh: Mesh,
    keep: tuple[int, ...],
    store: Any,
    progress: Progress | None = None,
    checkpoint: Callable[[Progress, Any], None] | None = None,
    every: int = 1,
) -> RunOutput:
    """Run the chunks of ``schedule(config)`` from ``progress`` on.

    Args:
        real: Bool lanes (chains, or shards x chains), placed like the state:
            False marks padding, which the counters leave out.
        keep: Leading axes kept before the draw axis: ``(num_chains,)``, or
            ``(num_shards, num_chains)`` on a shard mesh; padding is dropped.
        store: Where kept draws go (``MemoryStore`` or ``FileStore``),
            already allocated.
        progress: Where to start (a resumed run); None starts at chunk 0.
        checkpoint: Called as ``checkpoint(progress, host_state)`` after every
            ``every`` chunks and after the last one.
    """
    progress = progress or Progress()
    chunks = list(schedule(config))
    kept_lanes = tuple(slice(0, k) for k in keep)
    counters = progress.counters
    done = sum(c.n_draws * c.per_draw for c in chunks[: progress.next_chunk])
    bar = tqdm(
        total=config.num_warmup + config.num_samples,
        initial=done,
        disable=not config.progress_bar,
        desc="warmup",
        unit="it",
        dynamic_ncols=True,
    )
    seconds = progress.seconds
    mark = [time.perf_counter()]

    def consume(index: int, chunk: Chunk, out: ChunkOut) -> None:
        counts = wide_total(to_host(out.counters))
        for name, value in zip(COUNTERS, counts, strict=True):
            counters[chunk.phase][name] += value
        now = time.perf_counter()
        seconds[chunk.phase] += now - mark[0]
        mark[0] = now
        if chunk.collect:
            window = (*kept_lanes, slice(0, chunk.n_draws))
            for group in ("draws", "extra"):
                for name, x in getattr(out, group).items():
                    values = to_host(x)[window]
                    store.write(group, name, len(keep), chunk.offset, values)
            progress.filled = chunk.offset + chunk.n_draws
        progress.next_chunk = index + 1
        bar.set_description(chunk.phase)
        bar.set_postfix(divergences=counters["sample"]["divergences"], refresh=False)
        bar.update(chunk.n_draws * chunk.per_draw)

    scalar = lambda v, dtype: replicate(np.asarray(v, dtype=dtype), mesh)  # noqa: E731
    pending = None
    try:
        for index in range(progress.next_chunk, len(chunks)):
            chunk = chunks[index]
            out = chunk_program(
                state,
                real,
                scalar(chunk.n_draws, np.int32),
                scalar(chunk.per_draw, np.int32),
                scalar(chunk.collect, np.bool_),
                args,
                kwargs,
            )
            state = out.state
            if chunk.collect:
                for x in (*out.draws.values(), *out.extra.values()):
                    if x.is_fully_addressable:
                        x.copy_to_host_async()
            if pending is not None:
                consume(*pending)
            pending = (index, chunk, out)
            last = index == len(chunks) - 1
            if checkpoint is not None and ((index + 1) % every == 0 or last):
                # Sync here: the state must be read before the next chunk
                # donates its buffers.
                consume(*pending)
                pending = None
                checkpoint(progress, state)
                mark[0] = time.perf_counter()  # writing it is not sampling time
        if pending is not None:
            consume(*pending)
    finally:
        bar.close()
    return RunOutput(
        state=state,
        draws=store.read("draws"),
        extra=store.read("extra"),
        counters=counters,
        warmup_s=seconds["warmup"],
        sampling_s=seconds["sample"],
    )
