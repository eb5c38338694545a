"""Simulation-based calibration (Talts et al. 2018) of every sampler config.

For each small model, ``NUM_DATASETS`` (parameters, data) pairs are drawn from
the prior, and all posteriors are sampled as one multi-chain SPMD program
(``chainmesh.BatchSampler``). If the sampler draws from the right posterior,
the rank of each true value among ``L`` near-independent posterior draws is
uniform on ``0..L``; a chi-square test on a ``NUM_BINS``-bin histogram of the
ranks must give ``p > P_MIN`` for every scalar parameter.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from einops import rearrange

import chainmesh as cm

from .configs import options, sbc_cases
from .sbc_models import SBC_MODELS, simulate

NUM_DATASETS = 200
NUM_CHAINS = 2
NUM_WARMUP = 500
NUM_SAMPLES = 400
THINNING = 4
NUM_DRAWS = NUM_CHAINS * (NUM_SAMPLES // THINNING)  # L: draws ranked against
NUM_BINS = 10
P_MIN = 1e-3
SIMULATION_SEED = 2018
SAMPLER_SEED = 0


def ranks(truth: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Rank of each data set's true value among its draws.

    Args:
        truth: ``(num_datasets,)`` true values.
        draws: ``(num_datasets, L)`` posterior draws.

    Returns:
        ``(num_datasets,)`` ints in ``0..L``: draws below the true value.
    """
    return (draws < truth[:, None]).sum(axis=1)


