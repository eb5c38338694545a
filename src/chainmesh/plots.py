"""Pictures of a run: per-chain trace and rank plots, ESS per second.

matplotlib is an optional extra (``pip install chainmesh[plot]``), imported
when a plot is drawn. Figures are built with ``matplotlib.figure.Figure``
(no pyplot, no global backend state), so they work in scripts, servers and
tests alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import rankdata

from chainmesh.diagnostics import _scalar_columns, ess_bulk, r_hat

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from chainmesh.result import Result

RANK_BINS = 20
"""Bins of the rank histograms."""


def _figure(**kwargs) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "chainmesh plots need matplotlib: pip install chainmesh[plot]"
        ) from err
    return Figure(**kwargs)


def scalar_draws(
    result: Result,
    var_names: Sequence[str] | None = None,
    max_params: int | None = None,
) -> list[tuple[str, np.ndarray]]:
    """``(label, (chains, draws))`` for each scalar of the chosen sites.

    Args:
        result: A sampler result.
        var_names: Sites to take (all, sorted by name, if None).
        max_params: Keep at most this many scalars (None: all).
    """
    names = sorted(result.samples) if var_names is None else list(var_names)
    missing = [n for n in names if n not in result.samples]
    if missing:
        raise KeyError(f"no sites {missing}; the result has {sorted(result.samples)}")
    columns = [
        (label, x.astype(np.float64))
        for name in names
        for label, x in _scalar_columns(name, np.asarray(result.samples[name]))
    ]
    return columns if max_params is None else columns[:max_params]


def _chain_colors(num_chains: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_chains <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_chains)]


def plot_trace_rank(
    result: Result, var_names: Sequence[str] | None = None, max_params: int = 4
) -> Figure:
    """One row per scalar: draws of every chain (left), rank histograms (right).

    Rank plots (Vehtari et al. 2021) rank all draws together and histogram the
    ranks chain by chain: chains that sample the same distribution give flat
    histograms (dashed line); a chain stuck elsewhere stands out.

    Example:
        >>> fig = plot_trace_rank(result, ["beta"], max_params=2)
        >>> fig.savefig("trace_rank.png")

    Args:
        result: A sampler result.
        var_names: Sites to plot (all, sorted, if None).
        max_params: Scalars to plot at most (first in site order).
    """
    columns = scalar_draws(result, var_names, max_params)
    num_chains = result.num_chains
    colors = _chain_colors(num_chains)
    row_height = max(2.2, 0.17 * num_chains)  # room for one rank row per chain
    fig = _figure(figsize=(11, row_height * len(columns) + 0.6), layout="constrained")
    axes = fig.subplots(len(columns), 2, squeeze=False, width_ratios=(3, 1.4))
    for (label, x), (trace_ax, rank_ax) in zip(columns, axes, strict=True):
        for c in range(num_chains):
            trace_ax.plot(x[c], lw=0.4, alpha=0.7, color=colors[c])
        trace_ax.set_ylabel(label)
        trace_ax.set_xlim(0, x.shape[1] - 1)
        trace_ax.set_title(
            f"{label}: r_hat {r_hat(x):.3f}, bulk ESS {ess_bulk(x):.0f}",
            fontsize=9,
            loc="left",
        )
        ranks = rankdata(x, method="average").reshape(x.shape)
        edges = np.linspace(0.5, x.size + 0.5, RANK_BINS + 1)
        width = edges[1] - edges[0]
        uniform = x.shape[1] / RANK_BINS
        for c in range(num_chains):
            counts, _ = np.histogram(ranks[c], bins=edges)
            # each chain on its own baseline; a flat histogram fills 0.8 of a row
            rank_ax.bar(
                edges[:-1],
                0.8 * counts / (2 * uniform),
                width=width,
                bottom=c,
                align="edge",
                color=colors[c],
                edgecolor="white",
                linewidth=0.3,
            )
            rank_ax.hlines(c + 0.4, edges[0], edges[-1], colors="k", lw=0.6, ls="--")
        rank_ax.set_yticks(
            np.arange(num_chains) + 0.4, [str(c) for c in range(num_chains)]
        )
        rank_ax.tick_params(axis="y", labelsize=6)
        rank_ax.set_ylim(-0.1, num_chains)
        rank_ax.set_xlim(edges[0], edges[-1])
        rank_ax.set_ylabel("chain", fontsize=8)
    axes[-1, 0].set_xlabel("draw")
    axes[-1, 1].set_xlabel("rank of draw (all chains)")
    fig.suptitle(
        f"{num_chains} chains x {result.num_draws} draws; {result.plan}", fontsize=10
    )
    return fig


def plot_ess_per_second(
    result: Result, var_names: Sequence[str] | None = None
) -> Figure:
    """Bulk ESS per second for every scalar: sampling time and end to end.

    Two bars per scalar: ESS over the sampling phase's wall time, and over the
    whole call (compilation, init, warmup and sampling): the first is what a
    warm sampler delivers, the second what one cold call costs.

    Example:
        >>> fig = plot_ess_per_second(result)
        >>> fig.savefig("ess_per_second.png")

    Args:
        result: A sampler result (its ``stats`` hold the timings).
        var_names: Sites to plot (all, sorted, if None).
    """
    columns = scalar_draws(result, var_names)
    labels = [label for label, _ in columns]
    ess = np.array([ess_bulk(x) for _, x in columns])
    s = result.stats
    sampling = max(s["sampling_s"], 1e-9)
    total = s["compile_s"] + s["init_s"] + s["warmup_s"] + s["sampling_s"]
    fig = _figure(figsize=(8, 0.28 * len(labels) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(labels))
    ax.barh(y - 0.2, ess / sampling, height=0.4, label=f"sampling ({sampling:.2f} s)")
    ax.barh(
        y + 0.2,
        ess / total,
        height=0.4,
        label=f"end to end: compile + init + warmup + sampling ({total:.2f} s)",
    )
    ax.axvline(np.nanmin(ess) / sampling, color="k", lw=0.8, ls="--")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bulk ESS per second")
    fig.legend(fontsize=8, loc="outside lower center")
    ax.set_title(
        f"{result.plan}\nmin bulk ESS {np.nanmin(ess):.0f} "
        f"({np.nanmin(ess) / sampling:.0f}/s of sampling, dashed)",
        fontsize=9,
    )
    return fig


def save_plots(
    result: Result,
    directory: str | Path,
    var_names: Sequence[str] | None = None,
    max_params: int = 4,
) -> list[Path]:
    """Write ``trace_rank.png`` and ``ess_per_second.png`` into ``directory``.

    Example:
        >>> [p.name for p in save_plots(result, "out")]
        ['trace_rank.png', 'ess_per_second.png']

    Args:
        result: A sampler result.
        directory: Created if missing.
        var_names: Sites to plot (all, sorted, if None).
        max_params: Scalars in the trace/rank plot.

    Returns:
        The paths written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "trace_rank.png": plot_trace_rank(result, var_names, max_params),
        "ess_per_second.png": plot_ess_per_second(result, var_names),
    }
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        paths.append(out / name)
    return paths
