"""Report of ``chainmesh bench --suite``: ``suite.json``, ``suite.md``, ``suite.png``.

Every ratio is ESS per gradient (sampling phase) over NumPyro NUTS's on the
same posterior. A run that fails correctness is shown as failing wherever it
appears and is left out of every median and worst ratio.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from chainmesh.bench.suite import MEAN_FLOOR, RHAT_MAX, SD_RTOL, Z_MAX
from chainmesh.bench.worker import _finite

BASELINE = "numpyro"

NOTES = f"""\
Columns. *ESS/1000 grad*: min bulk ESS over every scalar parameter per 1000
gradient evaluations (leapfrog steps) of the sampling phase, summed over
chains; *total*: per 1000 gradients of warmup and sampling; *vs NumPyro*: ESS
per gradient over NumPyro NUTS's on the same posterior; *wall s*: the warm
call (warmup and sampling, a second call in the same process) with the
compilation inside it subtracted: NumPyro compiles on every call, chainmesh
and BlackJAX reuse their programs; nutpie's wall time is that of a
Python-callback gradient (`nutpie.compiled_pyfunc.from_pyfunc` on the NumPyro
potential: one host round trip per gradient), not of nutpie on a compiled
model; *ESS/s*: min bulk ESS / wall s; *worst z*: largest |mean - reference
mean| / (reference sd / sqrt(bulk ESS) + {MEAN_FLOOR} reference sd); *worst sd
ratio*: sd / reference sd farthest from 1. A run fails on z > {Z_MAX:g}, R-hat >
{RHAT_MAX}, an sd off by more than {SD_RTOL:.0%}, or an error; a failing run
is marked FAIL and left out of the medians and worst ratios. Targets without a
reference are judged by R-hat alone. Every run is its own process; peers
sample the same NumPyro potential with the same chains, draws and seed.
chainmesh spreads the chains over the devices; NumPyro (`vectorized`) and
BlackJAX vectorize them on the default device; nutpie runs them on as many
threads as there are devices."""


def with_ratios(records: list[dict]) -> list[dict]:
    """Add ``ess_per_gradient_vs_numpyro`` to every record that has a number
    and a NumPyro record of its posterior with one (in place)."""
    base = {
        r["posterior"]: r.get("ess_per_1000_gradients")
        for r in records
        if r["sampler"] == BASELINE
    }
    for r in records:
        mine, theirs = r.get("ess_per_1000_gradients"), base.get(r["posterior"])
        ok = all(v is not None and math.isfinite(v) for v in (mine, theirs))
        r["ess_per_gradient_vs_numpyro"] = mine / theirs if ok and theirs else None
    return records


def summary_rows(records: list[dict]) -> dict[str, dict]:
    """Per sampler: median and worst ratio over the posteriors where it and
    NumPyro pass, how many those are, and how many posteriors it fails."""
    passed = {
        r["posterior"] for r in records if r["sampler"] == BASELINE and r["passed"]
    }
    out = {}
    for sampler in _samplers(records):
        mine = [r for r in records if r["sampler"] == sampler]
        ratios = [
            r["ess_per_gradient_vs_numpyro"]
            for r in mine
            if r["passed"] and r["posterior"] in passed
        ]
        ratios = [x for x in ratios if x is not None]
        out[sampler] = {
            "median": float(np.median(ratios)) if ratios else None,
            "worst": min(ratios) if ratios else None,
            "compared": len(ratios),
            "failing": sum(not r["passed"] for r in mine),
            "runs": len(mine),
        }
    return out


def _samplers(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["sampler"] for r in records))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _cell(r: dict | None) -> str:
    """A ratio cell: the ratio, FAIL marked; NumPyro's own ESS/1000 grad."""
    if r is None:
        return "—"
    if r["status"] != "ok":
        return "FAIL (error)"
    key = "ess_per_1000_gradients" if r["sampler"] == BASELINE else None
    value = r[key] if key else r["ess_per_gradient_vs_numpyro"]
    text = _fmt(value, 3)
    return text if r["passed"] else f"FAIL {text}"


def _run_row(r: dict) -> str:
    head = f"| {r['posterior']} | {r['sampler']} |"
    if r["status"] != "ok":
        return head + f" FAIL: {r['reason']} |" + " |" * 14
    verdict = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
    cells = [
        verdict,
        _fmt(r["ess_bulk_min"], 4),
        _fmt(r["ess_tail_min"], 4),
        _fmt(r["gradients_warmup"], 4),
        _fmt(r["gradients_sampling"], 4),
        _fmt(r["ess_per_1000_gradients"]),
        _fmt(r["ess_per_1000_gradients_total"]),
        _fmt(r["ess_per_gradient_vs_numpyro"]),
        _fmt(r["wall_s"]),
        _fmt(r["ess_per_s"]),
        _fmt(r["max_rhat"], 4),
        str(r["divergences"]),
        _fmt(r["worst_z"], 2),
        _fmt(r["worst_sd_ratio"], 3),
        _fmt(r["compile_s"]),
    ]
    return head + " " + " | ".join(cells) + " |"