def rank_histogram(
    rank: np.ndarray, num_draws: int, num_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of ranks in ``0..num_draws`` and its exact expectation.

    Rank ``r`` falls in bin ``r * num_bins // (num_draws + 1)``; when
    ``num_draws + 1`` is not a multiple of ``num_bins`` the bins hold unequal
    numbers of rank values, which the expected counts account for.

    Returns:
        Observed and expected counts, each ``(num_bins,)``.
    """
    bins = np.arange(num_draws + 1) * num_bins // (num_draws + 1)
    counts = np.bincount(bins[rank], minlength=num_bins)
    expected = len(rank) * np.bincount(bins, minlength=num_bins) / (num_draws + 1)
    return counts, expected


def uniformity_p(rank: np.ndarray, num_draws: int, num_bins: int) -> float:
    """Chi-square p-value of the rank histogram against uniform ranks."""
    counts, expected = rank_histogram(rank, num_draws, num_bins)
    return float(scipy.stats.chisquare(counts, expected).pvalue)


def scalar_ranks(
    truths: dict[str, np.ndarray], samples: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Ranks of every scalar element of every site, named ``theta_raw[3]``.

    Args:
        truths: Site -> ``(num_datasets, *site_shape)`` true values.
        samples: Site -> ``(num_datasets, chains, draws, *site_shape)``.

    Returns:
        Scalar name -> ``(num_datasets,)`` ranks among ``chains * draws``.
    """
    out = {}
    for site, truth in truths.items():
        draws = rearrange(samples[site], "k c d ... -> k (c d) ...")
        for index in np.ndindex(*truth.shape[1:]):
            name = site + (f"[{','.join(map(str, index))}]" if index else "")
            at = (slice(None), *index)
            out[name] = ranks(truth[at], draws[(slice(None), slice(None), *index)])
    return out


def test_exact_draws_give_uniform_ranks() -> None:
    """Exact posterior draws pass; shifted or too narrow draws fail."""
    rng = np.random.default_rng(0)
    num_draws = 199  # 200 rank values, 20 per bin
    mu = rng.normal(size=NUM_DATASETS)  # mu ~ N(0, 1), y ~ N(mu, 1)
    y = mu + rng.normal(size=NUM_DATASETS)
    post_mean = y[:, None] / 2  # the posterior is N(y / 2, 1 / 2)
    noise = rng.normal(size=(NUM_DATASETS, num_draws))
    exact = post_mean + np.sqrt(0.5) * noise
    shifted = exact + 0.5
    narrow = post_mean + 0.4 * np.sqrt(0.5) * noise

    counts, expected = rank_histogram(ranks(mu, exact), num_draws, NUM_BINS)
    assert counts.sum() == NUM_DATASETS
    np.testing.assert_allclose(expected, NUM_DATASETS / NUM_BINS)
    assert uniformity_p(ranks(mu, exact), num_draws, NUM_BINS) > P_MIN
    assert uniformity_p(ranks(mu, shifted), num_draws, NUM_BINS) < P_MIN
    assert uniformity_p(ranks(mu, narrow), num_draws, NUM_BINS) < P_MIN


def test_rank_histogram_uneven_bins() -> None:
    """With 101 rank values in 10 bins, the first bin expects 11 of 101."""
    counts, expected = rank_histogram(np.arange(101), 100, NUM_BINS)
    assert counts.tolist() == [11] + [10] * 9
    np.testing.assert_allclose(expected, counts)


def rank_failures(truths: dict, samples: dict, num_draws: int) -> list[str]:
    """The scalar parameters whose ranks fail the uniformity test, described."""
    failures = []
    for param, rank in scalar_ranks(truths, samples).items():
        p = uniformity_p(rank, num_draws, NUM_BINS)
        if not p > P_MIN:
            counts, _ = rank_histogram(rank, num_draws, NUM_BINS)
            failures.append(f"{param}: p = {p:.2e}, histogram {counts.tolist()}")
    return failures


@pytest.mark.slow
@pytest.mark.parametrize(("config", "name"), sbc_cases(sorted(SBC_MODELS)))
def test_ranks_uniform(config: str, name: str) -> None:
    """Every scalar parameter's SBC ranks are uniform; few divergences."""
    case = SBC_MODELS[name]
    sim = simulate(case, NUM_DATASETS, SIMULATION_SEED)
    sampler = cm.BatchSampler(
        case.model,
        num_datasets=NUM_DATASETS,
        num_chains=NUM_CHAINS,
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        thinning=THINNING,
        progress_bar=False,
        **options(config, case.sampler_kwargs),
    )
    out = sampler.run(SAMPLER_SEED, *sim.args)

    for site, truth in sim.truths.items():
        expected_shape = (NUM_DATASETS, NUM_CHAINS, NUM_DRAWS // NUM_CHAINS)
        assert out.samples[site].shape == expected_shape + truth.shape[1:]
    divergent = float(out.extra["diverging"].mean())
    assert divergent <= case.max_divergent, (
        f"{name}: {divergent:.2%} of kept draws diverged "
        f"(at most {case.max_divergent:.2%} allowed)"
    )
    failures = rank_failures(sim.truths, out.samples, NUM_DRAWS)
    assert not failures, f"{name} [{config}] ranks not uniform:\n" + "\n".join(failures)


AUTO_CASES = [
    ("nuts-vmap", "eight_schools_noncentered"),  # NumPyro's adapter jumps
    ("nuts-lowrank", "logistic"),  # per-chain low-rank metric jumps
    ("nuts-ensemble", "normal_mean"),  # pooled NUTS jumps
    ("chees", "eight_schools_noncentered"),  # pooled ChEES keeps its length
    ("mams", "logistic"),  # MAMS carries its length and step on
]
"""One SBC case per code path that ends warmup early (``Kernel.skip``)."""
AUTO_CHAINS = 4
AUTO_TARGET_ESS = 100


@pytest.mark.slow
@pytest.mark.parametrize(("config", "name"), AUTO_CASES)
def test_ranks_uniform_when_chainmesh_decides(config: str, name: str) -> None:
    """``num_warmup="auto"`` and ``target_ess``: the run stops on the draws'
    own diagnostics (optional stopping), and the ranks are still uniform."""
    case = SBC_MODELS[name]
    sim = simulate(case, NUM_DATASETS, SIMULATION_SEED)
    sampler = cm.BatchSampler(
        case.model,
        num_datasets=NUM_DATASETS,
        num_chains=AUTO_CHAINS,
        num_warmup="auto",
        target_ess=AUTO_TARGET_ESS,
        thinning=THINNING,
        chunk_size=50,
        progress_bar=False,
        **options(config, case.sampler_kwargs),
    )
    out = sampler.run(SAMPLER_SEED, *sim.args)
    stop = out.stats["stop"]
    assert stop["reason"] == "targets", stop
    assert all(d["met"] for d in stop["datasets"])
    draws = AUTO_CHAINS * stop["draws"]
    failures = rank_failures(sim.truths, out.samples, draws)
    assert not failures, f"{name} [{config}] ranks not uniform:\n" + "\n".join(failures)
