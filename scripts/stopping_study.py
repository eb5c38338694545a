"""What `num_warmup="auto", target_ess=400` spends, against fixed lengths.

Usage: python scripts/stopping_study.py [--suite posteriordb,models]
       [--settings 8x2,64x1] [--names a,b] [--out docs/benchmarks/stopping.json]

For each posterior and setting (``CxD``: C chains on D host devices; 8x2
uses per-chain adaptation, the default low-rank NUTS; 64x1 pooled NUTS,
``adapt="ensemble"``; 64x1-chees pooled ChEES with the low-rank metric), in
its own process:

- ``auto``: one run that decides its warmup and sampling length;
- ``grid``: the same sampler with fixed warmup W in 250/500/1000 and 2000
  draws; a fixed run of S draws is the first S draws of it (draws do not
  depend on the run's length), so every S in 250/500/1000/2000 is checked
  against the same targets on every coordinate (``stopping.assess``);
  ``smallest`` is the cheapest (W, S) that meets them;
- ``numpyro``: NumPyro's NUTS with its default 500 + 1000, same chains.

Gradients are leapfrog steps per chain, warmup included. ``z2`` is the mean
over reference parameters of ``((mean - ref) / (ref_sd / sqrt(ess)))**2``
with the auto run's own bulk ESS at its stop: about 1 when the reported ESS
is honest, well above 1 when a run stopped short of its target.

``--zcheck 1,2,3`` runs only the auto runs, with those seeds, and records
each reference parameter's error: ``--report`` then gives the mean of
``((mean - ref) / (ref_sd / sqrt(400)))**2``, which exceeds 1 (chi-square
p-value given) when runs stop short of ESS 400.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

WARMUPS = (250, 500, 1000)
DRAWS = (250, 500, 1000, 2000)
TARGETS = {"target_ess": 400, "max_rhat": 1.01}
SETTINGS = {
    "8x2": {},
    "64x1": {"adapt": "ensemble"},
    "64x1-chees": {"kernel": "chees", "metric": "lowrank"},
}


def _options(target: dict, setting: dict) -> dict:
    """A posterior's own options under a setting that picks its metric."""
    if "metric" in setting:
        target = {k: v for k, v in target.items() if k != "dense_mass"}
    return {**target, **setting}


def _one(job: dict) -> dict:
    import numpy as np

    import chainmesh as cm
    from chainmesh import stopping
    from chainmesh.bench.suite_worker import _numpyro
    from chainmesh.bench.targets import load_target

    target = load_target(job["suite"], job["name"])
    chains = int(job["setting"].split("x")[0])  # "CxD" or "CxD-kernel"
    own = _options(target.options, SETTINGS[job["setting"]])
    base = {"num_chains": chains, "progress_bar": False, **own}
    out: dict = {"name": job["name"], "setting": job["setting"]}

    auto = cm.Sampler(target.model, num_warmup="auto", **TARGETS, **base)
    r = auto.run(job["seed"], *target.args)
    stop = r.stats["stop"]
    grads = (r.stats["leapfrog_steps_warmup"] + r.stats["leapfrog_steps"]) / chains
    named = target.named(r.samples)
    z2 = []
    for name, (mean, sd) in target.reference.items():
        x = np.asarray(named[name], np.float64)
        ess = cm.diagnostics.ess_bulk(x)
        z2.append(((x.mean() - mean) / (sd / np.sqrt(ess))) ** 2)
    out["auto"] = {
        "warmup": stop["warmup"],
        "samples": stop["samples"],
        "reason": stop["reason"],
        "warmup_reason": stop["warmup_reason"],
        "gradients": grads,
        "min_ess_bulk": stop.get("min_ess_bulk"),
        "min_ess_tail": stop.get("min_ess_tail"),
        "max_rhat": stop.get("max_rhat"),
        "z2": float(np.mean(z2)) if z2 else None,
        "z2_max": float(np.max(z2)) if z2 else None,
        "references": len(z2),
        "seconds": r.stats["warmup_s"] + r.stats["sampling_s"],
    }
    grid = []
    targets = stopping.Targets(400, 1.01, None)
    for w in WARMUPS:
        fixed = cm.Sampler(target.model, num_warmup=w, num_samples=max(DRAWS), **base)
        g = fixed.run(job["seed"], *target.args)
        warm = g.stats["leapfrog_steps_warmup"] / chains
        steps = np.asarray(g.extra["num_steps"], np.float64)
        for s in DRAWS:
            x, labels = stopping.coordinates(g.samples, 1, s)
            row = stopping.assess(x, labels, targets)[0]
            grid.append(
                {
                    "warmup": w,
                    "samples": s,
                    "met": row["met"],
                    "gradients": warm + steps[:, :s].sum() / chains,
                    "min_ess": min(
                        row.get("min_ess_bulk", 0), row.get("min_ess_tail", 0)
                    ),
                    "max_rhat": row.get("max_rhat"),
                }
            )
    out["grid"] = grid
    met = [g for g in grid if g["met"]]
    out["smallest"] = min(met, key=lambda g: g["gradients"]) if met else None
    numpyro_job = {"warmup": 500, "samples": 1000, "chains": chains}
    _, warm_steps, steps, _, _ = _numpyro(numpyro_job, target)(job["seed"])
    out["numpyro"] = {"gradients": (warm_steps + steps) / chains}
    return out


