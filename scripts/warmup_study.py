"""How much warmup each adaptation needs: min ESS and max r-hat against warmup.

Usage: python scripts/warmup_study.py [--model eight_schools] [--chains 64]
       [--devices 2] [--samples 500] [--warmups 100,200,500] [--seeds 3]
       [--kernels chees,"nuts (chain)","nuts (ensemble)"]
       [--out docs/benchmarks/warmup_eight_schools.json]

For each kernel (ChEES, NUTS with per-chain adaptation, NUTS with ensemble
adaptation) and each warmup length, the same chains and draws are sampled
with several seeds; the table reports medians over the seeds of the min bulk
ESS over parameters, the max split r-hat, divergences and gradients (useful
leapfrog steps, warmup included). Runs on host CPU devices, single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os

KERNELS = {
    "chees": {"kernel": "chees"},
    "nuts (chain)": {},
    "nuts (ensemble)": {"adapt": "ensemble"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="eight_schools")
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--warmups", default="100,200,500")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--kernels", default=",".join(KERNELS), help="subset of KERNELS")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={a.devices} "
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    os.environ.setdefault("CHAINMESH_CACHE_DIR", "")
    import numpy as np

    import chainmesh as cm
    from chainmesh.bench.models import bench_data

    example = bench_data(a.model, 0)
    rows = []
    chosen = a.kernels.split(",")
    for name, options in KERNELS.items():
        if name not in chosen:
            continue
        for warmup in map(int, a.warmups.split(",")):
            runs = []
            for seed in range(a.seeds):
                result = cm.Sampler(
                    example.model,
                    num_chains=a.chains,
                    num_warmup=warmup,
                    num_samples=a.samples,
                    devices=a.devices,
                    progress_bar=False,
                    **options,
                ).run(seed, *example.args)
                summary = result.summary(print_=False).values()
                runs.append(
                    {
                        "min_ess_bulk": min(r["ess_bulk"] for r in summary),
                        "max_r_hat": max(r["r_hat"] for r in summary),
                        "divergences": int(result.extra["diverging"].sum()),
                        "gradients": result.stats["leapfrog_steps"],
                    }
                )
            row = {"kernel": name, "warmup": warmup}
            row |= {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            rows.append(row)
            print(
                f"{name:<16} warmup {warmup:>4}: min ESS {row['min_ess_bulk']:7.0f}  "
                f"max r-hat {row['max_r_hat']:.3f}  div {row['divergences']:4.0f}  "
                f"gradients {row['gradients']:.3g}",
                flush=True,
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
