"""``chainmesh bench --suite``: every configuration and peer on every posterior.

Each (posterior, sampler) run is its own process (``suite_worker``) with the
same chains, warmup, draws and seed; the parent scores it against the
posterior's reference and writes ``suite.json`` (one record per run),
``suite.md`` and ``suite.png`` (``suite_report``). Samplers: NumPyro NUTS
(``vectorized``, the baseline of every ratio), ``chainmesh:<configuration>``
for the harness's configurations, BlackJAX window-adapted NUTS, ChEES and
MAMS, and nutpie on the same NumPyro potential. A peer whose package is missing is
skipped with a line saying so.

Example:
    chainmesh bench --suite posteriordb --quick --out suite-quick
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from chainmesh.bench.host import _version, environment
from chainmesh.bench.runner import run_worker, worker_env
from chainmesh.bench.suite_worker import CHAINMESH
from chainmesh.bench.targets import (
    CONFIGS,
    DEFAULT_CONFIGS,
    PEERS,
    SUITES,
    suite_names,
)

Z_MAX = 4.0
"""A mean further than this many (MCSE + ``MEAN_FLOOR`` ref sd) fails."""
MEAN_FLOOR = 0.02
"""Share of the reference sd added to the MCSE: the reference's own error."""
RHAT_MAX = 1.01
SD_RTOL = 0.15
"""An sd off the reference sd by more than this share fails."""

QUICK = {"warmup": 300, "samples": 500, "chains": 8, "devices": 2}
FULL = {"warmup": 500, "samples": 1000, "chains": 8, "devices": 2}

PEER_PACKAGES = {
    "blackjax:nuts": ("blackjax", "optax"),
    "blackjax:chees": ("blackjax", "optax"),
    "nutpie": ("nutpie",),
    "nutpie:lowrank": ("nutpie",),
}
"""Packages each peer needs (the ``bench`` extra); NumPyro is always there."""


def missing_peer(sampler: str) -> str | None:
    """Why ``sampler`` cannot run here (a package is missing), or None."""
    absent = [
        p for p in PEER_PACKAGES.get(sampler, ()) if importlib.util.find_spec(p) is None
    ]
    if not absent:
        return None
    return (
        f"{', '.join(absent)} not installed (pip install 'chainmesh[bench]' installs "
        "every peer)"
    )


def verdict(summary: dict[str, dict]) -> dict:
    """Correctness of one run from its per-parameter summary.

    ``worst_z`` is the largest ``|mean - ref mean| / (ref sd / sqrt(bulk ESS)
    + MEAN_FLOOR * ref sd)``; ``worst_sd_ratio`` the sd / ref sd farthest from
    1; both None without a reference. A run fails on z > ``Z_MAX``, R-hat >
    ``RHAT_MAX`` or an sd off by more than ``SD_RTOL``; an undefined number
    (NaN: stuck chains) fails too.
    """
    rhat = {k: r["r_hat"] for k, r in summary.items()}
    zs, ratios = {}, {}
    for name, r in summary.items():
        if r["ref_mean"] is None:
            continue
        ess, ref_sd = r["ess_bulk"], r["ref_sd"]
        mcse = ref_sd / math.sqrt(ess) if ess is not None and ess > 0 else math.nan
        zs[name] = abs(r["mean"] - r["ref_mean"]) / (mcse + MEAN_FLOOR * ref_sd)
        ratios[name] = r["sd"] / ref_sd
    failures = []
    worst_rhat = _worst(rhat, lambda v: v)
    if worst_rhat and not worst_rhat[1] <= RHAT_MAX:
        failures.append(f"R-hat {worst_rhat[1]:.3f} ({worst_rhat[0]})")
    worst_z = _worst(zs, lambda v: v)
    if worst_z and not worst_z[1] <= Z_MAX:
        failures.append(f"z {worst_z[1]:.1f} ({worst_z[0]})")
    worst_sd = _worst(ratios, lambda v: abs(v - 1))
    if worst_sd and not abs(worst_sd[1] - 1) <= SD_RTOL:
        failures.append(f"sd ratio {worst_sd[1]:.2f} ({worst_sd[0]})")
    return {
        "max_rhat": worst_rhat[1] if worst_rhat else None,
        "worst_z": worst_z[1] if worst_z else None,
        "worst_sd_ratio": worst_sd[1] if worst_sd else None,
        "failures": failures,
        "passed": not failures,
    }