def _zcheck(job: dict) -> dict:
    """Auto runs with several seeds: each reference parameter's error."""
    import numpy as np

    import chainmesh as cm
    from chainmesh.bench.targets import load_target

    target = load_target(job["suite"], job["name"])
    chains = int(job["setting"].split("x")[0])
    own = _options(target.options, SETTINGS[job["setting"]])
    sampler = cm.Sampler(
        target.model, num_chains=chains, num_warmup="auto", progress_bar=False,
        **TARGETS, **own,
    )  # fmt: skip
    rows = []
    for seed in job["seeds"]:
        r = sampler.run(seed, *target.args)
        named = target.named(r.samples)
        for name, (mean, sd) in target.reference.items():
            x = np.asarray(named[name], np.float64)
            error = (x.mean() - mean) / sd
            ess = float(cm.diagnostics.ess_bulk(x))
            rows.append({"seed": seed, "name": name, "error": error, "ess": ess})
    return {"name": job["name"], "setting": job["setting"], "rows": rows}


def zreport(records: list[dict]) -> str:
    """Did runs stop short? Squared errors in units of the target's standard
    error (``sd / sqrt(400)``) and of the run's own ESS."""
    import numpy as np
    from scipy import stats

    lines = [
        "| posterior | setting | runs x parameters | mean z^2 at ESS 400 "
        "| p (ESS < 400) | mean z^2 at the reported ESS |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r["rows"]):
        e = np.array([x["error"] for x in r["rows"]])
        ess = np.array([x["ess"] for x in r["rows"]])
        at_target = (e * np.sqrt(TARGETS["target_ess"])) ** 2
        own = e**2 * ess
        n = len(e)
        p = stats.chi2.sf(at_target.sum(), n)
        lines.append(
            f"| {r['name']} | {r['setting']} | {n} | {at_target.mean():.2f} | "
            f"{p:.3f} | {own.mean():.2f} |"
        )
    return "\n".join(lines)


def report(records: list[dict]) -> str:
    """A Markdown table and the medians of ``records``."""
    import numpy as np

    lines = [
        "| posterior | setting | auto warmup + draws | stopped on | auto grads "
        "| smallest fixed (W + S) grads | NumPyro 500 + 1000 grads | auto / NumPyro "
        "| auto / smallest | z2 (refs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list] = {}
    for r in records:
        a, small, nump = r["auto"], r["smallest"], r["numpyro"]["gradients"]
        vs_small = a["gradients"] / small["gradients"] if small else None
        fixed = (
            f"{small['warmup']} + {small['samples']}: {small['gradients']:.0f}"
            if small
            else "none meets"
        )
        z2 = f"{a['z2']:.2f} ({a['references']})" if a["z2"] is not None else "-"
        stopped = f"{a['warmup_reason']}, {a['reason']}"
        shown = f"{vs_small:.2f}" if vs_small is not None else "-"
        lines.append(
            f"| {r['name']} | {r['setting']} | {a['warmup']} + {a['samples']} | "
            f"{stopped} | {a['gradients']:.0f} | {fixed} | {nump:.0f} | "
            f"{a['gradients'] / nump:.2f} | {shown} | {z2} |"
        )
        ratios.setdefault(r["setting"], []).append(
            (a["gradients"] / nump, vs_small, a["warmup"], a["reason"] == "targets")
        )
    lines.append("")
    for setting, rows in ratios.items():
        nump = np.median([x[0] for x in rows])
        small = np.median([x[1] for x in rows if x[1] is not None])
        warm = np.median([x[2] for x in rows])
        met = sum(x[3] for x in rows)
        lines.append(
            f"- {setting}: median auto / NumPyro default gradients {nump:.2f}, "
            f"auto / smallest fixed {small:.2f}, median warmup {warm:.0f}, "
            f"targets met {met} of {len(rows)}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="posteriordb,models")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--names", default=None, help="only these posteriors")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="docs/benchmarks/stopping.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="print the table of --out")
    p.add_argument(
        "--zcheck", default=None, help="seeds, e.g. 1,2,3: errors against references"
    )
    a = p.parse_args()
    if a.report:
        records = json.loads(Path(a.out).read_text())
        zcheck = "rows" in records[0]
        print(zreport(records) if zcheck else report(records))
        return
    if a.one is not None:
        job = json.loads(a.one)
        run = _zcheck if "seeds" in job else _one
        print("RESULT " + json.dumps(run(job)), flush=True)
        return
    from chainmesh.bench.targets import suite_names

    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else []
    seen = {(r["name"], r["setting"]) for r in done}
    for suite in a.suite.split(","):
        names = suite_names(suite)
        if suite == "models":
            # With references (what --zcheck needs): correlated100 only.
            kept = ("correlated100",) if a.zcheck else ("eight_schools", "logistic")
            names = [n for n in names if n in (*kept, "correlated100")]
        for name in names:
            if a.names and name not in a.names.split(","):
                continue
            for setting in a.settings.split(","):
                if (name, setting) in seen:
                    continue
                devices = setting.split("x")[1].split("-")[0]
                env = {
                    **os.environ,
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                }
                job = {"suite": suite, "name": name, "setting": setting, "seed": a.seed}
                if a.zcheck:
                    job["seeds"] = [int(x) for x in a.zcheck.split(",")]
                run = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(job)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
                if not lines:
                    print(f"{name} {setting}: failed\n{run.stderr[-2000:]}", flush=True)
                    continue
                record = json.loads(lines[-1][len("RESULT ") :])
                done.append(record)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(done, indent=1))
                if a.zcheck:
                    print(zreport([record]).splitlines()[-1], flush=True)
                    continue
                auto, small = record["auto"], record["smallest"]
                print(
                    f"{name:28s} {setting:5s} auto {auto['warmup']}+{auto['samples']} "
                    f"{auto['gradients']:.0f} grads ({auto['reason']}, "
                    f"{auto['warmup_reason']}), smallest fixed "
                    f"{small and (small['warmup'], small['samples'])}, "
                    f"numpyro {record['numpyro']['gradients']:.0f}, z2 {auto['z2']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
