"""NUTS with ``metric="fisher"`` / ``"lowrank"`` (``kernels.metric_nuts``):
per chain and pooled over the mesh, through the Sampler's paths."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import correlated
from numpyro.diagnostics import effective_sample_size

import chainmesh as cm
from chainmesh.kernels import metrics

CORR = np.array([[1.0, 0.95, 0.0, -0.6], [0.95, 1.0, 0.1, -0.5],
                 [0.0, 0.1, 1.0, 0.0], [-0.6, -0.5, 0.0, 1.0]])  # fmt: skip
SDS = np.array([1.0, 10.0, 0.1, 3.0])
COV = (CORR * np.outer(SDS, SDS)).astype(np.float32)
BASE = {"num_warmup": 300, "num_samples": 200, "chunk_size": 50}
"""300 warmup transitions: three slow windows (25, 50, 100 transitions)."""


def run(seed=0, cov=COV, **options):
    config = {"num_chains": 8, "devices": 4, "progress_bar": False, **BASE}
    return cm.Sampler(correlated, **{**config, **options}).run(seed, cov)


def metric_of(result, chain: int) -> metrics.Metric:
    m = result.state.adapt.metric
    return jax.tree.map(lambda a: np.asarray(a[chain], np.float64), m)


def dense(m: metrics.Metric) -> np.ndarray:
    s, U, lam = m
    return s[:, None] * (np.eye(len(s)) + (U * (lam - 1)) @ U.T) * s[None, :]


def condition(estimate: np.ndarray, cov: np.ndarray) -> float:
    """Condition number of ``cov`` whitened by ``estimate``: 1 when equal."""
    vals, vecs = np.linalg.eigh(estimate)
    inv_half = (vecs / np.sqrt(vals)) @ vecs.T
    ev = np.linalg.eigvalsh(inv_half @ cov @ inv_half)
    return float(ev.max() / ev.min())


@pytest.fixture(scope="module", params=["chain", "ensemble"])
def lowrank(request):
    return request.param, run(metric="lowrank", adapt=request.param)


def test_the_lowrank_metric_learns_the_correlations(lowrank):
    """The marginal scales differ 100x and two coordinates correlate 0.95:
    the diagonal of the true covariance leaves condition number 46; every
    chain's learned metric leaves under 4."""
    adapt, result = lowrank
    assert condition(np.diag(np.diag(COV)), COV) > 40
    for chain in range(8):
        assert condition(dense(metric_of(result, chain)), COV) < 4, chain
    leaves = [np.asarray(a) for a in result.state.adapt.metric]
    same = all((leaf == leaf[:1]).all() for leaf in leaves)
    # Pooled: one metric on every chain; per chain: each its own estimate.
    assert same == (adapt == "ensemble")


def test_draws_match_the_gaussian(lowrank):
    """Means within 4.5 Monte-Carlo standard errors of 0, sds within 4.5
    standard errors of the truth (the sd's error from the ESS of x**2)."""
    _, result = lowrank
    x = np.asarray(result.samples["x"], np.float64)  # (chains, draws, 4)
    ess = effective_sample_size(x)
    np.testing.assert_array_less(np.abs(x.mean((0, 1))), 4.5 * SDS / np.sqrt(ess))
    var = x.var((0, 1))
    ess2 = effective_sample_size(x**2)
    var_se = np.sqrt(2.0) * SDS**2 / np.sqrt(ess2)
    np.testing.assert_array_less(np.abs(var - SDS**2), 4.5 * var_se)
    assert result.extra["diverging"].sum() == 0


def test_resume_mid_warmup_is_bitwise(lowrank, tmp_path, monkeypatch):
    """Interrupted after 150 of 300 warmup transitions (inside the second
    slow window, buffers half filled): the resumed run is bitwise the
    uninterrupted one, metric included."""
    adapt, result = lowrank
    options = {"checkpoint_dir": str(tmp_path), "checkpoint_every": 1}
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupted):
            run(metric="lowrank", adapt=adapt, **options)
    resumed = cm.Sampler(
        correlated, num_chains=8, devices=4, progress_bar=False, metric="lowrank",
        adapt=adapt, **BASE, **options,
    ).run(0, COV, resume=True)  # fmt: skip
    assert_same_draws(result, resumed)
    for chain in range(8):
        pairs = zip(metric_of(result, chain), metric_of(resumed, chain), strict=True)
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)


def test_thinning_keeps_every_kth_draw(lowrank):
    adapt, result = lowrank
    thinned = run(metric="lowrank", adapt=adapt, thinning=4)
    assert thinned.samples["x"].shape == (8, 50, 4)
    np.testing.assert_array_equal(thinned.samples["x"], result.samples["x"][:, 3::4])


@pytest.mark.parametrize("metric", ["fisher", "lowrank"])
def test_padding_chains_never_enter_the_pooled_metric(metric):
    """7 chains on 4 devices x 2: the padding chain starts from another
    point with one seed than with one key per chain; the real chains and
    the metric are bitwise equal only if it never reaches a pooled sum."""
    root = jax.random.key(0)
    keys = jnp.stack([jax.random.fold_in(root, i) for i in range(7)])
    sampler = cm.Sampler(
        correlated, num_chains=7, devices=4, progress_bar=False, metric=metric,
        adapt="ensemble", init_strategy="init_to_uniform", **BASE,
    )  # fmt: skip
    assert sampler.plan.num_padding == 1
    one, many = sampler.run(root, COV), sampler.run(keys, COV)
    assert_same_draws(one, many)
    jax.tree.map(np.testing.assert_array_equal, metric_of(one, 0), metric_of(many, 0))


