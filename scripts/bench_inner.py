"""vmap vs map inside a device, against NumPyro's vectorized MCMC, side by side.

Usage: python scripts/bench_inner.py [--devices 2] [--chains 8] [--warmup 500]
       [--samples 1000]

For each model: cold call (compile + sample), warm call on new data of the same
shapes, sampling time alone, and lockstep efficiency; all methods in one process
on the same data, chains and draws.
"""

from __future__ import annotations

import argparse
import time

import chainmesh as cm


def _numpyro(model, args, new_args, chains, warmup, samples):
    import jax
    from numpyro.infer import MCMC, NUTS, init_to_median

    def make():
        return MCMC(
            NUTS(model, init_strategy=init_to_median),
            num_warmup=warmup,
            num_samples=samples,
            num_chains=chains,
            chain_method="vectorized",
            progress_bar=False,
        )

    mcmc = make()
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(0), *args)
    jax.block_until_ready(mcmc.get_samples())
    cold = time.perf_counter() - t0
    # A second run() on the same vectorized MCMC object raises in NumPyro 0.22;
    # a fresh object on new data is what callers do (and it recompiles).
    mcmc = make()
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(1), *new_args)
    jax.block_until_ready(mcmc.get_samples())
    return {"cold_s": cold, "warm_s": time.perf_counter() - t0}


def _chainmesh(model, args, new_args, chains, devices, warmup, samples, inner):
    sampler = cm.Sampler(
        model,
        num_chains=chains,
        devices=devices,
        num_warmup=warmup,
        num_samples=samples,
        inner=inner,
        progress_bar=False,
    )
    t0 = time.perf_counter()
    first = sampler.run(0, *args)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = sampler.run(1, *new_args)
    warm = time.perf_counter() - t0
    s = second.stats
    return {
        "cold_s": cold,
        "warm_s": warm,
        "compile_s": first.stats["compile_s"],
        "sampling_s": s["sampling_s"],
        "warmup_s": s["warmup_s"],
        "lockstep": s["lockstep_efficiency_warmup"],
        "lockstep_sampling": s["lockstep_efficiency"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    opts = parser.parse_args()
    cm.set_host_device_count(opts.devices)
    import numpy as np

    from chainmesh.examples import eight_schools_data, logistic_data

    logistic = logistic_data(seed=0)
    cases = {
        "logistic N=5000 P=20": (
            logistic.model,
            logistic.args,
            logistic_data(seed=1).args,
        ),
        "eight schools (non-centered)": (
            eight_schools_data().model,
            eight_schools_data().args,
            (
                eight_schools_data().args[0],
                eight_schools_data().args[1] + np.float32(1),
            ),
        ),
    }
    run = (opts.chains, opts.warmup, opts.samples)
    print(
        f"{opts.chains} chains, {opts.warmup} warmup + {opts.samples} draws, "
        f"{opts.devices} host devices"
    )
    header = (
        f"{'model':<30}{'method':<22}{'cold s':>8}{'compile s':>10}{'warm s':>8}"
        f"{'sampling s':>11}{'lockstep w/s':>14}"
    )
    print(header)
    for name, (model, args, new_args) in cases.items():
        for inner in ("vmap", "map"):
            r = _chainmesh(model, args, new_args, run[0], opts.devices, *run[1:], inner)
            print(
                f"{name:<30}{'chainmesh ' + inner:<22}{r['cold_s']:8.2f}"
                f"{r['compile_s']:10.2f}{r['warm_s']:8.2f}{r['sampling_s']:11.2f}"
                f"{r['lockstep']:8.2f}/{r['lockstep_sampling']:.2f}"
            )
        r = _numpyro(model, args, new_args, *run)
        print(
            f"{name:<30}{'numpyro vectorized':<22}{r['cold_s']:8.2f}{'':>10}"
            f"{r['warm_s']:8.2f}"
        )


if __name__ == "__main__":
    main()
