"""The host loop: chunks in order, draws to host, decisions, one progress bar.

The only module with a Python loop over time, a progress bar and host copies.
Chunk ``k + 1`` is dispatched before chunk ``k``'s draws are read, so the copy
to host overlaps device work; the sampler state never leaves the devices. A
chunk followed by a decision (``chainmesh.stopping``: the end of a slow
window under ``num_warmup="auto"``, every sampling chunk of a run with
targets) is read before the next is dispatched, since the next depends on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from chainmesh import stopping
from chainmesh.config import SamplerConfig
from chainmesh.placement import replicate, to_host
from chainmesh.program import COUNTERS, ChunkOut, wide_total


class Chunk(NamedTuple):
    """One compiled call: ``n_draws`` draws of ``per_draw`` transitions.

    Attributes:
        offset: Warmup: the first transition of the schedule it runs;
            sampling: the first kept draw it writes.
        jump: >= 0: the call first moves the warmup to this transition.
        decide: A decision follows it (the host waits for its draws).
    """

    phase: str
    n_draws: int
    per_draw: int
    collect: bool
    offset: int
    jump: int = -1
    decide: bool = False


PHASES = ("warmup", "sample")


@dataclasses.dataclass
class Progress:
    """Where a run stands (what a checkpoint saves; JSON values only).

    Attributes:
        next_chunk: Chunks run.
        warmup: The next warmup transition of the schedule (a jump moves it).
        warmup_run: Warmup transitions run.
        sampled: Sampling transitions run.
        filled: Draws kept.
        jump: The jump the next chunk makes (-1: none).
        previous: Per data set, the pooled variances of the last slow
            window's draws (``num_warmup="auto"``).
        windows: The warmup decisions taken, one record per slow window.
        checks: The sampling checks taken, one record per chunk.
        stop: Why sampling ended (None: it has not).
    """

    next_chunk: int = 0
    warmup: int = 0
    warmup_run: int = 0
    sampled: int = 0
    filled: int = 0
    jump: int = -1
    previous: list | None = None
    windows: list = dataclasses.field(default_factory=list)
    checks: list = dataclasses.field(default_factory=list)
    stop: dict | None = None
    counters: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {p: dict.fromkeys(COUNTERS, 0) for p in PHASES}
    )
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(PHASES, 0.0)
    )


def next_chunk(
    config: SamplerConfig, plan: stopping.WarmupPlan, p: Progress
) -> Chunk | None:
    """The chunk after ``p``: warmup, then sampling (NumPyro's thinning).

    A fixed run samples ``num_samples`` transitions and keeps ``num_samples
    // thinning`` draws, the last transition of each group of ``thinning``;
    the ``num_samples % thinning`` left over run first, uncollected. A run
    with targets samples chunk after chunk until ``p.stop`` is set.
    """
    size, total = config.chunk, config.num_warmup
    if p.warmup < total:
        end = min(p.warmup + size, total)
        if not config.auto_warmup:
            return Chunk("warmup", end - p.warmup, 1, False, p.warmup, p.jump)
        window = min(e for e in plan.ends if e > p.warmup)
        end = min(end, window)
        middle = window in plan.middle
        decide = middle and end == window
        return Chunk("warmup", end - p.warmup, 1, middle, p.warmup, p.jump, decide)
    kept = config.num_samples // config.thinning
    if config.stopping:
        if p.stop is not None:
            return None
        n = min(size, kept - p.filled)
        return Chunk("sample", n, config.thinning, True, p.filled, -1, True)
    skip = config.num_samples % config.thinning
    if p.sampled < skip:
        return Chunk("sample", skip, 1, False, 0)
    if p.filled < kept:
        return Chunk(
            "sample", min(size, kept - p.filled), config.thinning, True, p.filled
        )
    return None


def advance(p: Progress, chunk: Chunk) -> None:
    """Move ``p`` past ``chunk`` (when it is dispatched)."""
    p.next_chunk += 1
    if chunk.phase == "warmup":
        p.warmup += chunk.n_draws
        p.warmup_run += chunk.n_draws
        p.jump = -1
        return
    p.sampled += chunk.n_draws * chunk.per_draw
    if chunk.collect:
        p.filled += chunk.n_draws


def schedule(config: SamplerConfig) -> Iterator[Chunk]:
    """The chunks of a fixed run (no decisions), in order."""
    plan, p = stopping.warmup_plan(config), Progress()
    while (chunk := next_chunk(config, plan, p)) is not None:
        if chunk.decide:
            raise ValueError("schedule() lists fixed runs; this one takes decisions")
        yield chunk
        advance(p, chunk)


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
    stop: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    latent: tuple[str, ...] = (),
) -> RunOutput:
    """Run chunks from ``progress`` on until ``next_chunk`` says the run ends.

    Args:
        real: Bool lanes (chains, or shards x chains), placed like the state:
            False marks padding, which the counters leave out.
        keep: Leading axes kept before the draw axis: ``(num_chains,)``, or
            ``(num_shards, num_chains)`` on a shard mesh; padding is dropped.
        store: Where kept draws go (``MemoryStore`` or ``FileStore``),
            already allocated for ``num_samples // thinning`` draws.
        progress: Where to start (a resumed run); None starts at chunk 0.
        checkpoint: Called as ``checkpoint(progress, host_state)`` after every
            ``every`` chunks and after the last one (with ``num_warmup="auto"``
            only where no slow window is half seen: the next one).
        latent: The model's latent sites (what ``num_warmup="auto"`` checks).
    """
    p = progress or Progress()
    plan = stopping.warmup_plan(config)
    kept_lanes = tuple(slice(0, k) for k in keep)
    lead = len(keep)
    bar = tqdm(
        total=p.warmup_run + max(config.num_warmup - p.warmup, 0) + config.num_samples,
        initial=p.warmup_run + p.sampled,
        disable=not config.progress_bar,
        desc="warmup",
        unit="it",
        dynamic_ncols=True,
    )
    mark = [time.perf_counter()]
    window: list[np.ndarray] = []  # the current slow window's draws

    def consume(chunk: Chunk, out: ChunkOut) -> None:
        counts = wide_total(to_host(out.counters))
        for name, value in zip(COUNTERS, counts, strict=True):
            p.counters[chunk.phase][name] += value
        now = time.perf_counter()
        p.seconds[chunk.phase] += now - mark[0]
        mark[0] = now
        if chunk.collect and chunk.phase == "sample":
            rows = (*kept_lanes, slice(0, chunk.n_draws))
            for group in ("draws", "extra"):
                for name, x in getattr(out, group).items():
                    store.write(group, name, lead, chunk.offset, to_host(x)[rows])
        elif chunk.collect:
            seen = {k: to_host(out.draws[k])[kept_lanes] for k in latent}
            window.append(stopping.coordinates(seen, lead, chunk.n_draws)[0])
        bar.set_description(chunk.phase)
        bar.update(chunk.n_draws * chunk.per_draw)
        if chunk.decide and chunk.phase == "warmup":
            stopping.end_window(
                config, plan, p, window, chunk.offset + chunk.n_draws, bar
            )
        elif chunk.decide:
            stopping.check_targets(config, p, store, lead, bar)
        if not config.stopping:
            divergences = p.counters["sample"]["divergences"]
            bar.set_postfix(divergences=divergences, refresh=False)

    scalar = lambda v, dtype: replicate(np.asarray(v, dtype=dtype), mesh)  # noqa: E731
    pending, due = None, False
    try:
        while (chunk := next_chunk(config, plan, p)) is not None:
            out = chunk_program(
                state,
                real,
                scalar(chunk.n_draws, np.int32),
                scalar(chunk.per_draw, np.int32),
                scalar(chunk.collect, np.bool_),
                scalar(chunk.jump, np.int32),
                args,
                kwargs,
            )
            advance(p, chunk)
            state = out.state
            if chunk.collect:
                for x in (*out.draws.values(), *out.extra.values()):
                    if x.is_fully_addressable:
                        x.copy_to_host_async()
            if pending is not None:
                consume(*pending)
            pending = (chunk, out)
            if chunk.decide:  # the next chunk depends on what is decided
                consume(*pending)
                pending = None
            if checkpoint is None:
                continue
            due = due or p.next_chunk % every == 0
            last = next_chunk(config, plan, p) is None
            if due or last:
                # Sync here: the state must be read before the next chunk
                # donates its buffers.
                if pending is not None:
                    consume(*pending)
                    pending = None
                if window:  # a slow window half seen: save at its end
                    continue
                checkpoint(p, state)
                due = False
                mark[0] = time.perf_counter()  # writing it is not sampling time
        if pending is not None:
            consume(*pending)
    finally:
        bar.close()
    kept = (slice(None),) * lead + (slice(0, p.filled),)

    def trimmed(x: np.ndarray) -> np.ndarray:
        # A run that stopped early holds room for more: keep what it drew
        # (memory-mapped files stay maps; store.json says how many are kept).
        full = x.shape[lead] == p.filled or isinstance(x, np.memmap)
        return x[kept] if full else np.array(x[kept])

    draws, extra = (
        {k: trimmed(v) for k, v in store.read(g).items()} for g in ("draws", "extra")
    )
    store.kept(p.filled)
    return RunOutput(
        state=state,
        draws=draws,
        extra=extra,
        counters=p.counters,
        warmup_s=p.seconds["warmup"],
        sampling_s=p.seconds["sample"],
        stop=stopping.record(config, p),
    )
