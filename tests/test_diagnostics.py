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
