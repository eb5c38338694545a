"""ChEES's metrics side by side on two correlated 100-d Gaussians.

Usage: python scripts/metric_study.py [--chains 64] [--warmup 500]
       [--samples 1000] [--metrics diag,fisher,lowrank] [--seeds 1]
       [--targets rotated,correlated100] [--out metric_study.json]

Targets: ``rotated``, a zero-mean 100-d Gaussian whose covariance is a random
rotation of a spectrum log-spaced over a condition number of 316; and the
bench's ``correlated100`` (an AR(1) correlation, rho 0.9, with sds log-spaced
over a decade; ``chainmesh.bench.targets``). Each metric runs
``kernel="chees"`` on one CPU device (all chains in one block), float32.

Per run, over the 100 coordinates: the min bulk ESS per 1000 sampling-phase
gradients (leapfrog steps of every chain, warmup excluded) of the draws
(means) and of their squares; and the max ``|mean - truth| / MCSE`` of both,
once with the MCSE from the bulk ESS (``sd / sqrt(ESS)``) and once from the
spread of the chains' own means (the chains are independent after warmup, so
``sd(chain means) / sqrt(chains)`` is an MCSE that does not rest on an ESS
estimate). With 100 coordinates and a right MCSE, the max of 100 |z| exceeds
3.5 with probability about 0.05.
"""

from __future__ import annotations

import argparse
import json
import os

COND = 316.0
"""Condition number of the rotated Gaussian's covariance."""


def rotated_args(d: int = 100, seed: int = 0):
    """Cholesky factor and covariance of a random rotation of a spectrum
    log-spaced over ``COND``, with unit geometric-mean variance."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    spectrum = np.sqrt(COND) ** np.linspace(-1, 1, d)
    cov = (q * spectrum) @ q.T
    cov = (cov + cov.T) / 2
    return np.linalg.cholesky(cov).astype(np.float32), cov


def target(name: str):
    """``(scale_tril, covariance)`` of target ``name``."""
    import numpy as np

    from chainmesh.bench.targets import correlated_args

    if name == "rotated":
        return rotated_args()
    if name == "correlated100":
        tril, _ = correlated_args()
        cov = tril.astype(np.float64) @ tril.T.astype(np.float64)
        return tril, cov
    raise ValueError(f"target must be 'rotated' or 'correlated100', got {name!r}")


def measure(x, cov, steps: int) -> dict:
    """ESS per 1000 gradients and z-scores of the means and the squares of
    draws ``x`` ``(chains, draws, d)`` of a zero-mean Gaussian ``cov``."""
    import numpy as np

    import chainmesh as cm

    x = x.astype(np.float64)
    var = np.diag(cov)
    row = {}
    for name, f, truth in (("mean", x, 0.0 * var), ("square", x**2, var)):
        ess = np.array([cm.diagnostics.ess_bulk(f[..., j]) for j in range(x.shape[-1])])
        err = f.mean((0, 1)) - truth
        sd = f.std((0, 1))
        chains = f.mean(1)  # (chains, d)
        row[f"ess_per_1000_{name}"] = 1000.0 * ess.min() / steps
        row[f"min_ess_{name}"] = float(ess.min())
        row[f"max_ess_{name}"] = float(ess.max())
        row[f"max_z_{name}"] = float(np.abs(err / (sd / np.sqrt(ess))).max())
        chain_se = chains.std(0, ddof=1) / np.sqrt(chains.shape[0])
        row[f"max_z_chains_{name}"] = float(np.abs(err / chain_se).max())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--metrics", default="diag,fisher,lowrank")
    p.add_argument("--targets", default="rotated,correlated100")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=1 "
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    os.environ.setdefault("CHAINMESH_CACHE_DIR", "")
    import numpy as np

    import chainmesh as cm
    from chainmesh.bench.targets import correlated

    print(HEADER, flush=True)
    rows = []
    for name in a.targets.split(","):
        tril, cov = target(name)
        for metric in a.metrics.split(","):
            sampler = cm.Sampler(
                correlated,
                num_chains=a.chains,
                num_warmup=a.warmup,
                num_samples=a.samples,
                devices=1,
                kernel="chees",
                metric=metric,
                progress_bar=False,
            )
            for seed in range(a.seeds):
                result = sampler.run(seed, tril)
                steps = int(np.asarray(result.extra["num_steps"], np.int64).sum())
                x = np.asarray(result.samples["x"])
                row = {"target": name, "metric": metric, "seed": seed}
                row |= measure(x, cov, steps)
                row["gradients"] = steps
                row["divergences"] = int(np.asarray(result.extra["diverging"]).sum())
                rows.append(row)
                print(format_row(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


HEADER = (
    "| target | metric | seed | ESS/1000 grad (means) | ESS/1000 grad (squares) "
    "| max z means (ESS / chains) | max z squares (ESS / chains) | gradients "
    "| divergences |\n|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    """One markdown table row (the header is ``HEADER``)."""
    return (
        f"| {r['target']} | {r['metric']} | {r['seed']} "
        f"| {r['ess_per_1000_mean']:.1f} | {r['ess_per_1000_square']:.1f} "
        f"| {r['max_z_mean']:.2f} / {r['max_z_chains_mean']:.2f} "
        f"| {r['max_z_square']:.2f} / {r['max_z_chains_square']:.2f} "
        f"| {r['gradients']} | {r['divergences']} |"
    )


if __name__ == "__main__":
    main()
