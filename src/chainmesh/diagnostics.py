"""Convergence diagnostics (rank-normalized, Vehtari et al. 2021) and lockstep.

R-hat, bulk and tail ESS follow the rank-normalized split definitions that
Stan and ArviZ report, with Stan's autocorrelation estimator (Geyer's initial
monotone sequence plus Stan's last-term correction), so the numbers agree with
``az.rhat`` / ``az.ess`` (R-hat of a single chain is NaN, as in ArviZ).

Everything is vectorized over scalar quantities: internally draws are laid out
``(k, chains, draws)`` (one contiguous block per quantity), and the scalar
functions run the same code with ``k = 1``, so a value recomputed for one
quantity is bit-identical to the one ``convergence`` reports for it.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

_NAMES = ("r_hat", "ess_bulk", "ess_tail")


def _mean_autocovariance(y: np.ndarray) -> np.ndarray:
    """Biased autocovariance along the last axis, averaged over axis 1, by FFT.

    The chain average is taken on the power spectra (the transform is linear),
    so there is one inverse transform per quantity, not one per chain.
    """
    n = y.shape[-1]
    centered = y - y.mean(axis=-1, keepdims=True)
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(centered, n=size, axis=-1).view(np.float64)
    # |f|^2 from real squares, in place: a complex product may take a SIMD
    # (FMA) path or not depending on the array length, which would break the
    # bit-identity between a quantity computed alone and in a batch.
    squares = np.multiply(f, f, out=f).mean(axis=1)
    power = squares[:, 0::2] + squares[:, 1::2]
    return np.fft.irfft(power, n=size, axis=-1)[..., :n] / n


def _ess_rows(y: np.ndarray) -> np.ndarray:
    """Stan's ESS of each quantity of ``y`` shaped ``(k, chains, n)``, n >= 2.

    A closed form of Stan's loop. With ``r_t`` the combined autocorrelation
    (``r_0 = 1``) and pair sums ``P_m = r_2m + r_2m+1``, pairs ``m >= 1`` with
    ``2m - 1 < n - 3`` are examined while every earlier sum is positive. If
    the scan stops at a pair ``m`` with ``P_m <= 0``, ``tau = -1 + 2 * sum of
    the running minimum of P_0..P_m-1 + r_2m`` (``r_2m`` dropped if it is not
    positive and ``P_m < 0``; ``tau = 0`` for ``m = 0``); if it runs out of
    pairs, the last examined pair adds only its raw even term. Then
    ``tau >= 1 / log10(chains * n)``.
    """
    y = np.ascontiguousarray(y, dtype=np.float64)
    k, chains, n = y.shape
    acov = _mean_autocovariance(y)
    mean_var = acov[:, 0] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus = var_plus + y.mean(axis=2).var(axis=1, ddof=1)
    pairs = 1 + max(0, (n - 3) // 2)  # pair 0 plus the examinable pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 - (mean_var[:, None] - acov[:, : 2 * pairs]) / var_plus[:, None]
    r[:, 0] = 1.0
    even = r[:, 0::2]
    sums = even + r[:, 1::2]
    stopped = ~(sums > 0)  # NaN stops the scan too, as in Stan's loop
    case1 = stopped.any(axis=1)
    last = np.where(case1, stopped.argmax(axis=1), pairs - 1)
    monotone = np.minimum.accumulate(sums, axis=1)
    head = np.zeros((k, pairs))
    head[:, 1:] = np.cumsum(monotone[:, :-1], axis=1)
    rows = np.arange(k)
    tail = even[rows, last]
    keep = ~case1 | (tail > 0) | (sums[rows, last] == 0)
    tau = -1.0 + 2.0 * head[rows, last] + np.where(keep, tail, 0.0)
    tau = np.maximum(tau, 1.0 / np.log10(chains * n))
    return chains * n / tau


def _ess(x: np.ndarray) -> np.ndarray:
    """Stan's ESS of draws shaped ``(chains, n, k)``, per quantity: ``(k,)``."""
    return _ess_rows(np.moveaxis(np.asarray(x, dtype=np.float64), -1, 0))


def effective_sample_size(x: np.ndarray) -> float:
    """Stan's ESS of draws shaped ``(chains, draws)`` (no splitting, no ranks)."""
    return float(_ess_rows(_check(x)[None])[0])


def _split(y: np.ndarray) -> np.ndarray:
    """Split each chain in two halves: ``(k, c, n) -> (k, 2c, n // 2)``."""
    half = y.shape[2] // 2
    return np.concatenate([y[:, :, :half], y[:, :, y.shape[2] - half :]], axis=1)


