"""Draw how chains are laid out on devices: docs/img/layout.png.

Usage: python scripts/draw_layout.py [--out docs/img/layout.png]

Each panel applies chainmesh's own padding rule (``chainmesh.plan_chains``) to
a chain and device count and draws the ``("chain",)`` mesh: one column per
device, one box per chain slot, padding chains hatched, unused devices grey.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from chainmesh.mesh import plan_chains

CASES = ((10, 4), (9, 8), (2, 8))
"""(chains, devices) of each panel."""

CHAIN_COLOR = "#4c72b0"
PAD_COLOR = "#dd8452"
IDLE_COLOR = "#d9d9d9"


def _panel(ax, num_chains: int, num_devices: int) -> None:
    plan = plan_chains(num_chains, list(range(num_devices)))
    per, used = plan.chains_per_device, plan.num_devices
    slot_h, gap = 0.8, 0.35
    top = per * slot_h + 0.5
    for d in range(num_devices):
        x0 = d * (1 + gap)
        active = d < used
        ax.add_patch(
            FancyBboxPatch(
                (x0 - 0.08, -0.1),
                1.16,
                top,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                facecolor="white" if active else IDLE_COLOR,
                edgecolor="#333333" if active else "#999999",
                lw=1.2,
            )
        )
        ax.text(x0 + 0.5, top - 0.28, f"device {d}", ha="center", fontsize=8)
        if not active:
            ax.text(
                x0 + 0.5, top / 2 - 0.3, "idle", ha="center", fontsize=8, color="#666"
            )
            continue
        for c in range(per):
            i = d * per + c  # global chain index: chain-major blocks
            pad = i >= num_chains
            y0 = (per - 1 - c) * slot_h
            ax.add_patch(
                Rectangle(
                    (x0 + 0.05, y0 + 0.05),
                    0.9,
                    slot_h - 0.12,
                    facecolor="white" if pad else CHAIN_COLOR,
                    edgecolor=PAD_COLOR if pad else "white",
                    hatch="////" if pad else None,
                    lw=1.2,
                )
            )
            label = f"pad {i}" if pad else f"chain {i}"
            ax.text(
                x0 + 0.5,
                y0 + slot_h / 2 - 0.02,
                label,
                ha="center",
                va="center",
                fontsize=7.5,
                color=PAD_COLOR if pad else "white",
                fontweight="bold",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0}
                if pad
                else None,
            )
    width = used * (1 + gap) - gap
    ax.annotate(
        "",
        xy=(width + 0.1, -0.45),
        xytext=(-0.1, -0.45),
        arrowprops={"arrowstyle": "<->", "color": "#333333", "lw": 1},
    )
    ax.text(
        -0.1,
        -0.7,
        f'mesh: {used} device(s) on axis "chain"; P("chain") gives each a '
        f"block of {per} row(s) of every chain-axis array",
        ha="left",
        va="top",
        fontsize=8,
        style="italic",
    )
    if num_devices <= 4:  # room to the right: draw the global chain axis too
        _global_axis(ax, plan, x0=num_devices * (1 + gap) + 0.3, top=top)
    ax.set_title(
        f"{num_chains} chains on {num_devices} devices: per = ceil({num_chains}/"
        f"{num_devices}) = {per}, d = ceil({num_chains}/{per}) = {used}, "
        f"pad = {used}*{per} - {num_chains} = {plan.num_padding}",
        fontsize=9.5,
        loc="left",
    )
    ax.set_xlim(-0.3, 8 * (1 + gap))
    ax.set_ylim(-1.2, top + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")


def _global_axis(ax, plan, x0: float, top: float) -> None:
    """The global chain axis as one row, bracketed into per-device blocks."""
    per, total = plan.chains_per_device, plan.total_chains
    cell = min(0.45, (8 * 1.35 - x0 - 0.2) / total)
    y0 = top / 2 - 0.1
    ax.text(x0, y0 + 0.75, "global chain axis, (d * per, ...):", fontsize=8)
    for i in range(total):
        pad = i >= plan.num_chains
        ax.add_patch(
            Rectangle(
                (x0 + i * cell, y0),
                cell * 0.92,
                0.45,
                facecolor="white" if pad else CHAIN_COLOR,
                edgecolor=PAD_COLOR if pad else "white",
                hatch="////" if pad else None,
            )
        )
        ax.text(
            x0 + (i + 0.46) * cell,
            y0 + 0.22,
            str(i),
            ha="center",
            va="center",
            fontsize=6.5,
            color=PAD_COLOR if pad else "white",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5}
            if pad
            else None,
        )
    for d in range(plan.num_devices):
        left, right = x0 + d * per * cell, x0 + ((d + 1) * per - 0.08) * cell
        ax.plot([left, left, right, right], [y0 - 0.05, y0 - 0.15] * 2, "k-", lw=0.8)
        ax.text(
            (left + right) / 2,
            y0 - 0.22,
            f"dev {d}",
            ha="center",
            va="top",
            fontsize=6.5,
        )


def draw(out: Path) -> Path:
    """Draw every case of ``CASES`` into one PNG at ``out``."""
    heights = [
        plan_chains(c, list(range(d))).chains_per_device * 0.8 + 1.8 for c, d in CASES
    ]
    # axes use equal aspect over 11.1 data units of width: size the figure to fit
    inch = 10 * 0.96 / 11.1
    fig = Figure(figsize=(10, inch * sum(heights) + 0.45 * len(CASES) + 0.6))
    axes = fig.subplots(len(CASES), 1, height_ratios=heights)
    for ax, (chains, devices) in zip(axes, CASES, strict=True):
        _panel(ax, chains, devices)
    fig.text(
        0.5,
        0.01,
        "Chain i always draws with key fold_in(root, i); padding chains run and "
        "are dropped before anything is returned. Data are replicated (P()).",
        ha="center",
        fontsize=8.5,
    )
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.05, hspace=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/layout.png"))
    print(f"wrote {draw(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
