"""``chainmesh bench``: chainmesh against NumPyro over a sweep of host devices.

Every (devices, chains, method) measurement runs in its own Python process
(``chainmesh.bench.worker``) whose ``XLA_FLAGS`` this module sets before the
process starts, so the device count is real and each method's compilations
and peak RSS are its own. Results go to ``results.json``; ``results.md`` and
``scaling.png`` are made from it by ``chainmesh.bench.report``.

Example:
    chainmesh bench --model logistic --devices 1,2 --chains 8 --single-thread
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chainmesh.bench.host import environment, wait_for_quiet
from chainmesh.bench.models import BENCH_MODELS
from chainmesh.bench.worker import ASYNC_LANES, RESULT_PREFIX
from chainmesh.persistent import ENV_DIR as CACHE_ENV

METHODS = (
    "chainmesh",
    "chainmesh_map",
    "chainmesh_1pd",
    "numpyro_vectorized",
    "numpyro_parallel",
    "numpyro_sequential",
    "device_loop",
    "chainmesh_chees",
    "chainmesh_ensemble",
    "blackjax_chees",
    "chainmesh_async",
    "chainmesh_async16",
)
"""Methods in table order (``raw_gradient`` is measured for every setting)."""

DEFAULT_METHODS = METHODS[:7]
"""What ``--methods`` defaults to: NUTS, chainmesh against NumPyro. The
ensemble kernels and BlackJAX (the ``bench`` extra) are asked for by name."""

DEVICE_FLAG = "--xla_force_host_platform_device_count"
SINGLE_THREAD_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false",
    "intra_op_parallelism_threads=1",
)
"""One core per device: without them XLA's CPU device uses every core."""

POSITIVE_METRICS = (
    "cold_wall_s",
    "compile_s",
    "compilations_cold",
    "warm_wall_s",
    "sampling_s",
    "sampling_useful",
    "gradients_per_s",
    "leapfrog_useful",
    "leapfrog_executed",
    "lockstep_efficiency",
    "min_ess_bulk",
    "ess_per_s",
    "max_r_hat",
    "peak_rss_mb",
)
"""Metrics every successful method run reports, all > 0."""

COUNT_METRICS = ("compilations_warm", "divergences")
"""Metrics every successful method run reports, all >= 0."""


def not_applicable(method: str, devices: int, chains: int) -> str | None:
    """Why ``method`` does not run for this setting, or None if it does."""
    if method in ("chainmesh_1pd", "numpyro_parallel") and chains > devices:
        return f"one chain per device needs chains <= devices ({chains} > {devices})"
    per_device = math.ceil(chains / devices)
    if method == "chainmesh_async16" and per_device < ASYNC_LANES:
        return f"{ASYNC_LANES} lanes need as many chains per device ({per_device})"
    return None


