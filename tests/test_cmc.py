"""Consensus Monte Carlo: 2-D mesh plan, tempering, combiners, exactness."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import chainmesh as cm
from chainmesh import cmc
from chainmesh.combine import consensus, robust
from chainmesh.mesh import plan_shards

SIGMA, TAU, K = 1.0, 2.0, 4
CONFIG = {"num_chains": 4, "num_warmup": 300, "num_samples": 500, "progress_bar": False}


def regression(X, y, mask):
    """Gaussian linear regression with known noise: conjugate."""
    prior = dist.Normal(0.0, TAU).expand([X.shape[1]]).to_event(1)
    beta = numpyro.sample("beta", prior)
    with numpyro.handlers.mask(mask=mask > 0):
        numpyro.sample("y", dist.Normal(X @ beta, SIGMA), obs=y)


def exact(X, y, prior_power=1.0):
    """Posterior mean and covariance of beta under prior^prior_power."""
    precision = X.T @ X / SIGMA**2 + prior_power * np.eye(X.shape[1]) / TAU**2
    cov = np.linalg.inv(precision)
    return cov @ X.T @ y / SIGMA**2, cov


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1001, 3)).astype(np.float32)  # 1001 rows: ragged last shard
    y = (X @ np.array([1.0, -0.5, 0.2]) + SIGMA * rng.normal(size=1001)).astype(
        np.float32
    )
    return X, y


@pytest.fixture(scope="module")
def result(data):
    return cmc.sample(regression, cmc.split(*data, num_shards=K), seed=0, **CONFIG)


@pytest.mark.parametrize(
    ("shards", "chains", "devices", "grid", "per_shard", "per_chain", "pads"),
    [
        (4, 4, 8, (4, 2), 1, 2, (0, 0)),
        (4, 4, 4, (4, 1), 1, 4, (0, 0)),
        (3, 4, 8, (3, 2), 1, 2, (0, 0)),
        (5, 4, 4, (3, 1), 2, 4, (1, 0)),
        (2, 3, 8, (2, 3), 1, 1, (0, 0)),
        (2, 5, 8, (2, 3), 1, 2, (0, 1)),
    ],
)
def test_shard_plan(shards, chains, devices, grid, per_shard, per_chain, pads):
    plan = plan_shards(shards, chains, jax.devices()[:devices])
    assert plan.devices.shape == grid
    assert (plan.shards_per_device, plan.chains.chains_per_device) == (
        per_shard,
        per_chain,
    )
    assert (plan.num_shard_padding, plan.chains.num_padding) == pads
    assert len(set(plan.devices.flat)) == grid[0] * grid[1]


def test_split_pads_and_masks():
    X = np.arange(10.0)[:, None]
    shards = cmc.split(X, np.arange(10.0), num_shards=4)
    assert [s[0].shape for s in shards] == [(3, 1)] * 4
    np.testing.assert_array_equal(shards[3][2], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(shards[3][1], [9.0, 9.0, 9.0])
    with pytest.raises(ValueError, match="num_shards must be in"):
        cmc.split(X, num_shards=11)


def test_consensus_matches_full_posterior(data, result):
    mean, cov = exact(*data)
    sd = np.sqrt(np.diag(cov))
    combined = result.combined["beta"]
    assert combined.shape == (CONFIG["num_chains"] * CONFIG["num_samples"], 3)
    chains = combined.reshape(CONFIG["num_chains"], -1, 3)
    for j in range(3):
        ess = cm.diagnostics.ess_bulk(chains[..., j])
        assert (
            abs(combined[:, j].mean() - mean[j])
            <= 4 * sd[j] / np.sqrt(ess) + 0.02 * sd[j]
        )
        assert abs(combined[:, j].std() - sd[j]) <= 0.1 * sd[j]
    np.testing.assert_allclose(result.weights.sum(), 1.0)
    assert result.plan.devices.shape == (4, 2)
    for diag in result.diagnostics:
        assert diag["max_r_hat"] < 1.01 and diag["divergences"] == 0


def test_sub_posterior_uses_tempered_prior(data, result):
    shard = cmc.split(*data, num_shards=K)[1]
    mean, cov = exact(shard[0], shard[1], prior_power=1.0 / K)
    draws = result.shards[1].samples["beta"]
    assert draws.shape == (4, 500, 3)
    for j in range(3):
        ess = cm.diagnostics.ess_bulk(draws[..., j])
        sd = np.sqrt(cov[j, j])
        assert abs(draws[..., j].mean() - mean[j]) <= 4 * sd / np.sqrt(ess) + 0.02 * sd


def test_rerun_is_reproducible_and_compiles_nothing(data, result, count_compiles):
    shards = cmc.split(*data, num_shards=K)
    with count_compiles() as c:
        again = cmc.sample(regression, shards, seed=0, **CONFIG)
    assert c.count == 0 and again.stats["compilations"] == 0
    for k in range(K):
        np.testing.assert_array_equal(
            again.shards[k].samples["beta"], result.shards[k].samples["beta"]
        )
    assert not np.array_equal(
        result.shards[0].samples["beta"], result.shards[1].samples["beta"]
    )


def test_robust_downweights_outlier_shard():
    rng = np.random.default_rng(1)
    draws = [rng.normal(0.0, 1.0, size=(2000, 2)) for _ in range(5)]
    draws[4] = draws[4] + 8.0
    _, plain = consensus(draws)
    combined, weights = robust(draws)
    assert weights[4] < 0.2 * plain[4]
    assert np.all(np.abs(combined.mean(axis=0)) < 0.5)


def test_concat_and_bad_input(data):
    shards = cmc.split(*data, num_shards=K)
    with pytest.raises(ValueError, match="combiner must be one of"):
        cmc.sample(regression, shards, combiner="mean", **CONFIG)
    bad = [shards[0], tuple(x[:-1] for x in shards[1])]
    with pytest.raises(ValueError, match="shard 1 has shapes"):
        cmc.sample(regression, bad, **CONFIG)
    with pytest.raises(ValueError, match="prior_power must be > 0"):
        cmc.sample(regression, shards, prior_power=0.0, **CONFIG)
    out = cmc.sample(regression, shards, combiner="concat", **CONFIG)
    assert out.combined["beta"].shape == (K * 4 * 500, 3)


def random_effects(x, y, mask=None):
    """A shared mean and one local effect per data row (a local latent)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, TAU))
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.handlers.mask(mask=True if mask is None else mask > 0):
            numpyro.sample("y", dist.Normal(mu + x * z, SIGMA), obs=y)