def markdown(records: list[dict], skipped: list[str], options) -> str:
    """``suite.md``: the ratio matrix with summary rows, then every run."""
    samplers = _samplers(records)
    by = {(r["posterior"], r["sampler"]): r for r in records}
    posteriors = list(dict.fromkeys(r["posterior"] for r in records))
    v = records[0]["versions"] if records else {}
    lines = [
        f"# chainmesh bench --suite {options.suite}",
        "",
        f"`{records[0]['command']}`" if records else "",
        "",
        f"{v.get('cpu')}, {v.get('cores')} cores; jax {v.get('jax')}, numpyro "
        f"{v.get('numpyro')}, chainmesh {v.get('chainmesh')}, blackjax "
        f"{v.get('blackjax')}, nutpie {v.get('nutpie')}; {v.get('dtype')}; "
        f"{options.chains} chains, {options.devices} devices, {options.warmup} "
        f"warmup + {options.samples} draws per chain, seed {options.seed}.",
        "",
        *[f"- {line}" for line in skipped],
        "",
        "## ESS per gradient relative to NumPyro NUTS",
        "",
        "NumPyro's column: its own ESS per 1000 gradients. FAIL: the run failed "
        "correctness (the number is shown, never counted).",
        "",
        "| posterior | " + " | ".join(samplers) + " |",
        "|---|" + "---|" * len(samplers),
    ]
    lines += [
        f"| {p} | " + " | ".join(_cell(by.get((p, s))) for s in samplers) + " |"
        for p in posteriors
    ]
    rows = summary_rows(records)
    for label, key in (("median ratio", "median"), ("worst ratio", "worst")):
        cells = [
            "—" if s == BASELINE else f"{_fmt(rows[s][key])} ({rows[s]['compared']})"
            for s in samplers
        ]
        lines.append(f"| **{label}** (posteriors) | " + " | ".join(cells) + " |")
    failing = [f"{rows[s]['failing']} / {rows[s]['runs']}" for s in samplers]
    lines.append("| **failing posteriors** | " + " | ".join(failing) + " |")
    header = (
        "| posterior | sampler | verdict | min bulk ESS | min tail ESS | grad warmup "
        "| grad sampling | ESS/1000 grad | ESS/1000 grad total | vs NumPyro "
        "| wall s | ESS/s | max R-hat | div | worst z | worst sd ratio | compile s |"
    )
    lines += ["", "## Every run", "", header, "|" + "---|" * 17]
    lines += [_run_row(r) for r in records]
    return "\n".join([*lines, "", NOTES, ""])


def plot(records: list[dict], path: Path) -> Path | None:
    """``suite.png``: a row per posterior, ESS per gradient over NumPyro's on a
    log axis, a marker per sampler; failing runs as crosses. None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    posteriors = list(dict.fromkeys(r["posterior"] for r in records))
    samplers = [s for s in _samplers(records) if s != BASELINE]
    by = {(r["posterior"], r["sampler"]): r for r in records}
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.45 * len(posteriors)))
    colors = plt.get_cmap("tab20").colors
    shapes = "osD^v<>p*"  # 9 shapes, 20 colours: no pair repeats
    offsets = np.linspace(-0.3, 0.3, max(len(samplers), 1))
    for j, sampler in enumerate(samplers):
        color, shape = colors[j % len(colors)], shapes[j % len(shapes)]
        for i, p in enumerate(posteriors):
            r = by.get((p, sampler))
            if r is None or r.get("ess_per_gradient_vs_numpyro") is None:
                continue
            y = i + offsets[j]
            x = r["ess_per_gradient_vs_numpyro"]
            if r["passed"]:
                ax.plot(x, y, shape, color=color, label=sampler)
            else:
                ax.plot(x, y, "x", color=color, ms=9, mew=2, label=f"{sampler} FAIL")
    ax.axvline(1.0, color="k", lw=1, ls="--", label="NumPyro NUTS")
    ax.set_xscale("log")
    failed = {p for (p, s), r in by.items() if s == BASELINE and not r["passed"]}
    labels = [f"{p} (NumPyro FAIL)" if p in failed else p for p in posteriors]
    ax.set_yticks(range(len(posteriors)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("min bulk ESS per gradient / NumPyro NUTS's (log; x: failed)")
    ax.grid(alpha=0.3, which="both", axis="x")
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    ax.legend(
        handles.values(),
        handles.keys(),
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_suite(
    records: list[dict], skipped: list[str], options: argparse.Namespace, out: Path
) -> list[Path]:
    """Write ``suite.json`` (the records), ``suite.md`` and ``suite.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with_ratios(records)
    paths = [out / "suite.json", out / "suite.md"]
    paths[0].write_text(json.dumps(_finite(records), indent=1) + "\n")
    paths[1].write_text(markdown(records, skipped, options))
    png = plot(records, out / "suite.png")
    return [*paths, png] if png else paths
