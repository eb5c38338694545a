"""Every chainmesh kernel at many chains on one GPU: speed, compile reuse, ESS.

Usage: PYTHONPATH=src python3 scripts/gpu_kernels.py --out DIR
       [--chains 1024,4096] [--warmup 300] [--samples 500] [--budget-s 480]
       [--models logistic,eight_schools,funnel10] [--configs nuts-vmap,...]

On the first device of ``jax.devices()`` (a GPU if there is one, else the
CPU, for a dry run), each cell (model, chains, configuration) makes a cold
call (compile + run) and a warm call with a new seed and new data of the same
shapes, counting compilations with ``jax.monitoring``. The warm call's draws
give the min bulk and tail ESS and max r-hat over every scalar of every site,
ESS per second of sampling and ESS per 1000 sampling gradients.

Cells run in priority order (logistic, then eight schools, at each chain
count in turn; funnel10 last); a cell whose estimated length (twice the
slowest cell so far at its chain count, 60 s before any) would overrun
``--budget-s`` is recorded as skipped. ``gpu_kernels.json`` and
``gpu_kernels.md`` in ``--out`` are rewritten after every cell, so a killed
run leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.monitoring
import numpy as np
import numpyro
from numpyro.diagnostics import gelman_rubin
from scipy.special import ndtri

import chainmesh as cm
from chainmesh import diagnostics
from chainmesh.bench.models import BENCH_MODELS, bench_data

CONFIGS = {
    "nuts-vmap": lambda chains: {"inner": "vmap"},
    "nuts-async": lambda chains: {"inner": "async"},
    "nuts-async-half": lambda chains: {"inner": "async", "lanes": max(1, chains // 2)},
    "nuts-ensemble": lambda chains: {"adapt": "ensemble"},
    "chees": lambda chains: {"kernel": "chees"},
}
"""Configuration name -> Sampler options at a chain count (one device)."""
PRIMARY_MODELS = ("logistic", "eight_schools")
"""Models that run at every chain count before any other model runs."""
FIRST_ESTIMATE_S = 60.0
COMPILES = [0]


def _count(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[0] += 1


def _timed(sampler: cm.Sampler, seed: int, args: tuple) -> tuple[cm.Result, float, int]:
    start, t0 = COMPILES[0], time.perf_counter()
    result = sampler.run(seed, *args)
    return result, time.perf_counter() - t0, COMPILES[0] - start


def _z_scale(x: np.ndarray) -> np.ndarray:
    """``diagnostics._z_scale`` with average ranks from one argsort.

    The same numbers as scipy's ``rankdata(method="average")``, several
    times faster on millions of draws (4096 chains x 500 draws).
    """
    flat = x.ravel()
    order = np.argsort(flat)
    ordered = flat[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    end = np.r_[first[1:], flat.size]
    ranks = np.empty(flat.size)
    ranks[order] = np.repeat((first + end + 1) / 2.0, end - first)
    return ndtri((ranks - 0.375) / (flat.size + 0.25)).reshape(x.shape)


def coordinate_diagnostics(x: np.ndarray) -> tuple[float, float, float]:
    """Bulk ESS, tail ESS and r-hat of draws shaped ``(chains, draws)``.

    Equal to ``diagnostics.ess_bulk``, ``ess_tail`` and ``r_hat`` (checked
    by ``check_diagnostics``), with the ranks computed once for both.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] < 4 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    z = _z_scale(diagnostics._split(x))
    bulk = diagnostics.effective_sample_size(z)
    tail = diagnostics.ess_tail(x)
    if x.shape[0] < 2:
        return bulk, tail, float("nan")
    folded = _z_scale(diagnostics._split(np.abs(x - np.median(x))))
    return bulk, tail, float(max(gelman_rubin(z), gelman_rubin(folded)))


def check_diagnostics() -> float:
    """Largest relative difference to ``chainmesh.diagnostics`` (ties included)."""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(6, 80)).cumsum(axis=1), 1)
    ours = coordinate_diagnostics(x)
    ref = (diagnostics.ess_bulk(x), diagnostics.ess_tail(x), diagnostics.r_hat(x))
    diff = max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))
    if not diff < 1e-9:
        raise RuntimeError(f"fast diagnostics differ from chainmesh's: {ours} {ref}")
    return diff


def posterior_diagnostics(samples: dict[str, np.ndarray], pool) -> dict:
    """Min bulk/tail ESS and max r-hat over every scalar of every site."""
    columns = []
    for x in samples.values():
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        columns += [flat[..., j] for j in range(flat.shape[-1])]
    bulk, tail, rhat = np.array(list(pool.map(coordinate_diagnostics, columns))).T
    return {
        "scalars": len(columns),
        "min_ess_bulk": float(np.nanmin(bulk)),
        "min_ess_tail": float(np.nanmin(tail)),
        "max_r_hat": float(np.nanmax(rhat)),
    }