def test_only_shared_sites_are_tempered():
    x, y = np.ones(6, np.float32), np.arange(6.0, dtype=np.float32)
    assert cmc.local_sites(random_effects, (x, y), {}) == {"z"}
    assert cmc.local_sites(regression, (np.ones((6, 3)), y, np.ones(6)), {}) == set()
    tempered = cmc.temper_prior(random_effects, power=0.25, local=frozenset({"z"}))
    tr = numpyro.handlers.trace(numpyro.handlers.seed(tempered, 0)).get_trace(x, y)
    assert tr["mu"]["scale"] == 0.25
    assert tr["z"]["scale"] is None and tr["y"]["scale"] is None


def test_local_latents_are_neither_tempered_nor_combined():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40).astype(np.float32)
    y = (0.5 + x * rng.normal(size=40)).astype(np.float32)
    out = cmc.sample(
        random_effects,
        cmc.split(x, y, num_shards=2)[:2],
        seed=0,
        **{**CONFIG, "num_samples": 200},
    )
    assert set(out.combined) == {"mu"}
    assert out.shards[0].samples["z"].shape == (4, 200, 20)


def test_keyword_data_and_resume(tmp_path, data):
    """Shards as dicts of keyword arguments; a CMC run resumes its checkpoint."""
    shards = [{"X": X, "y": y, "mask": m} for X, y, m in cmc.split(*data, num_shards=K)]
    config = {**CONFIG, "num_samples": 100, "chunk_size": 50}
    positional = cmc.sample(regression, cmc.split(*data, num_shards=K), **config)
    keyword = cmc.sample(regression, shards, checkpoint_dir=str(tmp_path), **config)
    np.testing.assert_array_equal(keyword.combined["beta"], positional.combined["beta"])
    resumed = cmc.sample(
        regression, shards, checkpoint_dir=str(tmp_path), resume=True, **config
    )
    np.testing.assert_array_equal(resumed.combined["beta"], keyword.combined["beta"])
    assert resumed.stats["leapfrog_steps"] == keyword.stats["leapfrog_steps"]
