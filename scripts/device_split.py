"""One call on 1 CPU device against the same call on 2: what the split costs.

Usage: python scripts/device_split.py [--kernel chees] [--adapt chain]
       [--metric diag] [--chains 8] [--warmup 500] [--samples 1000]
       [--repeats 5] [--devices 1,2]

Eight schools (non-centered), the same chains, warmup and draws on each mesh
size, each in its own process (the device count is fixed when JAX starts);
the table gives the best of ``repeats`` warm calls (new data of the same
shapes compile nothing) as total / warmup / sampling seconds, and the ratio
of each mesh's total to the first mesh's. A pooled kernel communicates once
per warmup transition on a mesh of more than one device; the sampling phase
never communicates, so its ratio is what the split costs without
collectives (contention for the cores), and the warmup's ratio adds theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(options: dict) -> dict:
    """Best-of-``repeats`` seconds of a warm call on this process's devices."""
    import jax
    import numpy as np

    import chainmesh as cm
    from chainmesh.bench.models import bench_data

    example = bench_data("eight_schools", 0)
    sampler = cm.Sampler(
        example.model,
        num_chains=options["chains"],
        num_warmup=options["warmup"],
        num_samples=options["samples"],
        kernel=options["kernel"],
        adapt=options["adapt"],
        metric=options["metric"],
        devices=len(jax.devices()),
        progress_bar=False,
    )
    sampler.run(0, *example.args)  # compiles
    best = None
    for seed in range(1, options["repeats"] + 1):
        args = bench_data("eight_schools", seed).args
        result = sampler.run(seed, *args)
        s = result.stats
        times = (s["warmup_s"] + s["sampling_s"], s["warmup_s"], s["sampling_s"])
        best = times if best is None or times[0] < best[0] else best
    assert np.isfinite(best).all()
    return {"total": best[0], "warmup": best[1], "sampling": best[2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="chees")
    p.add_argument("--adapt", default="chain")
    p.add_argument("--metric", default="diag")
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", default="1,2")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    options = {k: getattr(a, k) for k in ("kernel", "adapt", "metric", "chains")}
    options |= {k: getattr(a, k) for k in ("warmup", "samples", "repeats")}
    if a.child:
        print(json.dumps(measure(options)))
        return
    rows = []
    for devices in (int(d) for d in a.devices.split(",")):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", "1"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append((devices, json.loads(out.stdout.strip().splitlines()[-1])))
    print("| devices | total s | warmup s | sampling s | total / first |")
    print("|---:|---:|---:|---:|---:|")
    first = rows[0][1]["total"]
    for devices, t in rows:
        print(
            f"| {devices} | {t['total']:.4f} | {t['warmup']:.4f} | "
            f"{t['sampling']:.4f} | {t['total'] / first:.2f} |"
        )


if __name__ == "__main__":
    main()
