"""Report of a ``chainmesh bench`` run: ratios, ``results.md`` and ``scaling.png``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from chainmesh.bench.worker import NUMPYRO_METHODS

LABELS = {
    "chainmesh": "chainmesh (vmap)",
    "chainmesh_map": "chainmesh (lax.map)",
    "chainmesh_1pd": "chainmesh (1 chain/device)",
    "numpyro_vectorized": "NumPyro vectorized",
    "numpyro_parallel": "NumPyro parallel",
    "numpyro_sequential": "NumPyro sequential",
    "device_loop": "device loop (NumPyro)",
    "chainmesh_chees": "chainmesh ChEES",
    "chainmesh_ensemble": "chainmesh NUTS, ensemble adapt",
    "blackjax_chees": "BlackJAX ChEES (1 device)",
    "chainmesh_async": "chainmesh NUTS async",
    "chainmesh_async16": "chainmesh NUTS async, 16 lanes",
}

COLUMNS = """\
Columns. *cold*: first call, compilation included, in a first-ever process
(chainmesh starts from an empty disk cache); *2nd process cold*: the same cold
call in a later process that finds chainmesh's disk cache filled by the first
(chainmesh only; NumPyro compiles again in every process); *compile*: tracing, lowering
and XLA compilation seconds in the cold call (`jax.monitoring`); *compiles*:
XLA compilations in the cold / warm call; *warm*: a call on new data of the
same shapes; *vs NP*: best NumPyro warm time / this
warm time (> 1: faster than NumPyro's fastest `chain_method`); *grad/s*: useful
leapfrog steps (gradient evaluations) per second of the sampling phase;
*% raw*: grad/s over the raw batched-gradient rate of the model on the same
devices and chains; *leapfrog*: sampling-phase steps of the warm call, useful /
executed (a vectorized block executes `chains x max(steps)` per draw);
*lockstep*: useful / executed; *min ESS*: smallest bulk ESS over all scalar
parameters; *ESS/s*: min ESS / warm wall time; *ESS/s vs NP*: over NumPyro's
best ESS/s; *div*: divergences; *r̂*: largest rank-normalized split r-hat;
*RSS*: peak resident memory of the measuring process through its cold and
warm calls. NumPyro exposes leapfrog
counts of the sampling phase only, so every count here is sampling phase.
NumPyro compiles on every `MCMC.run`, so its sampling-phase time comes from a
re-run from the adapted state (`post_warmup_state`), one program at a time,
minus the compile time `jax.monitoring` reports. A timed sampling phase
shorter than 0.2 s (either library) is timed again with more draws. With
`--repeats R` every measurement runs in R fresh processes, round-robin, and
each number is the median over the rounds."""


def _ok(records: Iterable[dict], **where) -> list[dict]:
    return [
        r
        for r in records
        if r["status"] == "ok" and all(r[k] == v for k, v in where.items())
    ]


def derive(results: dict) -> dict:
    """Add ratios to NumPyro's best method and to the raw gradient rate.

    Each successful run gets ``derived``: ``raw_fraction`` (grad/s over the raw
    rate), ``warm_speedup_vs_numpyro`` and ``ess_per_s_vs_numpyro`` with the
    NumPyro methods they compare to. Returns ``results``, changed in place.
    """
    for run in _ok(results["runs"]):
        setting = {"devices": run["devices"], "chains": run["chains"]}
        m, derived = run["metrics"], {}
        raw = _ok(results["raw_gradient"], **setting)
        if raw:
            rate = raw[0]["metrics"]["raw_gradients_per_s"]
            derived["raw_fraction"] = m["gradients_per_s"] / rate
        numpyro = [
            r for r in _ok(results["runs"], **setting) if r["method"] in NUMPYRO_METHODS
        ]
        if numpyro:
            fast = min(numpyro, key=lambda r: r["metrics"]["warm_wall_s"])
            derived["numpyro_best_warm"] = fast["method"]
            derived["warm_speedup_vs_numpyro"] = (
                fast["metrics"]["warm_wall_s"] / m["warm_wall_s"]
            )
            ess = [r for r in numpyro if r["metrics"]["ess_per_s"]]
            if ess and m["ess_per_s"]:
                best = max(ess, key=lambda r: r["metrics"]["ess_per_s"])
                derived["numpyro_best_ess_per_s"] = best["method"]
                derived["ess_per_s_vs_numpyro"] = (
                    m["ess_per_s"] / best["metrics"]["ess_per_s"]
                )
        run["derived"] = derived
    return results


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:.3g}" if abs(x) >= 1e6 else f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _row(run: dict) -> str:
    head = f"| {run['devices']} | {run['chains']} | {LABELS[run['method']]} |"
    if run["status"] != "ok":
        return head + f" {run['status']}: {run.get('reason', '')} |" + " |" * 15
    m, d = run["metrics"], run.get("derived", {})
    cells = [
        _fmt(m["cold_wall_s"]),
        _fmt(m.get("cold2_wall_s")),
        _fmt(m["compile_s"]),
        f"{_fmt(m['compilations_cold'])} / {_fmt(m['compilations_warm'])}",
        _fmt(m["warm_wall_s"]),
        _fmt(d.get("warm_speedup_vs_numpyro"), 2),
        _fmt(m["gradients_per_s"]),
        _fmt(100 * d["raw_fraction"], 2) if "raw_fraction" in d else "—",
        f"{_fmt(m['leapfrog_useful'])} / {_fmt(m['leapfrog_executed'])}",
        _fmt(m["lockstep_efficiency"], 2),
        _fmt(m["min_ess_bulk"]),
        _fmt(m["ess_per_s"]),
        _fmt(d.get("ess_per_s_vs_numpyro"), 2),
        _fmt(m["divergences"]),
        _fmt(m["max_r_hat"], 3),
        _fmt(m["peak_rss_mb"]),
    ]
    return head + " " + " | ".join(cells) + " |"


def headlines(results: dict) -> list[str]:
    """Short sentences with the ratios a README quotes."""
    lines = []
    devices = sorted(results["config"]["devices"])
    for chains in results["config"]["chains"]:
        for d in devices:
            for run in _ok(
                results["runs"], devices=d, chains=chains, method="chainmesh"
            ):
                der = run["derived"]
                if "warm_speedup_vs_numpyro" in der:
                    lines.append(
                        f"{d} device(s), {chains} chains: chainmesh warm call "
                        f"{der['warm_speedup_vs_numpyro']:.1f}x faster than "
                        f"{LABELS[der['numpyro_best_warm']]}; min ESS/s "
                        f"{der.get('ess_per_s_vs_numpyro', math.nan):.1f}x; sampler "
                        f"at {100 * der.get('raw_fraction', math.nan):.0f}% of the "
                        "raw gradient rate."
                    )
                lines.extend(_cold_lines(results, d, chains, run["metrics"]))
        lo = _ok(results["runs"], devices=devices[0], chains=chains, method="chainmesh")
        hi = _ok(
            results["runs"], devices=devices[-1], chains=chains, method="chainmesh"
        )
        if lo and hi and len(devices) > 1:
            a, b = lo[0]["metrics"], hi[0]["metrics"]
            lines.append(
                f"{chains} chains, {devices[0]} -> {devices[-1]} devices: chainmesh "
                f"grad/s x{b['gradients_per_s'] / a['gradients_per_s']:.2f}, warm "
                f"call x{a['warm_wall_s'] / b['warm_wall_s']:.2f} faster."
            )
    return lines


def _cold_lines(results: dict, devices: int, chains: int, m: dict) -> list[str]:
    """chainmesh's cold calls (first-ever and later process) against NumPyro's."""
    peers = [
        r
        for r in _ok(results["runs"], devices=devices, chains=chains)
        if r["method"] in NUMPYRO_METHODS
    ]
    if not peers or m.get("cold2_wall_s") is None:
        return []
    best = min(peers, key=lambda r: r["metrics"]["cold_wall_s"])
    cold = best["metrics"]["cold_wall_s"]
    return [
        f"{devices} device(s), {chains} chains: chainmesh cold call "
        f"{m['cold_wall_s'] / cold:.2f}x the fastest NumPyro cold call "
        f"({LABELS[best['method']]}) in a first-ever process, "
        f"{m['cold2_wall_s'] / cold:.2f}x in a later process (disk cache)."
    ]


def _load(results: dict) -> str:
    """The 1-minute load average range over the measurements."""
    loads = [
        one["load_average_before"]
        for r in results["runs"] + results["raw_gradient"]
        for one in r.get("rounds", [])
    ]
    if not loads:
        return ""
    text = (
        f"1-minute load average before each measurement: {min(loads):.2f} to "
        f"{max(loads):.2f} (the benchmark's own previous process included)."
    )
    max_busy = results["config"].get("max_busy")
    if max_busy is not None:
        waited = sum(
            one.get("waited_s", 0.0)
            for r in results["runs"] + results["raw_gradient"]
            for one in r.get("rounds", [])
        )
        text += (
            f" Each measurement started once at most {max_busy:g} other tasks "
            f"were runnable ({waited / 60:.0f} min of waiting in all)."
        )
    return text


def markdown(results: dict) -> str:
    """``results.md``: setup, headline ratios, the full table, raw rates."""
    env, cfg = results["environment"], results["config"]
    header = (
        "| dev | chains | method | cold s | 2nd process cold s | compile s "
        "| compiles | warm s | vs NP "
        "| grad/s | % raw | leapfrog useful / executed | lockstep | min ESS | ESS/s "
        "| ESS/s vs NP | div | r̂ | RSS MB |"
    )
    lines = [
        f"# chainmesh bench: {cfg['model']}",
        "",
        f"`{results['command']}`",
        "",
        f"{env['cpu']}, {env['cores']} cores; jax {env['jax']}, jaxlib "
        f"{env['jaxlib']}, numpyro {env['numpyro']}, chainmesh {env['chainmesh']}; "
        f"{env['dtype']}; {cfg['warmup']} warmup + {cfg['samples']} draws per chain, "
        f"seed {cfg['seed']}; median of {cfg['repeats']} round(s). {_load(results)}",
        "",
        "## Headline",
        "",
        *[f"- {line}" for line in headlines(results)],
        "",
        "## Results",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *[_row(r) for r in results["runs"]],
        "",
        COLUMNS,
        "",
        "## Raw gradient rate",
        "",
        "`vmap(value_and_grad(potential))` in a `fori_loop` under `shard_map`, "
        "chains split like chainmesh's plan.",
        "",
        "| dev | chains | gradient evals/s | plan |",
        "|---|---|---|---|",
    ]
    for raw in results["raw_gradient"]:
        rate = raw["metrics"]["raw_gradients_per_s"] if raw["status"] == "ok" else None
        plan = raw["metrics"]["plan"] if raw["status"] == "ok" else raw.get("reason")
        lines.append(f"| {raw['devices']} | {raw['chains']} | {_fmt(rate)} | {plan} |")
    records = results["runs"] + results["raw_gradient"]
    flags = sorted({r["xla_flags"] for r in records if "xla_flags" in r})
    lines += ["", "XLA_FLAGS per setting: " + "; ".join(f"`{f}`" for f in flags), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """``scaling.png``: grad/s and min ESS/s against devices, a line per method.

    Returns None (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    chains_list, devices = (
        results["config"]["chains"],
        sorted(results["config"]["devices"]),
    )
    fig, axes = plt.subplots(
        len(chains_list), 2, figsize=(11, 3.8 * len(chains_list)), squeeze=False
    )
    palette = plt.get_cmap("tab20").colors  # one colour per method, 20 of them
    colors = dict(zip(LABELS, palette, strict=False))
    for row, chains in zip(axes, chains_list, strict=True):
        for method, label in LABELS.items():
            runs = sorted(
                _ok(results["runs"], chains=chains, method=method),
                key=lambda r: r["devices"],
            )
            if not runs:
                continue
            x = [r["devices"] for r in runs]
            for ax, key in zip(row, ("gradients_per_s", "ess_per_s"), strict=True):
                y = [r["metrics"][key] for r in runs]
                ax.plot(x, y, "o-", color=colors[method], label=label)
        raw = sorted(
            _ok(results["raw_gradient"], chains=chains), key=lambda r: r["devices"]
        )
        if raw:
            row[0].plot(
                [r["devices"] for r in raw],
                [r["metrics"]["raw_gradients_per_s"] for r in raw],
                "k--",
                label="raw batched gradient",
            )
        titles = ("useful gradient evals/s (sampling)", "min bulk ESS/s (warm call)")
        for ax, title in zip(row, titles, strict=True):
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="devices",
                title=f"{title}, {chains} chains",
            )
            ax.set_xticks(devices, [str(d) for d in devices])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3, which="both")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
    cfg = results["config"]
    mode = "single-thread devices" if cfg["single_thread"] else "multi-threaded devices"
    fig.suptitle(f"{cfg['model']}: {mode}, {cfg['warmup']}+{cfg['samples']} per chain")
    fig.tight_layout(rect=(0, 0.1 / len(chains_list), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``scaling.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    derive(results)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    png = plot(results, out / "scaling.png")
    return [*paths, png] if png else paths
