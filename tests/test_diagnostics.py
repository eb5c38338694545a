"""Diagnostics against known answers (iid, AR(1), shifted chains)."""

import numpy as np
import pytest

from chainmesh import diagnostics as d


def _ar1(rho: float, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=shape)
    x = np.empty(shape)
    x[:, 0] = eps[:, 0] / np.sqrt(1 - rho**2)
    for t in range(1, shape[1]):
        x[:, t] = rho * x[:, t - 1] + eps[:, t]
    return x


def test_ess_of_iid_draws_is_their_number():
    x = np.random.default_rng(0).normal(size=(4, 2000))
    assert d.ess_bulk(x) == pytest.approx(8000, rel=0.1)
    assert d.ess_tail(x) == pytest.approx(8000, rel=0.15)
    assert d.r_hat(x) == pytest.approx(1.0, abs=0.01)


def test_ess_of_ar1_matches_theory():
    rho = 0.9
    x = _ar1(rho, (4, 20000))
    theory = x.size * (1 - rho) / (1 + rho)
    assert d.ess_bulk(x) == pytest.approx(theory, rel=0.15)


def test_r_hat_flags_chains_that_disagree():
    x = np.random.default_rng(1).normal(size=(4, 1000))
    x[0] += 2.0
    assert d.r_hat(x) > 1.1
    wide = np.random.default_rng(2).normal(size=(4, 1000))
    wide[0] *= 5.0  # same mean, other spread: caught by the folded R-hat
    assert d.r_hat(wide) > 1.1


