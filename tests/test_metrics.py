"""Metrics in O(d k) and their estimators, against dense algebra, BlackJAX 1.7
and a NumPy transcription of nutpie's (nuts-rs) low-rank estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.adaptation.metric_estimators import (
    fisher_score_diagonal,
    fisher_score_low_rank,
)
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import correlated
from numpyro.infer.hmc_util import build_adaptation_schedule

import chainmesh as cm
from chainmesh.kernels import metric_window, metrics
from chainmesh.kernels.ensemble import welford_batch, welford_init, welford_merge

lowrank = jax.jit(metrics.lowrank, static_argnames="rank")


def dense(m: metrics.Metric) -> np.ndarray:
    """``Sigma`` as a d x d matrix."""
    s, U, lam = (np.asarray(a, np.float64) for a in m)
    return s[:, None] * (np.eye(len(s)) + (U * (lam - 1)) @ U.T) * s[None, :]


def factor_gaussian(rng, n: int, d: int, loc: float = 0.0):
    """Draws and gradients of log p of a Gaussian with two strong directions
    (variances x25 and /25) on uneven marginal scales."""
    V = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    s = np.exp(rng.uniform(-1.5, 1.5, d))
    core = np.eye(d) + V @ np.diag([24.0, 1 / 25 - 1]) @ V.T
    cov = s[:, None] * core * s[None, :]
    x = rng.multivariate_normal(np.zeros(d), cov, size=n)
    return x + loc, -np.linalg.solve(cov, x.T).T, cov


def random_metric(rng, d: int, k: int) -> metrics.Metric:
    U = np.linalg.qr(rng.normal(size=(d, k)))[0]
    U[:, -1] = 0.0  # an inactive column
    lam = np.exp(rng.normal(size=k))
    lam[0] = 1.0  # an identity direction
    scale = np.exp(rng.normal(size=d))
    return metrics.Metric(*(jnp.asarray(a, jnp.float32) for a in (scale, U, lam)))


def welford_of(rows: np.ndarray, batch: int = 16):
    """Pooled moments of ``rows`` fed as lanes of ``batch`` per transition,
    about a running shift that starts at the first row."""
    w = welford_init(rows.shape[1], rows.dtype)._replace(mean=jnp.asarray(rows[0]))
    for start in range(0, len(rows), batch):
        chunk = jnp.asarray(rows[start : start + batch])
        sums = jax.tree.map(lambda a: a.sum(0), welford_batch(w, chunk))
        w = welford_merge(w, sums)
    return w


def nutpie_reference(draws, grads, rank, gamma=1e-5, cutoff=2.0):
    """nuts-rs ``LowRankMassMatrixStrategy::compute_update`` in NumPy float64
    (full principal subspaces, every eigenvalue outside the band kept), then
    the ``rank`` pairs farthest from 1 in log scale."""
    x, g = draws.T.astype(np.float64), grads.T.astype(np.float64)  # (d, n)
    var_x, var_g = x.var(1), g.var(1)
    sigma = (var_x / var_g) ** 0.25
    x = (x - x.mean(1, keepdims=True)) / sigma[:, None]
    g = (g - g.mean(1, keepdims=True)) * sigma[:, None]
    ux = np.linalg.svd(x, full_matrices=False)[0]
    ug = np.linalg.svd(g, full_matrices=False)[0]
    q = np.linalg.qr(np.concatenate([ux, ug], 1))[0]
    px, pg = q.T @ x, q.T @ g
    cx = px @ px.T / gamma + np.eye(len(q.T))
    cg = pg @ pg.T / gamma + np.eye(len(q.T))
    e, u = np.linalg.eigh(cg)
    half, inv_half = (u * e**0.5) @ u.T, (u * e**-0.5) @ u.T
    me, mu = np.linalg.eigh(half @ cx @ half)
    vals, vecs = np.linalg.eigh(inv_half @ ((mu * me**0.5) @ mu.T) @ inv_half)
    keep = (vals > cutoff) | (vals < 1 / cutoff)
    vals, vecs = vals[keep], q @ vecs[:, keep]
    top = np.argsort(-np.abs(np.log(vals)))[:rank]
    return sigma, vecs[:, top], vals[top]


def test_operations_equal_the_dense_matrices():
    rng = np.random.default_rng(0)
    d, k = 9, 4
    m = random_metric(rng, d, k)
    sigma = dense(m)
    s, U, lam = (np.asarray(a, np.float64) for a in m)
    root = s[:, None] * (np.eye(d) + (U * (lam**0.5 - 1)) @ U.T)  # L, Sigma = L L^T
    np.testing.assert_allclose(root @ root.T, sigma, rtol=1e-5, atol=1e-6)
    p = rng.normal(size=(5, d)).astype(np.float32)
    tol = {"rtol": 2e-4, "atol": 1e-4}
    np.testing.assert_allclose(metrics.velocity(m, p), p @ sigma, **tol)
    energy = 0.5 * np.einsum("ni,ij,nj->n", p, sigma, p)
    np.testing.assert_allclose(metrics.kinetic_energy(m, p), energy, **tol)
    np.testing.assert_allclose(
        metrics.momentum(m, p), np.linalg.solve(root.T, p.T).T, **tol
    )
    np.testing.assert_allclose(
        metrics.whiten(m, p), np.linalg.solve(root, p.T).T, **tol
    )
    np.testing.assert_allclose(metrics.whitened_velocity(m, p), p @ root, **tol)
    np.testing.assert_allclose(metrics.inverse_mass_diagonal(m), np.diag(sigma), **tol)
    diag = metrics.diagonal(jnp.asarray(np.diag(sigma), jnp.float32), rank=3)
    np.testing.assert_allclose(dense(diag), np.diag(np.diag(sigma)), rtol=1e-5)


def test_momentum_draws_have_covariance_the_mass_matrix():
    rng = np.random.default_rng(1)
    d, n = 6, 40_000
    m = random_metric(rng, d, 3)
    keys = jax.random.split(jax.random.key(0), n)
    p = np.asarray(jax.vmap(metrics.draw_momentum, (0, None))(keys, m), np.float64)
    mass = np.linalg.inv(dense(m))
    cov = p.T @ p / n  # the mean is known to be 0
    se = np.sqrt((np.outer(np.diag(mass), np.diag(mass)) + mass**2) / n)
    assert np.all(np.abs(cov - mass) < 5 * se), np.max(np.abs(cov - mass) / se)


def test_fisher_from_pooled_moments_equals_blackjax():
    rng = np.random.default_rng(2)
    draws, grads, _ = factor_gaussian(rng, 400, 7)
    with jax.enable_x64(True):
        wx, wg = welford_of(draws), welford_of(grads)
        ours = metrics.inverse_mass_diagonal(metrics.fisher(wx, wg))
        theirs = fisher_score_diagonal(jnp.asarray(draws), jnp.asarray(grads))
        np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_fisher_is_accurate_in_float32_far_from_zero():
    """Mean / sd >= 1e4: moments about a running shift do not cancel."""
    rng = np.random.default_rng(3)
    draws, grads, _ = factor_gaussian(rng, 512, 5, loc=3e4)
    exact = np.sqrt(draws.var(0) / grads.var(0))
    f32 = (draws.astype(np.float32), grads.astype(np.float32))
    pooled = metrics.inverse_mass_diagonal(metrics.fisher(*map(welford_of, f32)))
    np.testing.assert_allclose(pooled, exact, rtol=1e-3)
    matrix = lowrank(*map(jnp.asarray, f32), rank=2)
    np.testing.assert_allclose(np.asarray(matrix.scale) ** 2, exact, rtol=1e-3)


def test_lowrank_equals_blackjax():
    """The rank cap does not bind: the same metric as BlackJAX 1.7.1's
    ``fisher_score_low_rank`` (a truncated subspace of 2 x rank columns)."""
    rng = np.random.default_rng(4)
    draws, grads, _ = factor_gaussian(rng, 2000, 30)
    with jax.enable_x64(True):
        x, g = jnp.asarray(draws), jnp.asarray(grads)
        ours = lowrank(x, g, rank=4)
        theirs = jax.jit(fisher_score_low_rank, static_argnames="max_rank")(
            x, g, max_rank=4
        )
        assert int((np.asarray(ours.lam) != 1).sum()) == 2  # the two factors
        np.testing.assert_allclose(ours.scale, theirs.sigma, rtol=1e-10)
        np.testing.assert_allclose(dense(ours), dense(theirs), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-7), (np.float32, 2e-3)])
def test_lowrank_equals_nutpie_when_the_rank_binds(dtype, rtol):
    """Correlated draws in d = 8, rank 4: the subspace is all of R^d (as in
    nuts-rs), more than 4 eigenvalues lie outside the band, the 4 farthest
    from 1 in log scale are kept."""
    rng = np.random.default_rng(5)
    d, rank = 8, 4
    a = rng.normal(size=(d, d))
    cov = a @ a.T + 0.05 * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov, size=300)
    grads = -np.linalg.solve(cov, x.T).T
    sigma, U, lam = nutpie_reference(x, grads, rank)
    assert len(lam) == rank  # the cap binds: more than 4 were outside
    with jax.enable_x64(dtype == np.float64):
        ours = lowrank(jnp.asarray(x, dtype), jnp.asarray(grads, dtype), rank)
        got = dense(ours)
    want = dense(metrics.Metric(sigma, U, lam))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_masked_rows_do_not_enter_the_lowrank_estimate():
    rng = np.random.default_rng(6)
    draws, grads, _ = factor_gaussian(rng, 300, 10)
    junk = np.full((40, 10), np.nan)
    keep = np.r_[np.ones(300, bool), np.zeros(40, bool)]
    order = rng.permutation(340)
    stack = [np.concatenate([a, junk])[order] for a in (draws, grads)]
    masked = lowrank(*map(jnp.asarray, stack), rank=3, weights=keep[order])
    plain = lowrank(jnp.asarray(draws), jnp.asarray(grads), rank=3)
    np.testing.assert_allclose(dense(masked), dense(plain), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_warmup", [30, 150, 500])
def test_buffer_slots_spread_over_each_slow_window(num_warmup):
    slots = metric_window.buffer_slots(num_warmup)
    windows = build_adaptation_schedule(num_warmup)[1:-1]
    inside = np.zeros(len(slots), bool)
    for w in windows:
        picks = np.nonzero(slots[w.start : w.end + 1] >= 0)[0] + w.start
        count = min(metric_window.BUFFER, w.end - w.start + 1)
        assert (picks[0], picks[-1], len(picks)) == (w.start, w.end, count)
        assert sorted(slots[picks]) == list(range(count))
        inside[w.start : w.end + 1] = True
    assert (slots[~inside] == -1).all()


# metric= through the Sampler: checkpoints, data sets, thinning, padding, ArviZ.

CORR = np.array([[1.0, 0.95, 0.0, -0.6], [0.95, 1.0, 0.1, -0.5],
                 [0.0, 0.1, 1.0, 0.0], [-0.6, -0.5, 0.0, 1.0]])  # fmt: skip
SDS = np.array([1.0, 10.0, 0.1, 3.0])
COV = (CORR * np.outer(SDS, SDS)).astype(np.float32)
LOWRANK = {
    "kernel": "chees", "metric": "lowrank", "num_warmup": 100, "num_samples": 30,
    "chunk_size": 20, "progress_bar": False,
}  # fmt: skip
"""ChEES with the low-rank metric: 100 warmup transitions (three slow windows
of Stan's schedule, each ending in a metric update), in chunks of 20."""


def lowrank_run(seed=0, cov=COV, **options):
    """8 chains on 4 devices x 2 (unless ``options`` say otherwise)."""
    config = {"num_chains": 8, "devices": 4, **LOWRANK, **options}
    return cm.Sampler(correlated, **config).run(seed, cov)


def shared_metric(result) -> metrics.Metric:
    """The adapted metric of chain 0 (every chain holds the same)."""
    return jax.tree.map(lambda a: np.asarray(a[0]), result.state.adapt.metric)


@pytest.fixture(scope="module")
def lowrank_result():
    return lowrank_run()


def test_the_sampler_adapts_a_lowrank_metric(lowrank_result):
    m = lowrank_result.state.adapt.metric
    assert m.U.shape == (8, 4, 4) and m.lam.shape == (8, 4)
    for leaf in m:  # one metric, on every chain
        leaf = np.asarray(leaf)
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    s, _, lam = shared_metric(lowrank_result)
    assert (lam != 1.0).any()  # the correlations enter the low-rank part
    assert s.max() / s.min() > 10  # the scales enter the diagonal (sds 0.1..10)


def test_lowrank_resume_mid_warmup_is_bitwise(lowrank_result, tmp_path, monkeypatch):
    """Interrupted after 60 of 100 warmup transitions, inside a slow window
    whose draw buffers are half filled: the resumed run's draws and metric
    are the uninterrupted run's, bit for bit."""
    options = {"checkpoint_dir": str(tmp_path), "checkpoint_every": 1}
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupted):
            lowrank_run(**options)
    config = {"num_chains": 8, "devices": 4, **LOWRANK, **options}
    resumed = cm.Sampler(correlated, **config).run(0, COV, resume=True)
    assert_same_draws(lowrank_result, resumed)
    for a, b in zip(shared_metric(lowrank_result), shared_metric(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lowrank_thinning_keeps_every_kth_draw(lowrank_result):
    thinned = lowrank_run(thinning=3)
    assert thinned.samples["x"].shape == (8, 10, 4)
    np.testing.assert_array_equal(
        thinned.samples["x"], lowrank_result.samples["x"][:, 2::3]
    )
    for a, b in zip(shared_metric(lowrank_result), shared_metric(thinned), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lowrank_data_sets_equal_their_single_runs():
    """BatchSampler, 2 data sets x 4 chains on 2 devices (one data set per
    device): data set ``k`` of root key ``r`` runs, bit for bit, the single
    run seeded ``fold_in(r, k)`` with its 4 chains on one device, its metric
    pooled over its own chains only (the second data set's scales are 100x
    the first's: a metric pooled over both would differ). Fails when the
    estimate runs as one batched LAPACK call over the data sets (draws
    then differ by up to 5.5e-4 sd)."""
    root = jax.random.PRNGKey(0)
    covs = np.stack([COV, COV * 1e4])
    config = {**LOWRANK, "num_chains": 4}
    batch = cm.BatchSampler(correlated, num_datasets=2, devices=2, **config)
    out = batch.run(root, covs)
    single = cm.Sampler(correlated, devices=1, **config)
    for k in range(2):
        alone = single.run(jax.random.fold_in(root, k), covs[k])
        np.testing.assert_array_equal(out.samples["x"][k], alone.samples["x"])
        for field in ("step_size", "num_steps"):
            np.testing.assert_array_equal(out.extra[field][k], alone.extra[field])


def test_vectorized_lowrank_estimates_one_matrix_at_a_time():
    """Vectorized over data sets, the estimate loops: every SVD, QR and eigh
    in the program is of one matrix, and the results are the one-at-a-time
    estimates bit for bit. jaxlib's batched LAPACK kernels spread a batch
    over the CPU thread pool that runs the devices' programs and wait for
    it: a BatchSampler of 200 data sets on 8 CPU devices (25 per device)
    deadlocked in ``lapack_sgesdd_ffi`` (the SBC harness, chees-lowrank)."""
    rng = np.random.default_rng(3)
    pairs = [factor_gaussian(rng, 60, 6)[:2] for _ in range(3)]
    draws, grads = (np.stack(z).astype(np.float32) for z in zip(*pairs, strict=True))
    keep = rng.uniform(size=(3, 60)) < 0.6

    def estimate(x, g, w):
        return metrics.lowrank(x, g, 3, weights=w)

    vectorized = jax.vmap(estimate)
    decompositions = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("svd", "qr", "eigh"):
                decompositions.append(eqn.invars[0].aval.ndim)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(vectorized)(draws, grads, keep).jaxpr)
    assert len(decompositions) >= 4 and set(decompositions) == {2}
    together = jax.jit(vectorized)(draws, grads, keep)
    for k in range(3):
        alone = jax.jit(estimate)(draws[k], grads[k], keep[k])
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_array_equal(np.asarray(a)[k], b)


@pytest.mark.parametrize("metric", ["fisher", "lowrank"])
def test_padding_chains_never_enter_the_metric(metric):
    """7 chains on 4 devices x 2 run one padding chain: with one seed it
    starts from ``fold_in(root, 7)``'s init, with one key per chain from chain
    0's. The real chains' draws and the adapted metric are equal only if the
    padding chain never reaches a pooled statistic or a gathered buffer."""
    root = jax.random.key(0)
    keys = jnp.stack([jax.random.fold_in(root, i) for i in range(7)])
    config = {**LOWRANK, "metric": metric, "init_strategy": "init_to_uniform"}
    padded = cm.Sampler(correlated, num_chains=7, devices=4, **config)
    assert padded.plan.num_padding == 1
    one, many = padded.run(root, COV), padded.run(keys, COV)
    assert_same_draws(one, many)
    for a, b in zip(shared_metric(one), shared_metric(many), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lowrank_arviz_sample_stats(lowrank_result):
    idata = lowrank_result.to_arviz()
    stats = idata.sample_stats
    for name in (
        "lp",
        "energy",
        "diverging",
        "acceptance_rate",
        "n_steps",
        "step_size",
    ):
        assert stats[name].shape == (8, 30), name
    np.testing.assert_array_equal(
        stats["n_steps"].values, lowrank_result.extra["num_steps"]
    )
    np.testing.assert_array_equal(
        stats["lp"].values, -lowrank_result.extra["potential_energy"]
    )
    assert idata.posterior["x"].shape == (8, 30, 4)


def condition(estimate: np.ndarray, cov: np.ndarray) -> float:
    """Condition number of ``cov`` whitened by ``estimate``: 1 when equal."""
    vals, vecs = np.linalg.eigh(estimate)
    inv_half = (vecs / np.sqrt(vals)) @ vecs.T
    ev = np.linalg.eigvalsh(inv_half @ cov @ inv_half)
    return float(ev.max() / ev.min())


@pytest.mark.parametrize("far", ["stuck", "non-finite"])
def test_lowrank_survives_a_stuck_chain(far):
    """Two chains (the SBC harness runs two per data set): one moves, the
    other sat on one far-out point the whole window (every slot the same
    draw, gradients ~1e21 whose squares overflow float32), or returned
    non-finite gradients. The estimate is finite and fits the Gaussian no
    worse than the Fisher diagonal of the same rows in float64 (rows with a
    non-finite gradient dropped). Before: the overflowed squares gave zero
    scales and a NaN metric; eight schools' SBC, 2 chains per data set, had
    3 of 200 data sets whose step size collapsed and every draw diverged."""
    rng = np.random.default_rng(7)
    d, size = 10, metric_window.BUFFER
    draws, grads, cov = factor_gaussian(rng, size, d)
    point = np.full(d, 3.0)
    point[1] = 1e8
    stuck_x = np.tile(point, (size, 1))
    stuck_g = np.tile(-np.linalg.solve(cov, point) * 1e8, (size, 1))
    rows_x, rows_g = np.concatenate([draws, stuck_x]), np.concatenate([grads, stuck_g])
    if far == "non-finite":
        stuck_x, stuck_g = draws[::-1] + 1.0, np.full((size, d), np.inf)
        rows_x, rows_g = draws, grads
    buf = metric_window.DrawBuffer(
        *(
            jnp.asarray(np.stack(z), jnp.float32)
            for z in ((draws, stuck_x), (grads, stuck_g))
        ),
        jnp.ones((2, size), bool),
    )
    window = metric_window.window_init("lowrank", d, jnp.float32)
    previous = metric_window.initial_metric("lowrank", d, jnp.float32)
    got = metric_window.estimate(
        "lowrank", window, buf, jnp.ones(2, bool), None, previous
    )
    assert all(np.isfinite(np.asarray(a)).all() for a in got)
    rows_x, rows_g = (
        np.asarray(z, np.float32).astype(np.float64) for z in (rows_x, rows_g)
    )
    fisher = np.diag(np.sqrt(rows_x.var(0) / rows_g.var(0)))
    assert condition(dense(got), cov) <= condition(fisher, cov) * (1 + 1e-3)