def worker_env(devices: int, single_thread: bool) -> dict[str, str]:
    """The environment of a worker: ``XLA_FLAGS`` with ``devices`` CPU devices."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith(DEVICE_FLAG) and f not in SINGLE_THREAD_FLAGS
    ]
    flags.append(f"{DEVICE_FLAG}={devices}")
    if single_thread:
        flags.extend(SINGLE_THREAD_FLAGS)
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_worker(
    job: dict, env: dict[str, str], timeout: float, module: str = "worker"
) -> dict:
    """Run one job in a fresh ``chainmesh.bench.<module>`` process; return its
    status and metrics."""
    cmd = [sys.executable, "-m", f"chainmesh.bench.{module}", "--json-args"]
    try:
        proc = subprocess.run(
            [*cmd, json.dumps(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "status": "error",
        "reason": f"worker exited with {proc.returncode}: {' | '.join(tail)}",
    }


def _measure(job: dict, env: dict[str, str], timeout: float) -> dict:
    """One measurement; chainmesh methods also run a second, later process.

    A chainmesh job starts with an empty disk cache of its own (its cold call
    is a first-ever process); a second process on the same cache then times
    the cold call every later process pays (``cold2_wall_s``, ``compile2_s``).
    Other methods run with chainmesh's disk cache off.
    """
    if not job["method"].startswith("chainmesh"):
        return run_worker(job, {**env, CACHE_ENV: ""}, timeout)
    with tempfile.TemporaryDirectory(prefix="chainmesh-bench-cache-") as cache:
        env = {**env, CACHE_ENV: str(Path(cache) / "xla")}
        out = run_worker(job, env, timeout)
        if out["status"] != "ok":
            return out
        later = run_worker({**job, "cold_only": True}, env, timeout)
    if later["status"] != "ok":
        return later
    m = later["metrics"]
    out["metrics"] |= {"cold2_wall_s": m["cold_wall_s"], "compile2_s": m["compile_s"]}
    out["metrics"]["programs_from_disk2"] = m["programs_from_disk"]
    return out


def _progress(i: int, n: int, label: str, out: dict) -> str:
    head = f"[{i:>2}/{n}] {label:<62}"
    tail = f"({out['process_s']:.0f} s, load {out['load_average_before']:.1f})"
    if out["status"] != "ok":
        return f"{head} {out['status']}: {out.get('reason', '')} {tail}"
    m = out["metrics"]
    if "raw_gradients_per_s" in m:
        return f"{head} raw gradients/s {m['raw_gradients_per_s']:.3g}  {tail}"
    return (
        f"{head} cold {m['cold_wall_s']:5.1f} s  warm {m['warm_wall_s']:5.2f} s  "
        f"grad/s {m['gradients_per_s']:.3g}  min ESS/s {m['ess_per_s'] or 0:.3g}  "
        f"{tail}"
    )


def command_line(options: argparse.Namespace) -> str:
    """The full ``chainmesh bench`` command that reproduces ``options``."""
    words = [
        "chainmesh bench",
        f"--model {options.model}",
        f"--devices {','.join(map(str, options.devices))}",
        f"--chains {','.join(map(str, options.chains))}",
        f"--warmup {options.warmup} --samples {options.samples}",
        f"--repeats {options.repeats}",
    ]
    if options.single_thread:
        words.append("--single-thread")
    if list(options.methods) != list(DEFAULT_METHODS):
        words.append(f"--methods {','.join(options.methods)}")
    if options.seed:
        words.append(f"--seed {options.seed}")
    if options.max_busy is not None:
        words.append(f"--max-busy {options.max_busy:g}")
    return " ".join([*words, f"--out {options.out}"])


def combine(rounds: list[dict]) -> dict:
    """One record from the rounds of a measurement: medians of every number.

    ``compilations_warm`` keeps its maximum (a single recompilation shows);
    text fields come from the first round; any failed round fails the record.
    """
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed:
        return {"status": failed[0]["status"], "reason": failed[0].get("reason", "")}
    first = rounds[0]["metrics"]
    metrics = {}
    for key, value in first.items():
        values = [r["metrics"][key] for r in rounds]
        numbers = all(isinstance(v, int | float) for v in values)
        metrics[key] = float(np.median(values)) if numbers else value
    if "compilations_warm" in first:
        metrics["compilations_warm"] = max(
            r["metrics"]["compilations_warm"] for r in rounds
        )
    return {"status": "ok", "metrics": metrics}


def run_benchmark(options: argparse.Namespace) -> dict:
    """Run every (devices, chains, method) measurement ``repeats`` times.

    Rounds go round-robin (every measurement once, then again), so a burst of
    other work on the machine spreads over methods instead of hitting one.
    """
    settings = [(d, c) for d in options.devices for c in options.chains]
    jobs = [(d, c, "raw_gradient") for d, c in settings]
    jobs += [(d, c, m) for d, c in settings for m in options.methods]
    runnable = [j for j in jobs if not not_applicable(j[2], j[0], j[1])]
    results = {
        "schema_version": 1,
        "command": command_line(options),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "config": {
            k: getattr(options, k)
            for k in ("model", "devices", "chains", "warmup", "samples", "repeats")
        }
        | {"single_thread": options.single_thread, "seed": options.seed}
        | {"max_busy": options.max_busy}
        | {"methods": list(options.methods)},
        "environment": environment(),
        "raw_gradient": [],
        "runs": [],
    }
    rounds: dict[tuple, list[dict]] = {job: [] for job in runnable}
    total, i = len(runnable) * options.repeats, 0
    for r in range(1, options.repeats + 1):
        for devices, chains, method in runnable:
            env = worker_env(devices, options.single_thread)
            job = {"devices": devices, "chains": chains, "method": method}
            job |= {k: getattr(options, k) for k in ("model", "warmup", "samples")}
            job["seed"] = options.seed
            waited, busy = 0.0, None
            if options.max_busy is not None:
                waited, busy = wait_for_quiet(options.max_busy, options.timeout)
            load, t0 = os.getloadavg()[0], time.perf_counter()
            out = _measure(job, env, options.timeout)
            out |= {
                "process_s": time.perf_counter() - t0,
                "load_average_before": load,
                "busy_tasks_before": busy,
                "waited_s": waited,
            }
            rounds[devices, chains, method].append(out)
            i += 1
            label = f"round {r}/{options.repeats} devices={devices} chains={chains}"
            print(_progress(i, total, f"{label} {method}", out), flush=True)
    for devices, chains, method in jobs:
        record = {"devices": devices, "chains": chains, "method": method}
        reason = not_applicable(method, devices, chains)
        if reason:
            record |= {"status": "n/a", "reason": reason}
        else:
            outs = rounds[devices, chains, method]
            record |= combine(outs) | {
                "xla_flags": worker_env(devices, options.single_thread)["XLA_FLAGS"],
                "rounds": outs,
            }
        key = "raw_gradient" if method == "raw_gradient" else "runs"
        results[key].append(record)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    return results


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 1,2,4: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _methods(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}"
        )
    return [m for m in METHODS if m in names]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``chainmesh`` command's subparsers."""
    p = sub.add_parser(
        "bench",
        help="benchmark chainmesh against NumPyro over host device counts",
        description="Benchmark chainmesh against NumPyro over host CPU device "
        "counts; write results.json, results.md and scaling.png into --out. "
        "chainmesh bench --suite posteriordb --help: the posteriordb scoreboard.",
    )
    p.add_argument(
        "--model",
        choices=sorted(BENCH_MODELS),
        default="logistic",
        help="model and synthetic data (logistic)",
    )
    p.add_argument(
        "--devices",
        type=_int_list,
        default=[1, 2, 4, 8],
        help="host CPU device counts to sweep (1,2,4,8)",
    )
    p.add_argument(
        "--chains", type=_int_list, default=[8, 64], help="chain counts to sweep (8,64)"
    )
    p.add_argument("--warmup", type=int, default=300, help="warmup per chain (300)")
    p.add_argument("--samples", type=int, default=500, help="draws per chain (500)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of fresh measurement processes, medians reported (1)",
    )
    p.add_argument(
        "--single-thread",
        action="store_true",
        help="one core per device (XLA CPU threading off)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} "
        f"(default {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (0)")
    p.add_argument(
        "--max-busy",
        type=float,
        default=None,
        metavar="N",
        help="before each measurement wait (up to --timeout) until at most N "
        "other tasks are runnable (Linux; off by default)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds allowed per measurement process (1800)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output folder (bench-results)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; write the three files."""
    from chainmesh.bench.report import write_report

    for name in ("warmup", "samples", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"chainmesh bench: --{name} must be >= 1")
    results = run_benchmark(args)
    for path in write_report(results, args.out):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``chainmesh bench ...`` without the ``chainmesh`` prefix (for scripts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="chainmesh")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["bench", *argv]))


if __name__ == "__main__":
    sys.exit(main())
