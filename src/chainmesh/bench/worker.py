"""One benchmark measurement in a fresh process: ``python -m chainmesh.bench.worker``.

The parent (``chainmesh.bench``) sets ``XLA_FLAGS`` (device count, threading)
before this process starts JAX, passes the job as one JSON argument, and reads
back one line ``BENCH_RESULT {...}`` from stdout. One process per measurement
keeps compilations, caches and the peak RSS of each method apart.

Every method fits the same model, data, chains, draws and seed:

- a **cold** call on data set 0 (compilation included),
- a **warm** call on new data of the same shapes (data set 1, seed + 1: what
  a user fitting many data sets pays per call),
- the sampling-phase rate: chainmesh times its sampling phase itself; NumPyro
  compiles on every ``MCMC.run``, so its sampling phase is re-run from the
  adapted state (``post_warmup_state``, one program at a time) and its
  compile time, reported by ``jax.monitoring``, is subtracted. Phases shorter
  than ``MIN_TIMED_S`` are timed again with more draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.monitoring
import numpy as np

from chainmesh.bench.models import bench_data, raw_gradient_rate

RESULT_PREFIX = "BENCH_RESULT "
NUMPYRO_METHODS = {
    "numpyro_vectorized": "vectorized",
    "numpyro_parallel": "parallel",
    "numpyro_sequential": "sequential",
}
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_TOTALS = {"compilations": 0, "compile_s": 0.0}
ASYNC_LANES = 16
"""Lanes per device of the ``chainmesh_async16`` method."""
MIN_TIMED_S = 0.2
"""A timed sampling phase shorter than this is redone with more draws."""


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        _TOTALS["compile_s"] += duration
    if event == _COMPILE_EVENTS[-1]:
        _TOTALS["compilations"] += 1


@dataclasses.dataclass
class Meter:
    """Wall seconds, XLA compilations and compile seconds of a ``with`` block."""

    wall_s: float = 0.0
    compilations: int = 0
    compile_s: float = 0.0


@contextlib.contextmanager
def measure() -> Iterator[Meter]:
    """Measure the block; results must be on the host before it ends."""
    meter, start = Meter(), dict(_TOTALS)
    t0 = time.perf_counter()
    yield meter
    meter.wall_s = time.perf_counter() - t0
    meter.compilations = _TOTALS["compilations"] - start["compilations"]
    meter.compile_s = _TOTALS["compile_s"] - start["compile_s"]


def executed_steps(num_steps: np.ndarray, blocks: list[int]) -> int:
    """Leapfrog steps paid when each block of chains runs in lockstep.

    Args:
        num_steps: ``(chains, draws)`` steps per chain and draw.
        blocks: Consecutive block sizes summing to ``chains``; a vectorized
            block pays ``size x max(steps)`` per draw, a block of 1 its own.
    """
    starts = np.cumsum([0, *blocks[:-1]])
    return int(
        sum(
            n * num_steps[s : s + n].max(axis=0).sum()
            for s, n in zip(starts, blocks, strict=True)
        )
    )


def draw_metrics(samples: dict, num_steps: np.ndarray, diverging: np.ndarray) -> dict:
    """Min bulk ESS, max r-hat, leapfrog steps and divergences of one call."""
    from chainmesh.diagnostics import summarize

    rows = summarize({k: np.asarray(v) for k, v in samples.items()})
    ess = [r["ess_bulk"] for r in rows.values()]
    rhat = [r["r_hat"] for r in rows.values()]
    return {
        "min_ess_bulk": float(np.nanmin(ess)),
        "max_r_hat": float(np.nanmax(rhat)),
        "leapfrog_useful": int(np.asarray(num_steps).sum()),
        "divergences": int(np.asarray(diverging).sum()),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM, not ``ru_maxrss``: the latter survives ``exec``, so a worker
    started by a larger parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call_metrics(meter: Meter, draws: dict) -> dict:
    """Warm-call metrics; the peak RSS is read here, before any extra timing run."""
    out = {
        "peak_rss_mb": peak_rss_mb(),
        "warm_wall_s": meter.wall_s,
        "compilations_warm": meter.compilations,
        "warm_compile_s": meter.compile_s,
        **draws,
    }
    out["ess_per_s"] = draws["min_ess_bulk"] / meter.wall_s
    return out


def _rates(metrics: dict) -> dict:
    """Add the sampling-phase gradient rate and the lockstep efficiency."""
    seconds = max(metrics["sampling_s"], 1e-9)
    metrics["gradients_per_s"] = metrics["sampling_useful"] / seconds
    metrics["lockstep_efficiency"] = (
        metrics["leapfrog_useful"] / metrics["leapfrog_executed"]
    )
    return metrics


def _longer(seconds: float) -> int:
    """How many times more draws make a ``seconds`` long phase last 2 x MIN_TIMED_S."""
    return min(100, math.ceil(2 * MIN_TIMED_S / max(seconds, 1e-9)))


def run_chainmesh(job: dict, devices: int, inner: str, **options: Any) -> dict:
    """chainmesh ``Sampler`` on ``devices`` devices with ``inner`` per device
    and other ``Sampler`` ``options`` (kernel, adaptation). The metric is
    ``"diag"`` unless ``options`` name one: these methods compare NumPyro's
    algorithm run by chainmesh against NumPyro (the metrics are compared by
    ``chainmesh bench --suite``)."""
    import chainmesh as cm

    options = {"metric": "diag", **options}

    def sampler(num_samples: int = job["samples"]) -> cm.Sampler:
        return cm.Sampler(
            bench_data(job["model"], 0).model,
            num_chains=job["chains"],
            num_warmup=job["warmup"],
            num_samples=num_samples,
            devices=devices,
            inner=inner,
            progress_bar=False,
            **options,
        )

    with measure() as cold:
        s = sampler()
        first = s.run(job["seed"], *bench_data(job["model"], 0).args)
    if job.get("cold_only"):  # a later process: what the disk cache saves
        return {
            "cold_wall_s": cold.wall_s,
            "compile_s": first.stats["compile_s"],
            "programs_from_disk": first.stats["programs_from_disk"],
        }
    args = bench_data(job["model"], 1).args
    with measure() as warm:
        result = s.run(job["seed"] + 1, *args)
    stats, extra = result.stats, result.extra
    draws = draw_metrics(result.samples, extra["num_steps"], extra["diverging"])
    timed = stats
    if stats["sampling_s"] < MIN_TIMED_S:
        longer = sampler(job["samples"] * _longer(stats["sampling_s"]))
        timed = longer.run(job["seed"] + 1, *args).stats
    return _rates(
        {
            "cold_wall_s": cold.wall_s,
            "compile_s": cold.compile_s,
            "compilations_cold": cold.compilations,
            "plan": str(s.plan),
            "sampling_source": "chainmesh sampling phase of a warm call",
            **_call_metrics(warm, draws),
            "leapfrog_executed": stats["lockstep_steps"],
            "lockstep_bound": stats["lockstep_bound"],
            "sampling_s": timed["sampling_s"],
            "sampling_useful": timed["leapfrog_steps"],
        }
    )


@dataclasses.dataclass
class _Unit:
    """One ``MCMC`` object: its device (None = default) and chain method."""

    device: Any
    chains: int
    chain_method: str
    mcmc: Any = None

    def blocks(self) -> list[int]:
        vectorized = self.chain_method == "vectorized"
        return [self.chains] if vectorized else [1] * self.chains


def _mcmc(job: dict, chains: int, chain_method: str) -> Any:
    from numpyro.infer import MCMC, NUTS, init_to_median

    kernel = NUTS(bench_data(job["model"], 0).model, init_strategy=init_to_median)
    return MCMC(
        kernel,
        num_warmup=job["warmup"],
        num_samples=job["samples"],
        num_chains=chains,
        chain_method=chain_method,
        progress_bar=False,
    )


def _device_ctx(device: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if device is None else jax.default_device(device)


def _numpyro_call(job: dict, units: list[_Unit], seed: int, args: tuple) -> tuple:
    """One NumPyro call: a fresh ``MCMC`` per unit, run in turn, gathered after.

    A fresh ``MCMC`` every call: NumPyro 0.22 cannot re-run a vectorized
    ``MCMC`` on new data (the kernel's step gets vmapped twice), and a reused
    one recompiles anyway because the data are closure constants.
    """
    root = jax.random.PRNGKey(seed)
    keys = [root] if len(units) == 1 else jax.random.split(root, len(units))
    for unit, key in zip(units, keys, strict=True):
        with _device_ctx(unit.device):
            unit.mcmc = _mcmc(job, unit.chains, unit.chain_method)
            unit.mcmc.run(key, *args, extra_fields=("num_steps", "diverging"))
    samples = [jax.device_get(u.mcmc.get_samples(group_by_chain=True)) for u in units]
    extra = [
        jax.device_get(u.mcmc.get_extra_fields(group_by_chain=True)) for u in units
    ]
    samples = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    extra = {k: np.concatenate([e[k] for e in extra]) for k in extra[0]}
    return samples, extra


def _continue(mcmc: Any, start: Any, device: Any, args: tuple) -> tuple[float, int]:
    """Run time (wall - compile) and leapfrog steps of a run from ``start``."""
    mcmc.post_warmup_state = start
    with _device_ctx(device), measure() as m:
        mcmc.run(jax.random.PRNGKey(1000), *args, extra_fields=("num_steps",))
        steps = int(np.sum(jax.device_get(mcmc.get_extra_fields()["num_steps"])))
    return max(m.wall_s - m.compile_s, 1e-9), steps


def _sampling_phase(job: dict, units: list[_Unit], args: tuple) -> tuple[float, int]:
    """Seconds and useful leapfrog steps of one more sampling phase per unit.

    Runs every program from the adapted state (``post_warmup_state``) and
    blocks after each, so that its compilation never overlaps another
    program's execution; ``wall - compile`` is then its run time. A run
    shorter than ``MIN_TIMED_S`` is too short for that difference to mean
    much (compilation takes seconds), so it is redone with more draws.
    """
    seconds, steps = 0.0, 0
    for unit in units:
        state = unit.mcmc.last_state
        if unit.chain_method == "sequential" and unit.chains > 1:
            # What NumPyro's sequential loop runs: one single-chain program each.
            shape = (1, "sequential")
            starts = [
                jax.tree.map(lambda x, i=i: x[i], state) for i in range(unit.chains)
            ]
        else:
            shape, starts = (unit.chains, unit.chain_method), [state]
        for start in starts:
            run_s, n = _continue(_mcmc(job, *shape), start, unit.device, args)
            if run_s < MIN_TIMED_S:
                longer = job | {"samples": job["samples"] * _longer(run_s)}
                run_s, n = _continue(_mcmc(longer, *shape), start, unit.device, args)
            seconds, steps = seconds + run_s, steps + n
    return seconds, steps


def run_numpyro(job: dict, units: list[_Unit]) -> dict:
    """NumPyro ``MCMC`` over ``units`` (one unit, or the device-loop pattern)."""
    with measure() as cold:
        _numpyro_call(job, units, job["seed"], bench_data(job["model"], 0).args)
    args = bench_data(job["model"], 1).args
    with measure() as warm:
        samples, extra = _numpyro_call(job, units, job["seed"] + 1, args)
    draws = draw_metrics(samples, extra["num_steps"], extra["diverging"])
    blocks = [b for u in units for b in u.blocks()]
    sampling_s, useful = _sampling_phase(job, units, args)
    out = {
        "cold_wall_s": cold.wall_s,
        "compile_s": cold.compile_s,
        "compilations_cold": cold.compilations,
        "plan": ", ".join(
            f"{u.chains} chain(s) {u.chain_method} on "
            f"{'default device' if u.device is None else u.device}"
            for u in units
        ),
        "sampling_source": "NumPyro post_warmup_state re-run, compile subtracted",
        **_call_metrics(warm, draws),
        "leapfrog_executed": executed_steps(extra["num_steps"], blocks),
        "sampling_s": sampling_s,
        "sampling_useful": useful,
    }
    return _rates(out)


def loop_units(chains: int, devices: list) -> list[_Unit]:
    """The seed backend's split: floor + remainder chains per device, in turn."""
    base, rem = divmod(chains, len(devices))
    counts = [base + (i < rem) for i in range(len(devices))]
    return [
        _Unit(d, n, "vectorized") for d, n in zip(devices, counts, strict=True) if n > 0
    ]


def run_job(job: dict) -> dict:
    """Run the job's method and return its metrics, peak RSS included."""
    devices = jax.devices()
    if len(devices) != job["devices"]:
        raise RuntimeError(
            f"expected {job['devices']} devices, JAX sees {len(devices)}; the "
            "parent must set XLA_FLAGS before this process starts"
        )
    method = job["method"]
    runners: dict[str, Callable[[], dict]] = {
        "chainmesh": lambda: run_chainmesh(job, job["devices"], "vmap"),
        "chainmesh_map": lambda: run_chainmesh(job, job["devices"], "map"),
        "chainmesh_1pd": lambda: run_chainmesh(job, job["chains"], "vmap"),
        "chainmesh_chees": lambda: run_chainmesh(
            job, job["devices"], "vmap", kernel="chees"
        ),
        "chainmesh_ensemble": lambda: run_chainmesh(
            job, job["devices"], "vmap", adapt="ensemble"
        ),
        "blackjax_chees": lambda: _blackjax_chees(job),
        "chainmesh_async": lambda: run_chainmesh(job, job["devices"], "async"),
        "chainmesh_async16": lambda: run_chainmesh(
            job, job["devices"], "async", lanes=ASYNC_LANES
        ),
        "device_loop": lambda: run_numpyro(job, loop_units(job["chains"], devices)),
        "raw_gradient": lambda: raw_gradient_rate(job["model"], job["chains"], devices),
    }
    for name, chain_method in NUMPYRO_METHODS.items():
        runners[name] = lambda cm=chain_method: run_numpyro(
            job, [_Unit(None, job["chains"], cm)]
        )
    metrics = runners[method]()
    metrics.setdefault("peak_rss_mb", peak_rss_mb())
    return metrics


def _blackjax_chees(job: dict) -> dict:
    from chainmesh.bench.peers import run_blackjax_chees

    # This module, as it runs: under ``python -m`` it is ``__main__``, and an
    # import of chainmesh.bench.worker would make a second copy whose
    # compile counters the monitoring listener never updates.
    return run_blackjax_chees(job, sys.modules[__name__])


def _finite(tree: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


def main(argv: list[str] | None = None) -> int:
    """Parse ``--json-args JOB``, run it, print ``BENCH_RESULT {...}``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--json-args":
        print(
            "usage: python -m chainmesh.bench.worker --json-args JOB", file=sys.stderr
        )
        return 2
    job = json.loads(argv[1])
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    try:
        out = {"status": "ok", "metrics": run_job(job)}
    except Exception as err:  # reported to the parent, which keeps going
        out = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
    print(RESULT_PREFIX + json.dumps(_finite(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