def _z_scale(y: np.ndarray) -> np.ndarray:
    """Rank-normalize each quantity of ``(k, c, n)`` over all its draws.

    Average ranks of ties, as ``rankdata(method="average")``, then
    ``ndtri((rank - 0.375) / (size + 0.25))``, looked up in a table of the
    ``2 * size - 1`` possible half-integer ranks (same floats, far fewer
    ``ndtri`` calls). A quantity with a NaN draw gets NaN, as in scipy.
    """
    flat = y.reshape(y.shape[0], -1)
    size = flat.shape[1]
    order = np.argsort(flat, axis=1)
    ranked = np.take_along_axis(flat, order, axis=1)
    first = np.ones(ranked.shape, dtype=bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    if first.all():  # no ties: rank i + 1 at sorted position i
        twice = np.broadcast_to(2 * np.arange(size), ranked.shape)
    else:  # tie group at sorted [start, end] of a row: rank (start + end) / 2 + 1
        start = np.flatnonzero(first)  # groups never span rows: first[:, 0]
        end = np.append(start[1:], first.size) - 1
        twice = start + end - 2 * (start // size) * size
        twice = twice[np.cumsum(first.ravel()) - 1].reshape(ranked.shape)
    table = ndtri((np.arange(2 * size - 1) / 2 + 1 - 0.375) / (size + 0.25))
    z = np.empty_like(flat)
    np.put_along_axis(z, order, table[twice], axis=1)
    z[np.isnan(ranked[:, -1])] = np.nan
    return z.reshape(y.shape)


def _gelman_rubin(y: np.ndarray) -> np.ndarray:
    """numpyro's ``gelman_rubin`` of each quantity of ``(k, c >= 2, n)``."""
    n = y.shape[2]
    var_within = y.var(axis=2, ddof=1).mean(axis=1)
    var_estimator = var_within * (n - 1) / n + y.mean(axis=2).var(axis=1, ddof=1)
    return np.sqrt(var_estimator / var_within)


def _check(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected draws shaped (chains, draws), got {x.shape}")
    return x


def _tail_ess(y: np.ndarray) -> np.ndarray:
    """Tail ESS of ``(k, c, n >= 4)``: min over the 5% and 95% indicators."""
    flat = y.reshape(y.shape[0], -1)
    out, degenerate = np.inf, np.zeros(y.shape[0], dtype=bool)
    for q in np.quantile(flat, (0.05, 0.95), axis=1):
        indicator = (y <= q[:, None, None]).astype(np.float64)
        degenerate |= np.ptp(indicator.reshape(flat.shape), axis=1) == 0
        out = np.minimum(out, _ess_rows(_split(indicator)))
    return np.where(degenerate, np.nan, out)


def _diagnose(y: np.ndarray, names=_NAMES) -> dict[str, np.ndarray]:
    """The diagnostics ``names`` of each quantity of ``y`` ``(k, c, n)``."""
    y = np.ascontiguousarray(y, dtype=np.float64)
    k, chains, n = y.shape
    out = {name: np.full(k, np.nan) for name in names}
    if n < 4:
        return out
    constant = np.ptp(y.reshape(k, -1), axis=1) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if "ess_tail" in out:
            out["ess_tail"] = _tail_ess(y)
        if "ess_bulk" not in out and ("r_hat" not in out or chains < 2):
            return out
        z = _z_scale(_split(y))
        if "ess_bulk" in out:
            out["ess_bulk"] = np.where(constant, np.nan, _ess_rows(z))
        if "r_hat" in out and chains >= 2:
            flat = y.reshape(k, -1)
            folded = np.abs(y - np.median(flat, axis=1)[:, None, None])
            tail = _gelman_rubin(_z_scale(_split(folded)))
            # fmax, not maximum: Python's max(bulk, nan) kept bulk (a NaN bulk
            # implies a NaN folded value, so the other order cannot occur).
            out["r_hat"] = np.where(constant, np.nan, np.fmax(_gelman_rubin(z), tail))
    return out


def convergence(
    x: np.ndarray, names: tuple[str, ...] = _NAMES
) -> dict[str, np.ndarray]:
    """Rank-normalized split R-hat, bulk and tail ESS of many quantities.

    Equal, quantity by quantity, to ``r_hat``, ``ess_bulk`` and ``ess_tail``
    (NaN in the same cases), without a Python loop over quantities.

    Args:
        x: Draws shaped ``(chains, draws, k)`` of ``k`` scalar quantities.
        names: The diagnostics to compute, of ``"r_hat", "ess_bulk",
            "ess_tail"``.

    Returns:
        Each of ``names`` -> float64 array ``(k,)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected draws shaped (chains, draws, k), got {x.shape}")
    unknown = set(names) - set(_NAMES)
    if unknown:
        raise ValueError(f"names must be among {_NAMES}, got {sorted(unknown)}")
    return _diagnose(np.moveaxis(x, -1, 0), tuple(names))


def ess_bulk(x: np.ndarray) -> float:
    """Bulk effective sample size of one scalar quantity.

    Args:
        x: Draws shaped ``(chains, draws)``.
    """
    return float(_diagnose(_check(x)[None], ("ess_bulk",))["ess_bulk"][0])


def ess_tail(x: np.ndarray) -> float:
    """Tail ESS: the smaller ESS of the 5% and 95% quantile indicators."""
    return float(_diagnose(_check(x)[None], ("ess_tail",))["ess_tail"][0])


def r_hat(x: np.ndarray) -> float:
    """Rank-normalized split R-hat: the max of the bulk and the folded version.

    NaN with fewer than 2 chains or 4 draws (as ArviZ): R-hat compares chains.
    The folded draws are centred on the median of all draws (ArviZ takes the
    median of the split draws, which differs slightly for odd draw counts).
    """
    return float(_diagnose(_check(x)[None], ("r_hat",))["r_hat"][0])


def nested_r_hat(x: np.ndarray, superchain_size: int) -> np.ndarray:
    """Nested R-hat (Margossian et al. 2024) of many quantities.

    Superchains are consecutive groups of ``superchain_size`` chains (chains
    that shared an initial point). As in the paper (and posterior's
    ``rhat_nested``) it is computed on the raw draws, with no splitting and no
    rank normalization: ``sqrt(1 + B / W)``, B the variance of the superchain
    means and W the mean over superchains of the variance of their chain means
    plus their mean within-chain variance (each 0 for one chain or one draw).

    Args:
        x: Draws shaped ``(chains, draws, k)``.
        superchain_size: Chains per superchain; must divide the chain count.

    Returns:
        ``(k,)`` float64; NaN for constant quantities or one superchain.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected draws shaped (chains, draws, k), got {x.shape}")
    chains, n, k = x.shape
    m = int(superchain_size)
    if m < 1 or chains % m:
        raise ValueError(
            f"superchain_size={superchain_size} must be a positive divisor of "
            f"the number of chains ({chains})"
        )
    if chains // m < 2:
        return np.full(k, np.nan)
    y = x.reshape(chains // m, m, n, k)
    chain_mean = y.mean(axis=2)
    within = y.var(axis=2, ddof=1).mean(axis=1) if n > 1 else 0.0
    between = chain_mean.var(axis=1, ddof=1) if m > 1 else 0.0
    b = chain_mean.mean(axis=1).var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(1.0 + b / (within + between).mean(axis=0))
    return np.where(np.ptp(x.reshape(-1, k), axis=0) == 0, np.nan, out)


def lockstep_efficiency(leapfrog_steps: int, lockstep_steps: int) -> float:
    """Useful leapfrog steps over the steps the devices paid for.

    Under ``vmap`` a block of chains runs until its longest trajectory ends, so
    a device pays ``chains_in_block x max(steps)`` per transition; 1.0 means no
    chain ever waited.
    """
    return float(leapfrog_steps / lockstep_steps) if lockstep_steps else float("nan")


def _scalar_columns(name: str, x: np.ndarray):
    """Yield ``(label, (chains, draws))`` for each scalar element of a site."""
    chains, draws = x.shape[:2]
    flat = x.reshape(chains, draws, -1)
    shape = x.shape[2:]
    for j in range(flat.shape[-1]):
        label = name
        if shape:
            label += "[" + ",".join(map(str, np.unravel_index(j, shape))) + "]"
        yield label, flat[..., j]


def summarize(samples: dict[str, np.ndarray], prob: float = 0.9) -> dict[str, dict]:
    """Per scalar element: mean, sd, quantiles, r_hat, ess_bulk.

    Args:
        samples: Site name -> draws ``(chains, draws, *site_shape)``.
        prob: Central interval mass for the quantile columns.
    """
    lo, hi = (1 - prob) / 2, (1 + prob) / 2
    rows = {}
    for name in sorted(samples):
        site = np.asarray(samples[name], dtype=np.float64)
        flat = site.reshape(*site.shape[:2], -1)
        diag = _diagnose(np.moveaxis(flat, -1, 0), ("r_hat", "ess_bulk"))
        for j, (label, x) in enumerate(_scalar_columns(name, site)):
            rows[label] = {
                "mean": float(x.mean()),
                "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                f"{100 * lo:g}%": float(np.quantile(x, lo)),
                "50%": float(np.median(x)),
                f"{100 * hi:g}%": float(np.quantile(x, hi)),
                "r_hat": float(diag["r_hat"][j]),
                "ess_bulk": float(diag["ess_bulk"][j]),
            }
    return rows


def format_summary(rows: dict[str, dict]) -> str:
    """A fixed-width table of ``summarize``'s rows."""
    if not rows:
        return ""
    cols = list(next(iter(rows.values())))
    width = max(12, *(len(k) + 2 for k in rows))
    lines = [" " * width + "".join(f"{c:>11}" for c in cols)]
    for label, row in rows.items():
        lines.append(f"{label:>{width}}" + "".join(f"{row[c]:>11.3f}" for c in cols))
    return "\n".join(lines)