def _worst(values: dict[str, float | None], badness) -> tuple[str, float] | None:
    """The (name, value) of the worst value; NaN or None counts as worst."""
    if not values:
        return None

    def key(item: tuple[str, float | None]) -> float:
        v = item[1]
        return math.inf if v is None or not math.isfinite(v) else badness(v)

    name, value = max(values.items(), key=key)
    return name, (math.nan if value is None else value)


def _min(summary: dict[str, dict], key: str) -> float:
    """The smallest ``key`` over parameters; NaN if any is undefined (a stuck
    chain has no ESS: leaving it out would overstate the minimum)."""
    values = [math.nan if r[key] is None else r[key] for r in summary.values()]
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def score(job: dict, out: dict, versions: dict, command: str) -> dict:
    """The record of one run: its job, numbers, verdict, versions, command."""
    record = {
        "posterior": job["posterior"],
        "sampler": job["sampler"],
        "chains": job["chains"],
        "devices": job["devices"],
        "warmup": job["warmup"],
        "samples": job["samples"],
        "seed": job["seed"],
        "status": out["status"],
    }
    if out["status"] != "ok":
        reason = out.get("reason", "")
        return (
            record
            | {"passed": False, "failures": [reason], "reason": reason}
            | {
                "versions": versions,
                "command": command,
            }
        )
    m = out["metrics"]
    ess_bulk, ess_tail = _min(m["summary"], "ess_bulk"), _min(m["summary"], "ess_tail")
    grads = m["gradients_sampling"]
    total = grads + m["gradients_warmup"]
    record |= {
        "ess_bulk_min": ess_bulk,
        "ess_tail_min": ess_tail,
        "gradients_warmup": m["gradients_warmup"],
        "gradients_sampling": grads,
        "ess_per_1000_gradients": 1000 * ess_bulk / grads if grads else math.nan,
        "ess_per_1000_gradients_total": 1000 * ess_bulk / total if total else math.nan,
        "wall_s": m["wall_s"],
        "ess_per_s": ess_bulk / m["wall_s"] if m["wall_s"] > 0 else math.nan,
        "divergences": m["divergences"],
    }
    record |= verdict(m["summary"])
    keep = ("wall_note", "warm_wall_s", "warm_compile_s", "compilations_warm")
    keep += ("cold_wall_s", "compile_s", "plan", "peak_rss_mb", "summary")
    record |= {k: m[k] for k in keep}
    return record | {"versions": versions, "command": command}


