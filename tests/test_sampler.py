"""The sampler end to end: layout, reproducibility, compile reuse, stats."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import (
    correlated,
    linreg,
    linreg_data,
    normal_mean,
    normal_mean_posterior,
    scale_model,
)
from numpyro.infer.hmc_util import build_adaptation_schedule

import chainmesh as cm
from chainmesh.counters import COUNTERS, _add_wide, wide_total
from chainmesh.kernels.base import EXTRA_FIELDS
from chainmesh.placement import device_blocks

Y = np.random.default_rng(1).normal(2.0, 1.0, size=25).astype(np.float32)
FAST = {"num_warmup": 150, "num_samples": 100, "progress_bar": False}
FIELDS = {*EXTRA_FIELDS, "tree_depth"}


def test_uneven_chains_on_four_devices():
    result = cm.Sampler(normal_mean, num_chains=10, devices=4, **FAST).run(0, Y)
    plan = result.plan
    assert (plan.num_devices, plan.chains_per_device, plan.num_padding) == (4, 3, 2)
    assert result.samples["mu"].shape == (10, 100)
    assert set(result.extra) == FIELDS
    for name, x in result.extra.items():
        assert x.shape == (10, 100), name
    assert result.extra["diverging"].dtype == bool
    np.testing.assert_array_equal(
        result.extra["tree_depth"], np.log2(result.extra["num_steps"]).astype(int) + 1
    )
    assert np.all(result.extra["num_steps"] >= 1)
    assert result.get_samples(group_by_chain=False)["mu"].shape == (1000,)


def test_two_chains_on_eight_devices():
    result = cm.Sampler(normal_mean, num_chains=2, devices=8, **FAST).run(0, Y)
    assert result.plan.num_devices == 2 and result.plan.num_padding == 0
    assert result.samples["mu"].shape == (2, 100)


def test_chain_draws_independent_of_device_count():
    eight = cm.Sampler(normal_mean, num_chains=8, devices=8, **FAST).run(3, Y)
    four = cm.Sampler(normal_mean, num_chains=4, devices=4, **FAST).run(3, Y)
    np.testing.assert_array_equal(eight.samples["mu"][:4], four.samples["mu"])
    for name in EXTRA_FIELDS:
        np.testing.assert_array_equal(eight.extra[name][:4], four.extra[name])
    assert not np.array_equal(eight.samples["mu"][0], eight.samples["mu"][1])


def test_draws_independent_of_chunk_size():
    X, y = linreg_data()
    base = cm.Sampler(linreg, num_chains=4, devices=2, **FAST).run(0, X, y)
    small = cm.Sampler(linreg, num_chains=4, devices=2, chunk_size=7, **FAST)
    chunked = small.run(0, X, y)
    for name in base.samples:
        np.testing.assert_array_equal(base.samples[name], chunked.samples[name])


def test_second_run_on_new_data_does_not_compile(count_compiles):
    X, y = linreg_data(seed=0)
    sampler = cm.Sampler(linreg, num_chains=4, devices=2, **FAST)
    first = sampler.run(0, X, y)
    X2, y2 = linreg_data(seed=1)
    with count_compiles() as c:
        second = sampler.run(1, X2, y2)
    assert c.count == 0
    assert second.stats["compilations"] == 0 and second.stats["compile_s"] == 0
    assert not np.array_equal(first.samples["beta"], second.samples["beta"])
    with count_compiles() as c:  # a new Sampler, same model and config: cached too
        cm.sample(linreg, X2, y2, seed=2, num_chains=4, devices=2, **FAST)
    assert c.count == 0


def test_conjugate_posterior_within_mcse():
    result = cm.Sampler(
        normal_mean, num_chains=8, num_warmup=300, num_samples=500, progress_bar=False
    ).run(7, Y)
    exact_mean, exact_sd = normal_mean_posterior(Y)
    draws = result.samples["mu"]
    ess = cm.diagnostics.ess_bulk(draws)
    assert ess > 1000
    assert abs(draws.mean() - exact_mean) <= 4 * exact_sd / np.sqrt(ess)
    assert abs(draws.std() - exact_sd) <= 0.1 * exact_sd
    assert cm.diagnostics.r_hat(draws) < 1.01
    assert result.stats["divergences"] == 0


def test_thinning_keeps_every_kth_transition():
    kw = {**FAST, "num_samples": 100, "num_chains": 2, "devices": 2}
    full = cm.Sampler(normal_mean, **kw).run(0, Y)
    thinned = cm.Sampler(normal_mean, thinning=3, **kw).run(0, Y)
    assert thinned.samples["mu"].shape == (2, 33)
    # 100 % 3 = 1 transition is skipped, then the last of each group of 3.
    np.testing.assert_array_equal(
        thinned.samples["mu"], full.samples["mu"][:, 1 + 3 * np.arange(1, 34) - 1]
    )


def test_stats_leave_padding_chains_out():
    """10 chains on 4 devices run 2 padding chains: chains 10 and 11 of the
    same seed, in blocks of 3, exactly as a 12-chain run does."""
    ten = cm.Sampler(normal_mean, num_chains=10, devices=4, **FAST).run(0, Y)
    twelve = cm.Sampler(normal_mean, num_chains=12, devices=4, **FAST).run(0, Y)
    np.testing.assert_array_equal(ten.samples["mu"], twelve.samples["mu"][:10])
    steps = twelve.extra["num_steps"].astype(np.int64)
    assert ten.stats["leapfrog_steps"] == steps[:10].sum() < steps.sum()
    assert twelve.stats["leapfrog_steps"] == steps.sum()
    paid = 3 * device_blocks(steps, 4).max(axis=1).sum()
    assert ten.stats["lockstep_steps"] == twelve.stats["lockstep_steps"] == paid
    assert ten.stats["lockstep_efficiency"] == pytest.approx(steps[:10].sum() / paid)
    assert ten.stats["divergences"] == twelve.extra["diverging"][:10].sum()
    # The bound: per chunk (one here: 100 draws), lanes x the longest chain's
    # total; padding lanes run and count there too.
    bound = 3 * device_blocks(steps, 4).sum(axis=2).max(axis=1).sum()
    assert ten.stats["lockstep_bound"] == pytest.approx(steps[:10].sum() / bound)
    assert twelve.stats["lockstep_bound"] >= twelve.stats["lockstep_efficiency"]


def test_inner_map_pays_for_padding_lanes_only():
    """Under lax.map no chain waits for another: the device pays every lane's
    own steps, padding lanes included, and nothing more."""
    kw = {"devices": 4, "inner": "map", **FAST}
    ten = cm.Sampler(normal_mean, num_chains=10, **kw).run(0, Y)
    twelve = cm.Sampler(normal_mean, num_chains=12, **kw).run(0, Y)
    steps = twelve.extra["num_steps"].astype(np.int64)
    assert ten.stats["leapfrog_steps"] == steps[:10].sum()
    assert ten.stats["lockstep_steps"] == steps.sum()
    assert twelve.stats["lockstep_efficiency"] == 1.0
    assert ten.stats["lockstep_efficiency"] == pytest.approx(
        steps[:10].sum() / steps.sum()
    )


def test_stats_count_thinned_transitions():
    kw = {**FAST, "num_chains": 4, "devices": 2}
    full = cm.Sampler(nan_beyond_one, **kw).run(0, np.float32(1.0))
    thinned = cm.Sampler(nan_beyond_one, thinning=4, **kw).run(0, np.float32(1.0))
    steps, diverging = full.extra["num_steps"], full.extra["diverging"]
    assert thinned.stats["leapfrog_steps"] == steps.astype(np.int64).sum()
    assert thinned.stats["divergences"] == diverging.sum()
    assert thinned.stats["divergences"] > thinned.extra["diverging"].sum() > 0


def test_counters_do_not_overflow_int32():
    """4096 chains x 1023 steps x 100 draws overflows int32; two words do not."""
    per_step = 2**31 - 2**20 - 1  # the largest a transition may add

    @jax.jit
    def count(acc):
        step = jnp.full(len(COUNTERS), per_step, jnp.int32)
        return jax.lax.fori_loop(0, 1000, lambda _, a: _add_wide(a, step), acc)

    words = count(jnp.zeros((len(COUNTERS), 2), jnp.int32))
    assert wide_total(words) == [1000 * per_step] * len(COUNTERS)
    assert wide_total(np.stack([words, words])) == [2000 * per_step] * len(COUNTERS)


def nan_beyond_one(scale):
    """A standard normal whose density is NaN for x > 1: divergences."""
    x = numpyro.sample("x", dist.Normal(0.0, scale))
    numpyro.factor("hole", jnp.where(x > 1.0, jnp.nan, 0.0))


DENSE_Z = 4.5
"""Standard errors allowed per correlation check: 12 per-chain checks plus 3
pooled ones, and each chain's last window mixes a little differently, so the
errors' tails are heavier than normal (largest |z| in 120 chains, seeds 0-29:
3.5 for a correlation, 3.5 for an sd)."""


def test_dense_mass_learns_the_covariance():
    sd = np.array([1.0, 10.0, 0.1])
    corr = np.array([[1.0, 0.95, -0.5], [0.95, 1.0, -0.6], [-0.5, -0.6, 1.0]])
    cov = (corr * np.outer(sd, sd)).astype(np.float32)
    num_warmup, num_samples = 1000, 1000
    result = cm.Sampler(
        correlated,
        num_chains=4,
        devices=4,
        dense_mass=True,
        num_warmup=num_warmup,
        num_samples=num_samples,
        progress_bar=False,
    ).run(0, cov)
    draws = result.samples["x"].astype(np.float64)  # (chains, draws, 3)
    x = draws.reshape(-1, 3)
    ess = min(cm.diagnostics.ess_bulk(draws[..., j]) for j in range(3))
    assert ess > 1500  # a dense metric makes this Gaussian easy
    z = (x.mean(0)) / (sd / np.sqrt(ess))
    assert np.all(np.abs(z) < 4), z
    # A correlation estimated from n effective draws has a standard error of
    # about (1 - rho^2) / sqrt(n). The estimate is a mean of the products of
    # the standardized coordinates, so n counts those products' ESS.
    std = (draws - x.mean(0)) / x.std(0)
    pairs = [(0, 1), (0, 2), (1, 2)]
    prod_ess = [cm.diagnostics.ess_bulk(std[..., i] * std[..., j]) for i, j in pairs]
    rows, cols = zip(*pairs, strict=True)
    rho = corr[rows, cols]
    found = np.corrcoef(x, rowvar=False)[rows, cols]
    pooled_se = (1 - rho**2) / np.sqrt(prod_ess)
    assert np.all(np.abs(found - rho) <= DENSE_Z * pooled_se), (found, pooled_se)
    np.testing.assert_allclose(x.std(0), sd, rtol=0.1)
    (inverse_mass,) = result.state.adapt_state.inverse_mass_matrix.values()
    assert inverse_mass.shape == (4, 3, 3)  # dense, one per chain
    # Each chain's metric is the covariance of its draws in the last slow
    # window of warmup (500 draws here). n: that window's length times the
    # products' ESS per draw after warmup (at most 1); the window runs on a
    # slightly worse metric, which the margin of DENSE_Z covers.
    last = build_adaptation_schedule(num_warmup)[-2]
    per_draw = min(1.0, min(prod_ess) / draws.shape[0] / num_samples)
    n = (last.end - last.start + 1) * per_draw
    for m in np.asarray(inverse_mass, np.float64):  # the metric is the covariance
        learned = (m / np.sqrt(np.outer(np.diag(m), np.diag(m))))[rows, cols]
        assert np.all(np.abs(learned - rho) <= DENSE_Z * (1 - rho**2) / np.sqrt(n))
        # The sd of a normal from n draws: relative standard error 1 / sqrt(2n).
        rtol = DENSE_Z / np.sqrt(2 * n)
        np.testing.assert_allclose(np.sqrt(np.diag(m)), sd, rtol=rtol)


@pytest.mark.parametrize("strategy", ["init_to_sample", "init_to_uniform"])
def test_init_strategies_end_to_end(strategy):
    sampler = cm.Sampler(
        normal_mean, num_chains=4, devices=2, init_strategy=strategy, **FAST
    )
    state = sampler.init(0, Y)
    start = np.asarray(state.z["mu"])
    assert len(set(start.tolist())) == 4  # each chain starts somewhere else
    if strategy == "init_to_uniform":
        assert np.all(np.abs(start) < 2)  # uniform on (-2, 2), unconstrained
    else:
        assert np.std(start) > 1  # draws from the N(0, 10) prior
    result = sampler.run(0, Y)
    exact_mean, exact_sd = normal_mean_posterior(Y)
    draws = result.samples["mu"]
    ess = cm.diagnostics.ess_bulk(draws)
    assert abs(draws.mean() - exact_mean) <= 4 * exact_sd / np.sqrt(ess)


def test_init_params_per_chain_and_broadcast():
    sampler = cm.Sampler(
        scale_model, num_chains=3, devices=2, init_strategy="init_to_value", **FAST
    )
    state = sampler.init(0, Y, init_params={"sigma": np.array([0.5, 1.0, 2.0])})
    # chain 3 is padding and reuses chain 0's value; z is unconstrained (log).
    np.testing.assert_allclose(
        np.exp(np.asarray(state.z["sigma"])), [0.5, 1.0, 2.0, 0.5], rtol=1e-6
    )
    state = sampler.init(0, Y, init_params={"sigma": 1.5})
    np.testing.assert_allclose(np.exp(np.asarray(state.z["sigma"])), 1.5, rtol=1e-6)


def test_deterministic_sites_and_keyword_data():
    X, y = linreg_data()
    result = cm.Sampler(linreg, num_chains=4, devices=2, **FAST).run(0, X, y=y)
    beta, total = result.samples["beta"], result.samples["beta_sum"]
    assert beta.shape == (4, 100, 3) and total.shape == (4, 100)
    np.testing.assert_allclose(total, beta.sum(-1), rtol=1e-5, atol=1e-6)
    assert np.all(result.samples["sigma"] > 0)


def test_seed_forms_agree():
    sampler = cm.Sampler(normal_mean, num_chains=2, devices=2, **FAST)
    by_int = sampler.run(5, Y).samples["mu"]
    by_key = sampler.run(jax.random.PRNGKey(5), Y).samples["mu"]
    by_typed = sampler.run(jax.random.key(5), Y).samples["mu"]
    np.testing.assert_array_equal(by_int, by_key)
    np.testing.assert_array_equal(by_int, by_typed)


@pytest.mark.slow
def test_float64():
    X, y = linreg_data()
    kw = {
        "num_chains": 4,
        "devices": 2,
        "num_warmup": 300,
        "num_samples": 400,
        "progress_bar": False,
    }
    single = cm.Sampler(linreg, **kw).run(0, X, y)
    jax.config.update("jax_enable_x64", True)
    try:
        double = cm.Sampler(linreg, **kw).run(
            0, X.astype(np.float64), y.astype(np.float64)
        )
    finally:
        jax.config.update("jax_enable_x64", False)
    assert double.samples["beta"].dtype == np.float64
    assert single.samples["beta"].dtype == np.float32
    for k in range(3):
        a, b = single.samples["beta"][..., k], double.samples["beta"][..., k]
        se = np.hypot(
            a.std() / np.sqrt(cm.diagnostics.ess_bulk(a)),
            b.std() / np.sqrt(cm.diagnostics.ess_bulk(b)),
        )
        assert abs(a.mean() - b.mean()) <= 4 * se


def test_cache_key_names_the_platform():
    """cuda:0 and cpu:0 share id 0; the key must tell them apart."""
    sampler = cm.Sampler(normal_mean, num_chains=2, devices=2, **FAST)
    _, _, _, mesh, _, _ = sampler._cache_key(())
    assert mesh[2] == (("cpu", 0), ("cpu", 1))