def run_cell(model: str, chains: int, name: str, opts, pool) -> dict:
    """Cold and warm call of one configuration; the warm call's diagnostics."""
    cold_data, warm_data = bench_data(model, 0), bench_data(model, 1)
    sampler = cm.Sampler(
        cold_data.model,
        num_chains=chains,
        num_warmup=opts.warmup,
        num_samples=opts.samples,
        devices=jax.devices()[:1],
        progress_bar=False,
        cache_dir=False,
        **CONFIGS[name](chains),
    )
    first, cold_s, cold_compiles = _timed(sampler, 0, cold_data.args)
    compile_s = first.stats["compile_s"]
    del first
    second, warm_s, warm_compiles = _timed(sampler, 1, warm_data.args)
    stats = second.stats
    grads = stats["leapfrog_steps"]
    record = {
        "cold_s": cold_s,
        "warm_s": warm_s,
        "compilations_cold": cold_compiles,
        "compilations_warm": warm_compiles,
        "compile_s": compile_s,
        "warmup_s": stats["warmup_s"],
        "sampling_s": stats["sampling_s"],
        "leapfrog_steps_warmup": stats["leapfrog_steps_warmup"],
        "leapfrog_steps": grads,
        "leapfrog_steps_extra": int(second.extra["num_steps"].sum()),
        "lockstep_efficiency_warmup": stats["lockstep_efficiency_warmup"],
        "lockstep_efficiency": stats["lockstep_efficiency"],
        "lockstep_bound": stats["lockstep_bound"],
        "gradients_per_s": stats["gradients_per_s"],
        "divergences": stats["divergences"],
    }
    t0 = time.perf_counter()
    record.update(posterior_diagnostics(second.samples, pool))
    record["diagnostics_s"] = time.perf_counter() - t0
    ess = record["min_ess_bulk"]
    record["ess_per_s"] = ess / stats["sampling_s"]
    record["ess_per_1k_grads"] = 1000.0 * ess / grads if grads else float("nan")
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in record.items()}


COLUMNS = [
    ("cold s", "cold_s", "{:.1f}"),
    ("warm s", "warm_s", "{:.2f}"),
    ("compiles warm", "compilations_warm", "{:d}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("warmup s", "warmup_s", "{:.2f}"),
    ("sampling s", "sampling_s", "{:.2f}"),
    ("grads warmup", "leapfrog_steps_warmup", "{:,}"),
    ("grads sampling", "leapfrog_steps", "{:,}"),
    ("lockstep warmup", "lockstep_efficiency_warmup", "{:.2f}"),
    ("lockstep", "lockstep_efficiency", "{:.2f}"),
    ("bound", "lockstep_bound", "{:.2f}"),
    ("div", "divergences", "{:d}"),
    ("min ESS bulk", "min_ess_bulk", "{:,.0f}"),
    ("min ESS tail", "min_ess_tail", "{:,.0f}"),
    ("max r-hat", "max_r_hat", "{:.3f}"),
    ("ESS/s", "ess_per_s", "{:,.0f}"),
    ("ESS/1k grads", "ess_per_1k_grads", "{:.2f}"),
]


def markdown(report: dict) -> str:
    """The records as one Markdown table, in the order they ran."""
    head = ["model", "chains", "config"] + [c[0] for c in COLUMNS]
    lines = [
        f"# chainmesh kernels on {report['device']}",
        "",
        f"jax {report['jax']}, numpyro {report['numpyro']}, "
        f"{report['warmup']} warmup + {report['samples']} draws per chain; "
        "timings and diagnostics of the warm call (new seed, new data).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for r in report["records"]:
        cells = [r["model"], str(r["chains"]), r["config"]]
        if r["status"] != "ok":
            cells += [r["status"]] + [""] * (len(COLUMNS) - 1)
        else:
            cells += [fmt.format(r[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> None:
    """Rewrite both files atomically, so a kill never leaves half a file."""
    for name, text in (
        ("gpu_kernels.json", json.dumps(report, indent=1)),
        ("gpu_kernels.md", markdown(report)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def cells(models: list[str], chain_counts: list[int], configs: list[str]):
    """(model, chains, config) in priority order."""
    first = [m for m in models if m in PRIMARY_MODELS]
    rest = [m for m in models if m not in PRIMARY_MODELS]
    for group in (first, rest):
        for chains in chain_counts:
            for model in group:
                for name in configs:
                    yield model, chains, name


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", default="1024,4096")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--models", default="logistic,eight_schools,funnel10")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    chain_counts = [int(c) for c in opts.chains.split(",")]
    models, configs = opts.models.split(","), opts.configs.split(",")
    for flag, given, known in (
        ("--configs", configs, CONFIGS),
        ("--models", models, BENCH_MODELS),
    ):
        unknown = [c for c in given if c not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    jax.monitoring.register_event_duration_secs_listener(_count)
    device = jax.devices()[0]
    report = {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "chainmesh": cm.__version__,
        "python": sys.version.split()[0],
        "command": " ".join([sys.executable, *sys.argv]),
        "warmup": opts.warmup,
        "samples": opts.samples,
        "budget_s": opts.budget_s,
        "diagnostics_check_rel_diff": check_diagnostics(),
        "records": [],
    }
    print(f"device {report['device']} jax {jax.__version__}", flush=True)
    slowest: dict[int, float] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for model, chains, name in cells(models, chain_counts, configs):
            record = {"model": model, "chains": chains, "config": name}
            elapsed = time.perf_counter() - start
            estimate = 2 * slowest[chains] if chains in slowest else FIRST_ESTIMATE_S
            if elapsed + estimate > opts.budget_s:
                record["status"] = "skipped: budget"
            else:
                t0 = time.perf_counter()
                try:
                    record.update(run_cell(model, chains, name, opts, pool))
                    record["status"] = "ok"
                except Exception as err:  # one failing cell must not lose the rest
                    record["status"] = f"error: {type(err).__name__}"
                    record["error"] = str(err)[:2000]
                cm.clear_cache()
                record["cell_s"] = time.perf_counter() - t0
                slowest[chains] = max(slowest.get(chains, 0.0), record["cell_s"])
            record["elapsed_s"] = time.perf_counter() - start
            report["records"].append(record)
            write(out, report)
            print(json.dumps(record), flush=True)
    warm = [r for r in report["records"] if r.get("compilations_warm")]
    for r in warm:
        print(f"RECOMPILED on a warm call: {r['model']} {r['chains']} {r['config']}")
    print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
