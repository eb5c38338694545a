"""One benchmark measurement in a fresh process: ``python -m chainmesh.bench_worker``.

The parent (``chainmesh.bench``) sets ``XLA_FLAGS`` (device count, threading)
before this process starts JAX, passes the job as one JSON argument, and reads
back one line ``BENCH_RESULT {...}`` from stdout. One process per measurement
keeps compilations, caches and the peak RSS of each method apart.

Every method fits the same model, data, chains, draws and seed:

- a **cold** call on data set 0 (compilation included),
- ``repeats`` **warm** calls on new data of the same shapes (data sets 1, 2,
  ...; what a user fitting many data sets pays per call),
- the sampling-phase rate: chainmesh times its sampling phase itself; NumPyro
  compiles on every ``MCMC.run``, so its sampling phase is re-run from the
  adapted state (``post_warmup_state``, one program at a time) and its
  compile time, reported by ``jax.monitoring``, is subtracted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.monitoring
import numpy as np

from chainmesh.bench_models import bench_data

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


def _call_metrics(meter: Meter, draws: dict) -> dict:
    out = {
        "warm_wall_s": meter.wall_s,
        "compilations_warm": meter.compilations,
        "warm_compile_s": meter.compile_s,
        **draws,
    }
    out["ess_per_s"] = draws["min_ess_bulk"] / meter.wall_s
    return out


def _rates(metrics: dict) -> dict:
    """Add the sampling-phase gradient rate and the lockstep efficiency."""
    metrics["gradients_per_s"] = metrics["sampling_useful"] / metrics["sampling_s"]
    metrics["lockstep_efficiency"] = (
        metrics["leapfrog_useful"] / metrics["leapfrog_executed"]
    )
    return metrics


def _median(calls: list[dict]) -> dict:
    """Per-key median over the warm calls (max for compile counts)."""
    out = {k: float(np.median([c[k] for c in calls])) for k in calls[0]}
    out["compilations_warm"] = max(c["compilations_warm"] for c in calls)
    out["warm_walls_s"] = [c["warm_wall_s"] for c in calls]
    return out


def run_chainmesh(job: dict, devices: int, inner: str) -> dict:
    """chainmesh ``Sampler`` on ``devices`` devices with ``inner`` per device."""
    import chainmesh as cm

    def sampler() -> cm.Sampler:
        return cm.Sampler(
            bench_data(job["model"], 0).model,
            num_chains=job["chains"],
            num_warmup=job["warmup"],
            num_samples=job["samples"],
            devices=devices,
            inner=inner,
            progress_bar=False,
        )

    with measure() as cold:
        s = sampler()
        s.run(job["seed"], *bench_data(job["model"], 0).args)
    calls = []
    for r in range(1, job["repeats"] + 1):
        with measure() as warm:
            result = s.run(job["seed"] + r, *bench_data(job["model"], r).args)
        stats, extra = result.stats, result.extra
        draws = draw_metrics(result.samples, extra["num_steps"], extra["diverging"])
        call = _call_metrics(warm, draws)
        call["leapfrog_executed"] = stats["lockstep_steps"]
        call["sampling_s"] = stats["sampling_s"]
        call["sampling_useful"] = stats["leapfrog_steps"]
        calls.append(call)
    return _rates(
        {
            "cold_wall_s": cold.wall_s,
            "compile_s": cold.compile_s,
            "compilations_cold": cold.compilations,
            "plan": str(s.plan),
            "sampling_source": "chainmesh sampling phase of the warm call",
            **_median(calls),
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


def _sampling_phase(job: dict, units: list[_Unit], args: tuple) -> tuple[float, int]:
    """Seconds and useful leapfrog steps of one more sampling phase per unit.

    Runs every program from the adapted state (``post_warmup_state``) and
    blocks after each, so that its compilation never overlaps another
    program's execution; ``wall - compile`` is then its run time.
    """
    seconds, steps, key = 0.0, 0, jax.random.PRNGKey(job["seed"] + 1000)
    for unit in units:
        state = unit.mcmc.last_state
        if unit.chain_method == "sequential" and unit.chains > 1:
            # What NumPyro's sequential loop runs: one single-chain program each.
            pieces = [
                (_mcmc(job, 1, "sequential"), jax.tree.map(lambda x, i=i: x[i], state))
                for i in range(unit.chains)
            ]
        else:
            pieces = [(unit.mcmc, state)]
        for mcmc, start in pieces:
            mcmc.post_warmup_state = start
            with _device_ctx(unit.device), measure() as m:
                mcmc.run(key, *args, extra_fields=("num_steps",))
                num_steps = jax.device_get(mcmc.get_extra_fields()["num_steps"])
            seconds += max(m.wall_s - m.compile_s, 1e-9)
            steps += int(np.sum(num_steps))
    return seconds, steps


def run_numpyro(job: dict, units: list[_Unit]) -> dict:
    """NumPyro ``MCMC`` over ``units`` (one unit, or the device-loop pattern)."""
    with measure() as cold:
        _numpyro_call(job, units, job["seed"], bench_data(job["model"], 0).args)
    calls = []
    for r in range(1, job["repeats"] + 1):
        args = bench_data(job["model"], r).args
        with measure() as warm:
            samples, extra = _numpyro_call(job, units, job["seed"] + r, args)
        call = _call_metrics(
            warm, draw_metrics(samples, extra["num_steps"], extra["diverging"])
        )
        blocks = [b for u in units for b in u.blocks()]
        call["leapfrog_executed"] = executed_steps(extra["num_steps"], blocks)
        calls.append(call)
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
        **_median(calls),
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


def run_raw_gradient(job: dict, devices: int, min_seconds: float = 1.0) -> dict:
    """Batched ``value_and_grad`` of the potential, sharded like chainmesh.

    A ``fori_loop`` of ``vmap(value_and_grad(potential))`` over each device's
    block of chains under ``shard_map``: the rate no sampler can beat.
    """
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model, potential_energy

    from chainmesh.mesh import CHAIN, plan_chains

    example = bench_data(job["model"], 0)
    plan = plan_chains(job["chains"], jax.devices()[:devices])
    mesh = Mesh(np.asarray(plan.devices, dtype=object), (CHAIN,))
    z0 = initialize_model(
        jax.random.PRNGKey(0),
        example.model,
        model_args=example.args,
        init_strategy=init_to_median,
    ).param_info.z
    z = {k: np.repeat(np.asarray(v)[None], plan.total_chains, 0) for k, v in z0.items()}

    def per_device(q, n, args):
        energy_grad = jax.vmap(
            jax.value_and_grad(lambda x: potential_energy(example.model, args, {}, x))
        )

        def body(_, carry):
            q, total = carry
            energy, grad = energy_grad(q)
            q = jax.tree.map(lambda a, g: a - 1e-6 * g, q, grad)
            return q, total + energy

        local = jax.tree.leaves(q)[0].shape[0]
        return jax.lax.fori_loop(0, n, body, (q, jnp.zeros(local)))

    program = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(CHAIN), P(), P()),
            out_specs=P(CHAIN),
            check_vma=False,
        )
    )
    z = jax.device_put(z, NamedSharding(mesh, P(CHAIN)))
    data = jax.device_put(example.args, NamedSharding(mesh, P()))
    with measure() as first:
        jax.block_until_ready(program(z, np.int32(5), data))
    n = 20
    while True:
        with measure() as m:
            jax.block_until_ready(program(z, np.int32(n), data))
        if m.wall_s >= min_seconds or n >= 1 << 22:
            break
        n *= 2 if m.wall_s > min_seconds / 8 else 8
    return {
        "raw_gradients_per_s": job["chains"] * n / m.wall_s,
        "iterations": n,
        "seconds": m.wall_s,
        "compile_s": first.compile_s,
        "plan": str(plan),
    }


def run_job(job: dict) -> dict:
    """Run the job's method and return its metrics (plus the peak RSS)."""
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
        "device_loop": lambda: run_numpyro(job, loop_units(job["chains"], devices)),
        "raw_gradient": lambda: run_raw_gradient(job, job["devices"]),
    }
    for name, chain_method in NUMPYRO_METHODS.items():
        runners[name] = lambda cm=chain_method: run_numpyro(
            job, [_Unit(None, job["chains"], cm)]
        )
    metrics = runners[method]()
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


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
            "usage: python -m chainmesh.bench_worker --json-args JOB", file=sys.stderr
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
