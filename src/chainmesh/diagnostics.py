"""Convergence diagnostics (rank-normalized, Vehtari et al. 2021) and lockstep.

R-hat, bulk and tail ESS follow the rank-normalized split definitions that
Stan and ArviZ report, with Stan's autocorrelation estimator (Geyer's initial
monotone sequence plus Stan's last-term correction), so the numbers agree with
``az.rhat`` / ``az.ess`` (R-hat of a single chain is NaN, as in ArviZ).
"""

from __future__ import annotations

import numpy as np
from numpyro.diagnostics import gelman_rubin
from scipy.special import ndtri
from scipy.stats import rankdata


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of each row, by FFT."""
    n = x.shape[-1]
    centered = x - x.mean(axis=-1, keepdims=True)
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(centered, n=size, axis=-1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=-1)[..., :n] / n


def effective_sample_size(x: np.ndarray) -> float:
    """Stan's ESS of draws shaped ``(chains, draws)`` (no splitting, no ranks)."""
    chains, n = x.shape
    acov = _autocovariance(x)
    mean_var = acov[:, 0].mean() * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus += np.var(x.mean(axis=1), ddof=1)
    rho = np.zeros(n)
    rho[0], even = 1.0, 1.0
    odd = rho[1] = 1.0 - (mean_var - acov[:, 1].mean()) / var_plus
    t = 1
    while t < n - 3 and even + odd > 0.0:
        even = 1.0 - (mean_var - acov[:, t + 1].mean()) / var_plus
        odd = 1.0 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    last = t - 2
    if even > 0:  # Stan's correction: keep the last positive even term
        rho[last + 1] = even
    for t in range(1, last - 1, 2):  # initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
    tau = -1.0 + 2.0 * rho[: last + 1].sum() + rho[last + 1 : last + 2].sum()
    tau = max(tau, 1.0 / np.log10(chains * n))
    return float(chains * n / tau)


def _split(x: np.ndarray) -> np.ndarray:
    """Split each chain in two halves: ``(c, n) -> (2c, n // 2)``."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _z_scale(x: np.ndarray) -> np.ndarray:
    ranks = rankdata(x, method="average").reshape(x.shape)
    return ndtri((ranks - 0.375) / (x.size + 0.25))


def _check(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected draws shaped (chains, draws), got {x.shape}")
    return x


def ess_bulk(x: np.ndarray) -> float:
    """Bulk effective sample size of one scalar quantity.

    Args:
        x: Draws shaped ``(chains, draws)``.
    """
    x = _check(x)
    if x.shape[1] < 4 or np.ptp(x) == 0:
        return float("nan")
    return effective_sample_size(_z_scale(_split(x)))


def ess_tail(x: np.ndarray) -> float:
    """Tail ESS: the smaller ESS of the 5% and 95% quantile indicators."""
    x = _check(x)
    if x.shape[1] < 4:
        return float("nan")
    out = []
    for q in (0.05, 0.95):
        indicator = (x <= np.quantile(x, q)).astype(np.float64)
        if np.ptp(indicator) == 0:
            return float("nan")
        out.append(effective_sample_size(_split(indicator)))
    return min(out)


def r_hat(x: np.ndarray) -> float:
    """Rank-normalized split R-hat: the max of the bulk and the folded version.

    NaN with fewer than 2 chains or 4 draws (as ArviZ): R-hat compares chains.
    """
    x = _check(x)
    if x.shape[0] < 2 or x.shape[1] < 4 or np.ptp(x) == 0:
        return float("nan")
    bulk = gelman_rubin(_z_scale(_split(x)))
    folded = np.abs(x - np.median(x))
    tail = gelman_rubin(_z_scale(_split(folded)))
    return float(max(bulk, tail))


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
        for label, x in _scalar_columns(name, np.asarray(samples[name])):
            x = x.astype(np.float64)
            rows[label] = {
                "mean": float(x.mean()),
                "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                f"{100 * lo:g}%": float(np.quantile(x, lo)),
                "50%": float(np.median(x)),
                f"{100 * hi:g}%": float(np.quantile(x, hi)),
                "r_hat": r_hat(x),
                "ess_bulk": ess_bulk(x),
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
