"""When to stop: warmup once the adaptation has settled, sampling on targets.

Both decisions are taken on the host between chunks, from draws the host
already holds, so they cost no compilation: the chunk program of a fixed run
is the one an automatic run uses.

**Sampling** (``target_ess``, ``max_rhat``, ``max_nested_rhat``): after each
sampling chunk, the rank-normalized bulk and tail ESS and split R-hat
(``diagnostics.convergence``) of every coordinate of every site kept so far
(``var_names`` restricts them) are compared with the targets; the run stops
after the first chunk where all hold.

**Warmup** (``num_warmup="auto"``): the warmup follows Stan's windows for
``max_warmup`` transitions. At the end of a slow window (from the second
on) the window's draws are checked; if the adaptation has settled, the next
chunk jumps to the final step-size buffer (``Kernel.skip``), so the metric
of that window is the one sampling uses and the last step size comes from a
full buffer, as in a fixed run. Settled means, on every coordinate of every
latent site:

- the chains agree: rank-normalized split R-hat of the window's draws
  across all chains <= ``WARMUP_RHAT``, so they have forgotten their
  initialization and the window's draws are (close to) posterior draws;
- the scale has stopped moving: the window's variance (pooled over chains)
  is within a factor ``VARIANCE_FACTOR`` of the previous window's, so a
  metric estimated once more would not change the sampler much;
- with per-chain adaptation, each chain estimated its metric from at least
  ``CHAIN_WINDOW`` draws (a pooled estimate sees every chain's draws).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
from numpyro.infer.hmc_util import build_adaptation_schedule

from chainmesh.config import SUPERCHAIN, SamplerConfig
from chainmesh.diagnostics import convergence, nested_r_hat
from chainmesh.placement import from_main
from chainmesh.store import NullStore

WARMUP_RHAT = 1.05
VARIANCE_FACTOR = 1.5
CHAIN_WINDOW = 100


class WarmupPlan(NamedTuple):
    """The window boundaries of a warmup schedule and where it may end early.

    Attributes:
        ends: Transition counts at which a window ends (``end + 1``), sorted.
        middle: Window end -> length of the slow window ending there.
        candidates: Ends after which warmup may jump to the final buffer.
        final: First transition of the final step-size buffer.
    """

    ends: tuple[int, ...]
    middle: dict[int, int]
    candidates: tuple[int, ...]
    final: int


def warmup_plan(config: SamplerConfig) -> WarmupPlan:
    """The windows of ``config``'s warmup (NumPyro's Stan schedule)."""
    n = config.num_warmup
    windows = build_adaptation_schedule(n) if n > 0 else []
    ends = tuple(int(end) + 1 for _, end in windows)
    middle = {int(e) + 1: int(e - s) + 1 for s, e in windows[1:-1]}
    shortest = CHAIN_WINDOW if _per_chain(config) else 0
    # Not after the first slow window (nothing to compare it with), nor after
    # the last one (the final buffer follows anyway).
    slow = sorted(middle)[1:-1]
    candidates = tuple(e for e in slow if middle[e] >= shortest)
    final = int(windows[-1][0]) if windows else n
    return WarmupPlan(ends, middle, candidates, final)


def _per_chain(config: SamplerConfig) -> bool:
    """Whether each chain adapts its own metric (not a pooled estimate)."""
    return config.kernel == "nuts" and config.adapt == "chain"


class WindowCheck(NamedTuple):
    """The warmup decision at one window's end, per data set.

    Attributes:
        settled: ``(datasets,)`` bool.
        r_hat: ``(datasets,)`` max R-hat of the window's draws.
        change: ``(datasets,)`` max ``|log(var / previous var)|``.
        variance: ``(datasets, k)`` the window's pooled variances.
    """

    settled: np.ndarray
    r_hat: np.ndarray
    change: np.ndarray
    variance: np.ndarray


def check_window(
    draws: np.ndarray, previous: np.ndarray | None, candidate: bool
) -> WindowCheck:
    """The settle criterion on one window's draws.

    Args:
        draws: ``(datasets, chains, n, k)`` latent coordinates of the window.
        previous: ``(datasets, k)`` variances of the previous window, or None.
        candidate: Whether warmup may end here at all.
    """
    r_hat, change, variance = [], [], []
    for d, x in enumerate(draws):
        r_hat.append(np.max(convergence(x, ("r_hat",))["r_hat"], initial=-np.inf))
        v = x.reshape(-1, x.shape[-1]).var(axis=0, ddof=1)
        variance.append(v)
        if previous is None:
            change.append(np.inf)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                step = np.abs(np.log(v / previous[d]))
            change.append(np.max(step, initial=0.0))
    r_hat, change = np.asarray(r_hat), np.asarray(change)
    # NaN (a constant coordinate) never counts as settled.
    settled = (r_hat <= WARMUP_RHAT) & (change <= np.log(VARIANCE_FACTOR))
    return WindowCheck(settled & candidate, r_hat, change, np.asarray(variance))


class Targets(NamedTuple):
    """The targets of a run (None: not checked)."""

    ess: float | None
    r_hat: float | None
    nested_r_hat: float | None

    @classmethod
    def of(cls, config: SamplerConfig) -> Targets:
        """The targets ``config`` asks for."""
        return cls(config.target_ess, config.max_rhat, config.max_nested_rhat)


def coordinates(draws: dict[str, np.ndarray], lead: int, n: int) -> tuple:
    """Every scalar coordinate of ``draws``' first ``n`` draws.

    Returns:
        ``(x, labels)``: ``x`` shaped ``(datasets, chains, n, k)`` (float64;
        one data set without a shard axis) and the ``k`` coordinate labels.
    """
    blocks, labels = [], []
    for name in sorted(draws):
        x = np.asarray(draws[name])
        x = x[(slice(None),) * lead + (slice(0, n),)]
        if lead == 1:
            x = x[None]
        shape = x.shape[3:]
        blocks.append(x.reshape(*x.shape[:3], -1).astype(np.float64))
        for j in range(int(np.prod(shape, dtype=int))):
            index = np.unravel_index(j, shape) if shape else ()
            labels.append(
                name + ("[" + ",".join(map(str, index)) + "]" if shape else "")
            )
    return np.concatenate(blocks, axis=-1), labels


def assess(x: np.ndarray, labels: list[str], targets: Targets) -> list[dict[str, Any]]:
    """The stopping numbers of every data set, and whether its targets hold.

    Args:
        x: ``(datasets, chains, n, k)`` draws (``coordinates``).
        labels: The ``k`` coordinate labels.
        targets: What must hold.

    Returns:
        One dict per data set: ``met``, ``min_ess_bulk``, ``min_ess_tail``,
        ``max_rhat`` (and ``max_nested_rhat`` when targeted), and the
        coordinates that set each (``*_at``). NaN never meets a target.
    """
    out = []
    for one in x:
        # A coordinate equal in every draw (a constant deterministic site) is
        # known exactly: no target applies to it.
        varies = np.ptp(one.reshape(-1, one.shape[-1]), axis=0) > 0
        varies |= np.isnan(one).any(axis=(0, 1))
        one, names = (
            one[..., varies],
            [n for n, v in zip(labels, varies, strict=True) if v],
        )
        if not names:
            out.append({"met": True})
            continue
        c = convergence(one)
        row: dict[str, Any] = {}
        met = True
        checks = [
            (
                "min_ess_bulk",
                c["ess_bulk"],
                np.nanargmin,
                targets.ess,
                np.greater_equal,
            ),
            (
                "min_ess_tail",
                c["ess_tail"],
                np.nanargmin,
                targets.ess,
                np.greater_equal,
            ),
            ("max_rhat", c["r_hat"], np.nanargmax, targets.r_hat, np.less_equal),
        ]
        if targets.nested_r_hat is not None:
            nested = nested_r_hat(one, SUPERCHAIN)
            checks.append(
                (
                    "max_nested_rhat",
                    nested,
                    np.nanargmax,
                    targets.nested_r_hat,
                    np.less_equal,
                )
            )
        for name, values, pick, target, ok in checks:
            if np.isnan(values).any():
                j = int(np.flatnonzero(np.isnan(values))[0])
            else:
                j = int(pick(values))
            row[name] = float(values[j])
            row[name + "_at"] = names[j]
            if target is not None:
                met &= bool(ok(values[j], target))
        row["met"] = met
        out.append(row)
    return out


def _agreed(value: Any) -> Any:
    """Process 0's decision (JSON values), on every process: each process
    then takes the same next chunk (a collective when several run)."""
    if jax.process_count() == 1:
        return value
    blob = json.dumps(value).encode() if jax.process_index() == 0 else None
    return json.loads(from_main(blob))


def end_window(
    config: SamplerConfig,
    plan: WarmupPlan,
    p: Any,
    window: list[np.ndarray],
    end: int,
    bar: Any,
) -> None:
    """At a slow window's end: check it, and jump to the final buffer if the
    adaptation has settled on every data set."""
    draws = np.concatenate(window, axis=2)
    window.clear()
    previous = None if p.previous is None else np.asarray(p.previous)
    found = check_window(draws, previous, end in plan.candidates)
    settled = _agreed(bool(found.settled.all()))
    p.previous = found.variance.tolist()
    p.windows.append(
        {
            "end": end,
            "max_rhat": found.r_hat.tolist(),
            "max_log_variance_change": found.change.tolist(),
            "settled": settled,
        }
    )
    if settled and plan.final > p.warmup:
        bar.total -= plan.final - p.warmup
        p.jump = p.warmup = plan.final


def check_targets(
    config: SamplerConfig, p: Any, store: Any, lead: int, bar: Any
) -> None:
    """After a sampling chunk: the targets on every draw kept so far."""
    kept = config.num_samples // config.thinning
    rows = []
    if not isinstance(store, NullStore):
        draws = store.read("draws")
        if config.var_names is not None:
            draws = {k: draws[k] for k in config.var_names}
        x, labels = coordinates(draws, lead, p.filled)
        rows = assess(x, labels, Targets.of(config))
    rows = _agreed(rows)
    p.checks.append({"draws": p.filled, "samples": p.sampled, "datasets": rows})
    # A data set is done once its targets held at a check (BatchSampler:
    # the run goes on until the last data set is done).
    met = all(any(c["datasets"][d]["met"] for c in p.checks) for d in range(len(rows)))
    worst = _worst(rows)
    bar.set_postfix(_against(worst, config), refresh=False)
    if met or p.filled >= kept:
        p.stop = {"reason": "targets" if met else "max_samples", **worst}
        bar.total = p.warmup_run + p.sampled
        if not met:
            warnings.warn(
                f"sampling reached max_samples={config.num_samples} without "
                f"meeting its targets ({_targets_text(config)}): {worst}. The "
                "draws are returned; run longer (max_samples=) or look at the "
                "model's geometry",
                UserWarning,
                stacklevel=6,
            )


def _worst(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst numbers over data sets (the one data set, usually)."""
    worst: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if key == "met" or key.endswith("_at"):
                continue
            low = key.startswith("min_")
            old = worst.get(key)
            if old is None or (value < old if low else value > old) or value != value:
                worst[key], worst[key + "_at"] = value, row.get(key + "_at")
    return worst