def plan_runs(options: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The samplers to run and the skip lines of those that cannot run."""
    samplers, skipped = [], []
    for peer in options.peers:
        reason = missing_peer(peer)
        if reason:
            skipped.append(f"skipped {peer}: {reason}")
        elif peer == "numpyro":
            samplers.append(peer)
    samplers += [CHAINMESH + c for c in options.configs]
    samplers += [p for p in options.peers if p != "numpyro" and not missing_peer(p)]
    return samplers, skipped


def run_suite(options: argparse.Namespace, command: str) -> tuple[list, list]:
    """Run every (posterior, sampler) of ``options``; records and skip lines."""
    samplers, skipped = plan_runs(options)
    for line in skipped:
        print(line, flush=True)
    env = environment()
    versions = {k: env[k] for k in ("python", "jax", "jaxlib", "numpyro", "chainmesh")}
    versions |= {p: _version(p) for p in ("blackjax", "optax", "nutpie")}
    versions |= {"cpu": env["cpu"], "cores": env["cores"], "dtype": env["dtype"]}
    records, runs = [], [(p, s) for p in options.posteriors for s in samplers]
    for i, (posterior, sampler) in enumerate(runs, 1):
        job = {"suite": options.suite, "posterior": posterior, "sampler": sampler}
        job |= {k: getattr(options, k) for k in ("chains", "devices", "seed")}
        job |= {k: getattr(options, k) for k in ("warmup", "samples")}
        t0 = time.perf_counter()
        out = run_worker(
            job, worker_env(options.devices, False), options.timeout, "suite_worker"
        )
        record = score(job, out, versions, command)
        record["process_s"] = time.perf_counter() - t0
        records.append(record)
        print(_progress(i, len(runs), record), flush=True)
    return records, skipped


def _progress(i: int, n: int, r: dict) -> str:
    head = f"[{i:>3}/{n}] {r['posterior']:<36} {r['sampler']:<27}"
    tail = f"({r['process_s']:.0f} s)"
    if r["status"] != "ok":
        return f"{head} error: {r['reason']} {tail}"
    verdict = "pass" if r["passed"] else "FAIL " + "; ".join(r["failures"])
    return (
        f"{head} ESS/1000 grad {r['ess_per_1000_gradients']:7.2f}  min ESS "
        f"{r['ess_bulk_min']:6.0f}  wall {r['wall_s']:6.2f} s  {verdict} {tail}"
    )


def _names(choices: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if text.strip() == "none" and what == "peer":
            return []
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {unknown}; choose from {', '.join(choices)}"
            )
        return [c for c in choices if c in names]

    return parse


def parser() -> argparse.ArgumentParser:
    """The options of ``chainmesh bench --suite``."""
    p = argparse.ArgumentParser(
        prog="chainmesh bench --suite",
        description="Score every chainmesh configuration and every peer on every "
        "posterior of a suite: ESS per gradient, ESS/s and correctness against "
        "the reference; write suite.json, suite.md and suite.png into --out.",
    )
    p.add_argument(
        "--suite",
        choices=SUITES,
        required=True,
        help="posteriordb: the ten reference posteriors; models: the bench models",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"configurations {','.join(DEFAULT_CONFIGS)}; "
        f"{QUICK['chains']} chains on {QUICK['devices']} devices, "
        f"{QUICK['warmup']} + {QUICK['samples']}",
    )
    p.add_argument("--posteriors", metavar="NAMES", help="comma-separated (all)")
    p.add_argument(
        "--configs",
        type=_names(list(CONFIGS), "configuration"),
        help=f"comma-separated subset of {','.join(CONFIGS)} (all; --quick: "
        f"{','.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument(
        "--peers",
        type=_names(PEERS, "peer"),
        default=list(PEERS),
        help=f"comma-separated subset of {','.join(PEERS)}, or none (all)",
    )
    for name, what in (("chains", "chains"), ("devices", "host CPU devices")):
        p.add_argument(
            f"--{name}", type=int, help=f"{what} ({FULL[name]}; --quick {QUICK[name]})"
        )
    p.add_argument("--warmup", type=int, help=f"warmup per chain ({FULL['warmup']})")
    p.add_argument("--samples", type=int, help=f"draws per chain ({FULL['samples']})")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    p.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds per run (1200)"
    )
    p.add_argument("--out", type=Path, default=Path("bench-suite"), help="folder")
    return p


def resolve(options: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults ``--quick`` changes; reject bad values (SystemExit)."""
    sizes = QUICK if options.quick else FULL
    for name, value in sizes.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
        if getattr(options, name) < 1:
            raise SystemExit(f"chainmesh bench --suite: --{name} must be >= 1")
    if options.configs is None:
        options.configs = list(DEFAULT_CONFIGS if options.quick else CONFIGS)
    names = suite_names(options.suite)
    if options.posteriors is None:
        options.posteriors = names
    else:
        options.posteriors = _names(names, "posterior")(options.posteriors)
    return options


def main(argv: Sequence[str]) -> int:
    """``chainmesh bench --suite ...`` (``argv`` without ``bench``)."""
    p = parser()
    try:
        options = resolve(p.parse_args(list(argv)))
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    from chainmesh.bench.suite_report import write_suite

    command = "chainmesh bench " + shlex.join(argv)
    records, skipped = run_suite(options, command)
    for path in write_suite(records, skipped, options, options.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