def test_degenerate_inputs():
    assert np.isnan(d.ess_bulk(np.ones((2, 100))))
    assert np.isnan(d.r_hat(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="chains, draws"):
        d.ess_bulk(np.zeros(10))


def test_r_hat_of_one_chain_is_nan_like_arviz():
    one = np.random.default_rng(4).normal(size=(1, 400))
    assert np.isnan(d.r_hat(one))  # R-hat compares chains; ArviZ gives NaN too
    assert d.ess_bulk(one) == pytest.approx(400, rel=0.2)  # ESS still exists


def test_lockstep_efficiency():
    assert d.lockstep_efficiency(30, 40) == 0.75
    assert np.isnan(d.lockstep_efficiency(0, 0))


def test_summary_rows_and_table():
    rng = np.random.default_rng(3)
    samples = {"a": rng.normal(size=(2, 500)), "b": rng.normal(size=(2, 500, 2))}
    rows = d.summarize(samples)
    assert list(rows) == ["a", "b[0]", "b[1]"]
    assert set(rows["a"]) == {"mean", "sd", "5%", "50%", "95%", "r_hat", "ess_bulk"}
    assert rows["b[1]"]["mean"] == pytest.approx(samples["b"][..., 1].mean())
    table = d.format_summary(rows)
    assert table.splitlines()[0].split() == list(rows["a"])
    assert len(table.splitlines()) == 4


def _reference_ess(x: np.ndarray) -> float:
    """The old scalar ``effective_sample_size`` (Stan's loop), kept as a reference."""
    chains, n = x.shape
    centered = x - x.mean(axis=-1, keepdims=True)
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(centered, n=size, axis=-1)
    acov = np.fft.irfft(f * np.conj(f), n=size, axis=-1)[..., :n] / n
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
    if even > 0:
        rho[last + 1] = even
    for t in range(1, last - 1, 2):
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
    tau = -1.0 + 2.0 * rho[: last + 1].sum() + rho[last + 1 : last + 2].sum()
    tau = max(tau, 1.0 / np.log10(chains * n))
    return float(chains * n / tau)


def _ar1_columns(rng, chains: int, n: int, phis) -> np.ndarray:
    """AR(1) draws ``(chains, n, len(phis))``, one coefficient per column."""
    phis = np.asarray(phis, dtype=float)
    eps = rng.normal(size=(chains, n, phis.size))
    x = np.empty_like(eps)
    x[:, 0] = eps[:, 0] / np.sqrt(np.maximum(1 - phis**2, 1e-2))
    for t in range(1, n):
        x[:, t] = phis * x[:, t - 1] + eps[:, t]
    return x


def _seven_columns() -> np.ndarray:
    rng = np.random.default_rng(11)
    chains, n = 4, 101  # odd: the split drops the middle draw
    x = rng.normal(size=(chains, n, 7))
    x[..., 1] = _ar1_columns(rng, chains, n, [0.9])[..., 0]
    x[..., 2] = 3.0  # constant: every diagnostic is NaN
    x[..., 3] = np.round(x[..., 3])  # heavy ties
    x[..., 4] += np.arange(chains)[:, None]  # chains that disagree
    x[..., 5] = _ar1_columns(rng, chains, n, [-0.7])[..., 0]
    sign = np.where(np.arange(chains) % 2, -1.0, 1.0)[:, None]
    x[..., 6] = sign * (-1.0) ** np.arange(n)  # +-1: the folded draws are constant
    return x


def test_convergence_equals_the_scalar_functions_bit_for_bit():
    x = _seven_columns()
    out = d.convergence(x)
    assert set(out) == {"r_hat", "ess_bulk", "ess_tail"}
    for name, fn in [
        ("r_hat", d.r_hat),
        ("ess_bulk", d.ess_bulk),
        ("ess_tail", d.ess_tail),
    ]:
        assert out[name].shape == (7,) and out[name].dtype == np.float64
        scalar = np.array([fn(x[..., j]) for j in range(7)])
        np.testing.assert_array_equal(out[name], scalar)  # NaN == NaN here
    assert all(np.isnan(out[name][2]) for name in out)
    assert np.isfinite(out["r_hat"][6])  # the bulk part, as max(bulk, nan) was
    assert out["r_hat"][4] > 1.2
    assert np.isnan(d.convergence(x[:1])["r_hat"]).all()  # one chain
    assert all(np.isnan(v).all() for v in d.convergence(x[:, :3]).values())
    with pytest.raises(ValueError, match="chains, draws, k"):
        d.convergence(x[..., 0])


def test_convergence_matches_arviz():
    az = pytest.importorskip("arviz")
    # Even draws: for odd draws ArviZ folds about the median of the split draws,
    # chainmesh (before and after vectorizing) about the median of all draws.
    # Constant columns and a constant tail indicator (+-1) are NaN here only.
    x = np.delete(_seven_columns()[:, :100], [2, 6], axis=-1)
    out = d.convergence(x)
    for j in range(x.shape[-1]):
        col = x[..., j]
        assert out["r_hat"][j] == pytest.approx(float(az.rhat(col)), rel=1e-10)
        bulk, tail = az.ess(col, method="bulk"), az.ess(col, method="tail")
        assert out["ess_bulk"][j] == pytest.approx(float(bulk), rel=1e-10)
        assert out["ess_tail"][j] == pytest.approx(float(tail), rel=1e-10)


def test_vectorized_ess_equals_the_reference_loop():
    rng = np.random.default_rng(7)
    worst, cases = 0.0, 0
    for i in range(240):
        chains = int(rng.integers(1, 9))
        n = int(rng.integers(4, 11)) if i % 3 == 0 else int(rng.integers(4, 301))
        phis = rng.uniform(-0.9, 0.99, size=3)
        x = _ar1_columns(rng, chains, n, phis)
        if i % 10 == 0:
            x[..., 0] = rng.normal(size=(chains, n))  # iid
        if i % 10 == 5:
            x[..., 1] = 1.0 + 1e-9 * rng.normal(size=(chains, n))  # near-constant
        got = d._ess(x)
        for j in range(3):
            want = _reference_ess(x[..., j])
            worst = max(worst, abs(got[j] - want) / want)
            assert d.effective_sample_size(x[..., j]) == got[j]
            cases += 1
    assert cases >= 600
    assert worst < 1e-10


def test_nested_r_hat_of_iid_and_of_shifted_superchains():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 100, 5))
    assert np.all(d.nested_r_hat(x, 4) < 1.01)
    shifted = x + (np.arange(64) // 4 % 2)[:, None, None]  # alternate superchains 1 sd
    assert np.all(d.nested_r_hat(shifted, 4) > 1.05)
    x[..., 2] = 7.0
    assert np.isnan(d.nested_r_hat(x, 4)[2])
    with pytest.raises(ValueError, match="superchain_size"):
        d.nested_r_hat(x, 5)
    with pytest.raises(ValueError, match="superchain_size"):
        d.nested_r_hat(x, 0)


def test_nested_r_hat_with_single_chain_superchains_is_plain_gelman_rubin():
    from numpyro.diagnostics import gelman_rubin

    rng = np.random.default_rng(6)
    chains, n = 8, 50
    x = rng.normal(size=(chains, n, 3)) + rng.normal(size=(chains, 1, 3))
    w = x.var(axis=1, ddof=1).mean(axis=0)  # within-chain variance W
    b = n * x.mean(axis=1).var(axis=0, ddof=1)  # between-chain variance B
    nested = d.nested_r_hat(x, 1)
    np.testing.assert_allclose(nested, np.sqrt(1 + b / n / w), rtol=1e-12)
    # R-hat^2 = (n-1)/n + B/(n W): nested R-hat^2 is that plus 1/n.
    np.testing.assert_allclose(nested**2, gelman_rubin(x) ** 2 + 1 / n, rtol=1e-12)


def test_convergence_of_many_quantities():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 200, 1000))
    out = d.convergence(x)
    assert all(v.shape == (1000,) and np.isfinite(v).all() for v in out.values())
    assert np.all(np.abs(out["r_hat"] - 1) < 0.02)
    for j in (0, 999):
        assert out["ess_bulk"][j] == d.ess_bulk(x[..., j])