def _against(worst: dict[str, Any], config: SamplerConfig) -> dict[str, str]:
    """The progress bar's numbers: each one reached, against its target."""
    shown = {
        "ess": (
            min(worst.get("min_ess_bulk", np.nan), worst.get("min_ess_tail", np.nan)),
            config.target_ess,
        ),
        "rhat": (worst.get("max_rhat"), config.max_rhat),
        "nested_rhat": (worst.get("max_nested_rhat"), config.max_nested_rhat),
    }
    return {
        name: f"{value:.0f}/{target:g}" if name == "ess" else f"{value:.4f}/{target:g}"
        for name, (value, target) in shown.items()
        if target is not None and value is not None
    }


def _targets_text(config: SamplerConfig) -> str:
    names = {
        "target_ess": "ess >=",
        "max_rhat": "r_hat <=",
        "max_nested_rhat": "nested r_hat <=",
    }
    return ", ".join(
        f"{text} {getattr(config, k)}"
        for k, text in names.items()
        if getattr(config, k) is not None
    )


def record(config: SamplerConfig, p: Any) -> dict[str, Any]:
    """``Result.stats["stop"]``: where and why warmup and sampling ended."""
    if config.auto_warmup:
        jumped = any(w["settled"] for w in p.windows)
        warmup_reason = "settled" if jumped else "max_warmup"
    else:
        warmup_reason = "num_warmup"
    record: dict[str, Any] = {
        "warmup": p.warmup_run,
        "warmup_reason": warmup_reason,
        "samples": p.sampled,
        "draws": p.filled,
        "reason": "num_samples",
    }
    if config.auto_warmup:
        record["windows"] = p.windows
    if config.stopping:
        record.update(p.stop or {"reason": "interrupted"})
        record["targets"] = {
            k: getattr(config, k) for k in ("target_ess", "max_rhat", "max_nested_rhat")
        }
        record["checks"] = p.checks
        if p.checks and len(p.checks[-1]["datasets"]) > 1:
            record["datasets"] = _dataset_stops(p.checks)
    return record


def _dataset_stops(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each data set's own stop: the first check where its targets held."""
    stops = []
    for d in range(len(checks[-1]["datasets"])):
        first = next((c for c in checks if c["datasets"][d]["met"]), None)
        row = first or checks[-1]
        stops.append(
            {
                "met": first is not None,
                "draws": row["draws"],
                "samples": row["samples"],
                **{k: v for k, v in row["datasets"][d].items() if k != "met"},
            }
        )
    return stops
