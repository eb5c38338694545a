"""The same code on a GPU: correctness against the CPU, compile reuse, speed.

Usage: python scripts/gpu_check.py [--chains 64] [--out results.json]

On the machine's first GPU: the logistic-regression demo model with
``inner="vmap"`` and ``"map"``, a warm call on new data (compilations counted
with ``jax.monitoring``), NumPyro's vectorized MCMC on the same GPU, and the
posterior means compared with a chainmesh run on one CPU device.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.monitoring
import numpy as np

import chainmesh as cm
from chainmesh.examples import logistic_data

COMPILES = [0]


def _count(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[0] += 1


def _timed(sampler: cm.Sampler, seed: int, args: tuple) -> tuple[cm.Result, float, int]:
    start, t0 = COMPILES[0], time.perf_counter()
    result = sampler.run(seed, *args)
    return result, time.perf_counter() - t0, COMPILES[0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument(
        "--skip-map", action="store_true", help="skip inner='map' (slow on a GPU)"
    )
    opts = parser.parse_args()
    jax.monitoring.register_event_duration_secs_listener(_count)
    gpu = jax.devices()[:1]
    cpu = jax.devices("cpu")[:1]
    data, new = logistic_data(seed=0), logistic_data(seed=1)
    config = {
        "num_chains": opts.chains,
        "num_warmup": opts.warmup,
        "num_samples": opts.samples,
        "progress_bar": False,
    }
    report = {"devices": [str(d) for d in gpu], "jax": jax.__version__, "runs": {}}
    means = {}
    runs = [
        ("gpu vmap", gpu, "vmap"),
        ("gpu map", gpu, "map"),
        ("cpu vmap", cpu, "vmap"),
    ]
    for name, devices, inner in runs:
        if opts.skip_map and inner == "map":
            continue
        sampler = cm.Sampler(data.model, devices=devices, inner=inner, **config)
        first, cold, cold_compiles = _timed(sampler, 0, data.args)
        second, warm, warm_compiles = _timed(sampler, 1, new.args)
        rows = first.summary(print_=False)
        means[name] = (first.samples["beta"].reshape(-1, 20), rows)
        report["runs"][name] = {
            "cold_s": cold,
            "warm_s": warm,
            "compile_s": first.stats["compile_s"],
            "compilations_cold": cold_compiles,
            "compilations_warm": warm_compiles,
            "sampling_s": second.stats["sampling_s"],
            "lockstep_sampling": second.stats["lockstep_efficiency"],
            "gradients_per_s": second.stats["gradients_per_s"],
            "max_r_hat": max(r["r_hat"] for r in rows.values()),
            "divergences": first.stats["divergences"],
            "device": str(first.plan.devices[0]),
        }
        print(name, json.dumps(report["runs"][name]), flush=True)
    draws_gpu, rows_gpu = means["gpu vmap"]
    draws_cpu, rows_cpu = means["cpu vmap"]
    z = []
    for j in range(20):
        label = f"beta[{j}]"
        se = np.hypot(
            rows_gpu[label]["sd"] / np.sqrt(rows_gpu[label]["ess_bulk"]),
            rows_cpu[label]["sd"] / np.sqrt(rows_cpu[label]["ess_bulk"]),
        )
        z.append(abs(draws_gpu[:, j].mean() - draws_cpu[:, j].mean()) / se)
    report["gpu_vs_cpu_max_z"] = float(np.max(z))
    from numpyro.infer import MCMC, NUTS, init_to_median

    def numpyro_run(args, seed):
        mcmc = MCMC(
            NUTS(data.model, init_strategy=init_to_median),
            num_warmup=opts.warmup,
            num_samples=opts.samples,
            num_chains=opts.chains,
            chain_method="vectorized",
            progress_bar=False,
        )
        start, t0 = COMPILES[0], time.perf_counter()
        with jax.default_device(gpu[0]):
            mcmc.run(jax.random.PRNGKey(seed), *args)
            jax.block_until_ready(mcmc.get_samples())
        return time.perf_counter() - t0, COMPILES[0] - start

    cold, cold_compiles = numpyro_run(data.args, 0)
    warm, warm_compiles = numpyro_run(new.args, 1)
    report["runs"]["gpu numpyro vectorized"] = {
        "cold_s": cold,
        "warm_s": warm,
        "compilations_cold": cold_compiles,
        "compilations_warm": warm_compiles,
    }
    print(json.dumps(report, indent=1))
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
