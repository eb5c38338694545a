"""Peak host memory of a long run: draws kept in memory vs streamed to disk.

Usage: python scripts/bench_memory.py [--chains 64] [--draws 20000] [--dim 100]

Each variant runs in its own subprocess (peak RSS is per process): a
``d``-dimensional Gaussian, ``chains x draws`` kept draws, once with draws in
host memory and once with ``store=DIR`` (``.npy`` files written chunk by chunk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def _child(mode: str, chains: int, draws: int, dim: int, directory: str) -> None:
    import time

    import chainmesh as cm

    cm.set_host_device_count(2)
    import numpy as np

    from chainmesh.bench.worker import peak_rss_mb
    from chainmesh.examples import gaussian_data

    example = gaussian_data(d=dim)
    store = directory if mode == "streamed" else None
    sampler = cm.Sampler(
        example.model,
        num_chains=chains,
        num_warmup=200,
        num_samples=draws,
        chunk_size=500,
        store=store,
        progress_bar=False,
    )
    t0 = time.perf_counter()
    result = sampler.run(0, *example.args)
    seconds = time.perf_counter() - t0
    x = result.samples["x"]
    nbytes = sum(v.nbytes for v in result.samples.values()) + sum(
        v.nbytes for v in result.extra.values()
    )
    # Touch a few draws so the lazily read result is used, not only allocated.
    check = float(np.asarray(x[:, -5:]).mean())
    rss_mb = peak_rss_mb()
    print(
        json.dumps(
            {
                "mode": mode,
                "peak_rss_mb": rss_mb,
                "draws_mb": nbytes / 2**20,
                "seconds": seconds,
                "check": check,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, default=64)
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"))
    opts = parser.parse_args()
    if opts.child:
        _child(opts.child[0], opts.chains, opts.draws, opts.dim, opts.child[1])
        return
    rows = []
    runs = [("in-memory", opts.draws), ("streamed", opts.draws)]
    runs += [("in-memory", opts.draws // 4), ("streamed", opts.draws // 4)]
    for mode, draws in runs:
        with tempfile.TemporaryDirectory() as directory:
            cmd = [sys.executable, __file__, "--chains", str(opts.chains)]
            cmd += ["--draws", str(draws), "--dim", str(opts.dim)]
            out = subprocess.run(
                [*cmd, "--child", mode, directory],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "n": draws})
    print(f"{opts.chains} chains x {opts.dim} parameters (float32), 2 host devices")
    print(f"{'mode':<11}{'draws':>7}{'peak RSS MB':>13}{'draws MB':>10}{'wall s':>8}")
    for r in rows:
        print(
            f"{r['mode']:<11}{r['n']:7d}{r['peak_rss_mb']:13.0f}"
            f"{r['draws_mb']:10.0f}{r['seconds']:8.1f}"
        )


if __name__ == "__main__":
    main()
