"""MAMS side by side with chainmesh NUTS, ChEES and BlackJAX MAMS.

Usage: python scripts/mams_study.py
       [--models eight_schools,logistic,correlated100,funnel10]
       [--settings 64x1,8x2] [--samplers cm:nuts-diag,cm:nuts-lowrank,
       cm:chees,cm:mams,cm:mams-lowrank,bj:mams] [--warmup 500]
       [--samples 1000] [--seed 0] [--out docs/benchmarks/mams_study.json]

Each model runs at each setting (chains x CPU devices; BlackJAX vmaps every
chain on one device) with every sampler, one after another in one process.
Per run, over every scalar coordinate of every site: the min bulk ESS of the
draws and of their centred squares per 1000 sampling-phase gradients (ESS
per gradient does not depend on the machine), min ESS per second of the
sampling phase (chainmesh: ``stats["sampling_s"]``, compiled before it;
BlackJAX: its sampling program on a second, warm call), warmup gradients per
chain, max R-hat, divergences, and where the posterior is known (the
Gaussian; the funnel's ``v``) the max ``|mean - truth| / MCSE``.

Samplers: ``cm:nuts-diag`` (NumPyro's NUTS and adaptation per chain, diagonal
metric: MAMS's metric), ``cm:nuts-lowrank`` (chainmesh's default NUTS),
``cm:chees``, ``cm:mams`` (diagonal metric), ``cm:mams-lowrank``, and
``bj:mams`` (BlackJAX's ``adjusted_mclmc_dynamic`` after its own tuner,
``chainmesh.bench.peers.blackjax_mams``).
"""

from __future__ import annotations

import argparse
import json
import os

SAMPLERS = {
    "cm:nuts-diag": {"metric": "diag"},
    "cm:nuts-lowrank": {"metric": "lowrank"},
    "cm:chees": {"kernel": "chees"},
    "cm:mams": {"kernel": "mams"},
    "cm:mams-lowrank": {"kernel": "mams", "metric": "lowrank"},
    "bj:mams": None,
}


def target(name: str):
    """``(model, args, reference)``: reference is site -> (means, sds) or {}."""
    import numpy as np

    from chainmesh.bench.models import bench_data
    from chainmesh.bench.targets import correlated, correlated_args

    if name == "correlated100":
        tril, sds = correlated_args()
        return correlated, (tril,), {"x": (np.zeros_like(sds), sds)}
    example = bench_data(name, 0)
    reference = {"v": (np.zeros(1), np.full(1, 3.0))} if name == "funnel10" else {}
    return example.model, example.args, reference


def columns(samples: dict) -> dict:
    """Site -> ``(chains, draws, k)`` float64 columns of every scalar."""
    import numpy as np

    out = {}
    for name, x in samples.items():
        x = np.asarray(x, np.float64)
        out[name] = x.reshape(x.shape[0], x.shape[1], -1)
    return out


def measure(samples: dict, gradients: float, reference: dict) -> dict:
    """The per-run numbers of the module docstring (``gradients``: sampling)."""
    import numpy as np

    import chainmesh as cm

    ess, ess_sq, rhat, z = [], [], [], []
    for name, x in columns(samples).items():
        for j in range(x.shape[-1]):
            c = x[..., j]
            if np.ptp(c) == 0:
                continue
            ess.append(cm.diagnostics.ess_bulk(c))
            ess_sq.append(cm.diagnostics.ess_bulk((c - c.mean()) ** 2))
            rhat.append(cm.diagnostics.r_hat(c))
            if name in reference:
                mean, sd = reference[name][0][j], reference[name][1][j]
                z.append(abs(c.mean() - mean) / (sd / np.sqrt(ess[-1])))
    return {
        "min_ess": float(min(ess)),
        "ess_per_1000": 1000 * min(ess) / gradients,
        "ess_sq_per_1000": 1000 * min(ess_sq) / gradients,
        "max_rhat": float(max(rhat)),
        "max_z": float(max(z)) if z else None,
    }


def run_chainmesh(model, args, options: dict, chains: int, devices: int, a) -> dict:
    """One chainmesh run; ``sampling_s`` excludes compilation."""
    import numpy as np

    import chainmesh as cm

    sampler = cm.Sampler(
        model, num_chains=chains, devices=devices, num_warmup=a.warmup,
        num_samples=a.samples, progress_bar=False, **options,
    )  # fmt: skip
    result = sampler.run(a.seed, *args)
    return {
        "samples": result.samples,
        "gradients": float(np.asarray(result.extra["num_steps"], np.int64).sum()),
        "warmup_gradients_per_chain": result.stats["leapfrog_steps_warmup"] / chains,
        "sampling_s": result.stats["sampling_s"],
        "divergences": int(np.asarray(result.extra["diverging"]).sum()),
        "accept": float(np.asarray(result.extra["accept_prob"]).mean()),
    }


def run_blackjax(model, args, chains: int, a) -> dict:
    """BlackJAX MAMS: a cold call compiles, the warm call is measured."""
    import numpy as np

    from chainmesh.bench.peers import blackjax_mams

    call = blackjax_mams(model, args, chains, a.warmup, a.samples)
    call(a.seed + 1, args)
    out = call(a.seed, args)
    return {
        "samples": out.samples,
        "gradients": float(np.sum(out.steps_sampling)),
        "warmup_gradients_per_chain": float(np.sum(out.steps_warmup)) / chains,
        "sampling_s": out.sampling_s,
        "divergences": int(np.sum(out.diverging)),
        "accept": None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="eight_schools,logistic,correlated100,funnel10")
    p.add_argument("--settings", default="64x1,8x2")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("CHAINMESH_CACHE_DIR", "")

    print(HEADER, flush=True)
    rows = []
    for name in a.models.split(","):
        model, args, reference = target(name)
        for setting in a.settings.split(","):
            chains, devices = map(int, setting.split("x"))
            for sampler in a.samplers.split(","):
                if SAMPLERS[sampler] is None:
                    out = run_blackjax(model, args, chains, a)
                else:
                    opts = SAMPLERS[sampler]
                    out = run_chainmesh(model, args, opts, chains, devices, a)
                row = {"model": name, "setting": setting, "sampler": sampler}
                row |= measure(out.pop("samples"), out["gradients"], reference)
                row |= out
                row["ess_per_s"] = row["min_ess"] / row["sampling_s"]
                rows.append(row)
                print(format_row(row), flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(rows, f, indent=1)


HEADER = (
    "| model | chains x devices | sampler | ESS/1000 grad (means / squares) "
    "| min ESS/s | warmup grad/chain | max R-hat | max z | div |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    """One markdown table row (the header is ``HEADER``)."""
    z = "" if r["max_z"] is None else f"{r['max_z']:.2f}"
    return (
        f"| {r['model']} | {r['setting']} | {r['sampler']} "
        f"| {r['ess_per_1000']:.1f} / {r['ess_sq_per_1000']:.1f} "
        f"| {r['ess_per_s']:.0f} | {r['warmup_gradients_per_chain']:.0f} "
        f"| {r['max_rhat']:.3f} | {z} | {r['divergences']} |"
    )


if __name__ == "__main__":
    main()