@pytest.mark.parametrize("adapt", ["chain", "ensemble"])
def test_each_data_set_learns_its_own_metric(adapt):
    """BatchSampler, 2 data sets x 4 chains on 2 devices, the second data
    set's covariance 1e4 times the first's. The low-rank metric is scale
    equivariant, so both learn the same whitened geometry: step sizes
    within 2x of each other (a metric pooled over both data sets would be
    100x off for one of them), and each data set's draws have its own sds.
    (Not bitwise against single runs: vectorized over data sets, XLA
    rounds the low-rank estimate differently in the last bit, and NUTS
    trajectories amplify it.)"""
    covs = np.stack([COV, COV * 1e4])
    config = {**BASE, "num_chains": 4, "metric": "lowrank", "adapt": adapt,
              "progress_bar": False}  # fmt: skip
    out = cm.BatchSampler(correlated, num_datasets=2, devices=2, **config).run(0, covs)
    steps = out.extra["step_size"][:, :, -1].mean(1)
    assert 0.5 < steps[0] / steps[1] < 2.0, steps
    for k, sds in enumerate((SDS, SDS * 100)):
        x = np.asarray(out.samples["x"][k], np.float64)
        ess2 = effective_sample_size(x**2)
        var_se = np.sqrt(2.0) * sds**2 / np.sqrt(ess2)
        np.testing.assert_array_less(np.abs(x.var((0, 1)) - sds**2), 4.5 * var_se)


def shifted(loc, scale):
    """Independent normals: mean ``loc``, sd ``scale``."""
    numpyro.sample("x", dist.Normal(loc, scale))


@pytest.mark.parametrize("adapt", ["chain", "ensemble"])
def test_fisher_metric_is_the_variance_far_from_zero(adapt):
    """Independent coordinates with sds from 0.01 to 100 and means 1e4 sds
    from zero (float32): var(x) / var(grad) is sd**4, so the Fisher inverse
    mass is the variance. Per chain (about 100 draws in the last window)
    within 40%; pooled over 8 chains within 15%. Summed about zero instead
    of a running mean, float32 would lose the variance entirely. One chain
    alone sits still in its sd-100 coordinate through the first window
    (float32 resolves 0.06 at 1e6; its steps are sized for the sd 0.01):
    that coordinate keeps its previous scale, where a Fisher scale of 0
    (clipped to 1e-20) would freeze it for good."""
    scale = np.logspace(-2, 2, 5).astype(np.float32)
    loc = 1e4 * scale
    result = cm.Sampler(
        shifted, num_chains=8, devices=4, progress_bar=False, metric="fisher",
        adapt=adapt, init_strategy="init_to_median", **BASE,
    ).run(0, loc, scale)  # fmt: skip
    tol = 0.4 if adapt == "chain" else 0.15
    for chain in range(8):
        inv_mass = metric_of(result, chain).scale ** 2
        np.testing.assert_allclose(inv_mass, scale.astype(np.float64) ** 2, rtol=tol)
    x = np.asarray(result.samples["x"], np.float64)
    ess = effective_sample_size(x)
    mcse = scale / np.sqrt(ess)
    np.testing.assert_array_less(np.abs(x.mean((0, 1)) - loc), 4.5 * mcse)


def test_arviz_sample_stats(lowrank):
    _, result = lowrank
    stats = result.to_arviz().sample_stats
    for name in ("lp", "energy", "diverging", "acceptance_rate", "n_steps"):
        assert stats[name].shape == (8, 200), name
    np.testing.assert_array_equal(stats["n_steps"].values, result.extra["num_steps"])
    np.testing.assert_array_equal(stats["step_size"].values, result.extra["step_size"])


def test_consensus_with_pooled_lowrank_matches_the_full_posterior():
    """CMC over 4 shards, each adapting its own pooled low-rank metric (never
    across shards): the combined draws match the conjugate posterior."""
    from test_cmc import CONFIG, K, exact, regression

    from chainmesh import cmc

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1001, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -0.5, 0.2]) + rng.normal(size=1001)).astype(np.float32)
    shards = cmc.split(X, y, num_shards=K)
    result = cmc.sample(
        regression, shards, seed=0, metric="lowrank", adapt="ensemble", **CONFIG
    )
    mean, cov = exact(X, y)
    sd = np.sqrt(np.diag(cov))
    chains = result.combined["beta"].reshape(CONFIG["num_chains"], -1, 3)
    for j in range(3):
        ess = cm.diagnostics.ess_bulk(chains[..., j])
        error = abs(chains[..., j].mean() - mean[j])
        assert error <= 4 * sd[j] / np.sqrt(ess) + 0.02 * sd[j]
        assert abs(chains[..., j].std() - sd[j]) <= 0.1 * sd[j]
    for diag in result.diagnostics:
        assert diag["max_r_hat"] < 1.01 and diag["divergences"] == 0


@pytest.mark.parametrize("metric", ["fisher", "lowrank"])
@pytest.mark.parametrize("adapt", ["chain", "ensemble"])
def test_adaptation_stops_after_warmup(metric, adapt):
    """Every sampling draw of a chain uses the step size warmup ended with,
    and the metric does not move: the update runs only while ``i <
    num_warmup`` (it once compared the transition index after clamping it to
    the last warmup transition, so it kept adapting while sampling)."""
    config = {**BASE, "num_warmup": 150, "num_samples": 100}
    result = run(metric=metric, adapt=adapt, **config)
    steps = result.extra["step_size"]
    np.testing.assert_array_equal(steps, np.broadcast_to(steps[:, :1], steps.shape))
    short = run(metric=metric, adapt=adapt, **{**config, "num_samples": 10})
    np.testing.assert_array_equal(short.extra["step_size"][:, 0], steps[:, 0])
    jax.tree.map(
        np.testing.assert_array_equal,
        result.state.adapt.metric,
        short.state.adapt.metric,
    )
