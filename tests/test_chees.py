"""ChEES-HMC over a mesh: correctness, device independence, padding, lockstep.

Every run is one ``jit(shard_map(...))`` program: ``init``, then a ``scan`` of
``step`` with per-lane keys ``fold_in(fold_in(root, chain), transition)``.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from models import correlated
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import potential_energy

import chainmesh as cm
from chainmesh.diagnostics import effective_sample_size
from chainmesh.examples import eight_schools, eight_schools_data
from chainmesh.kernels import (
    chees,
    chees_adapt,
    ensemble,
    hmc,
    mams,
    metric_window,
    metrics,
)
from chainmesh.mesh import CHAIN

SCALES = np.logspace(-1, 1, 10).astype(np.float32)
"""Standard deviations of the test Gaussian: two decades."""


def gaussian_potential(z: dict, scales=SCALES) -> jax.Array:
    return 0.5 * jnp.sum((z["x"] / scales) ** 2)


def block_program(potential, num_warmup: int, num_draws: int, module=chees, **options):
    """``(positions, chain_ids, real) -> (state, draws, info)`` for one block.

    ``draws`` (positions) and ``info`` have the transitions on axis 1; the
    lane keys are ``fold_in(fold_in(key(0), chain id), transition)``.
    ``module`` is the block kernel (``chees`` or ``mams``).
    """
    step = module.build_step(potential, num_warmup, **options)
    root = jax.random.key(0)
    metric = options.get("metric", "diag")

    def program(positions, chain_ids, real):
        state = module.init(positions, potential, metric=metric)

        def one(state, t):
            keys = jax.vmap(
                lambda c: jax.random.fold_in(jax.random.fold_in(root, c), t)
            )(chain_ids)
            state, info = step(keys, state, real)
            return state, (state.position, info)

        steps = jnp.arange(num_warmup + num_draws)
        state, (draws, info) = jax.lax.scan(one, state, steps)
        lanes_first = partial(jax.tree.map, partial(jnp.swapaxes, axis1=0, axis2=1))
        return state, lanes_first(draws), lanes_first(info)

    return program


def run(
    potential,
    positions: dict,
    num_warmup: int,
    num_draws: int,
    devices: int | None,
    real=None,
    chain_ids=None,
    metric: str = "diag",
    module=chees,
):
    """Run ChEES (or ``module``'s kernel) on ``devices`` (None: one block,
    no mesh); numpy results."""
    lanes = jax.tree.leaves(positions)[0].shape[0]
    real = np.ones(lanes, bool) if real is None else np.asarray(real)
    chain_ids = np.arange(lanes) if chain_ids is None else np.asarray(chain_ids)
    axis = None if devices is None else CHAIN
    program = block_program(
        potential, num_warmup, num_draws, module, axis_name=axis, metric=metric
    )
    args = (positions, chain_ids, real)
    if devices is None:
        out = jax.jit(program)(*args)
    else:
        mesh = Mesh(np.array(jax.devices()[:devices]), (CHAIN,))
        args = jax.device_put(args, NamedSharding(mesh, P(CHAIN)))
        fn = jax.shard_map(
            program, mesh=mesh, in_specs=P(CHAIN), out_specs=P(CHAIN), check_vma=False
        )
        out = jax.jit(fn)(*args)
    return jax.tree.map(np.asarray, out)


def uniform_init(chains: int, dim: int, seed: int = 1) -> np.ndarray:
    """NumPyro's init_to_uniform: uniform(-2, 2) in unconstrained space."""
    return np.random.default_rng(seed).uniform(-2, 2, (chains, dim)).astype(np.float32)


def assert_trees(a, b, rtol: float | None = None) -> None:
    """Leaves of ``a`` and ``b`` equal (bitwise, or to ``rtol``)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if rtol is None:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def shared(state: chees.ChEESState) -> chees.ChEESAdaptState:
    """The adaptation state of lane 0 (it is the same on every lane)."""
    return jax.tree.map(lambda x: x[0], state.adapt)


@pytest.fixture(scope="module")
def gaussian_run():
    """64 chains on 8 devices, 500 warmup + 1000 draws of the 10-d Gaussian."""
    return run(gaussian_potential, {"x": uniform_init(64, 10)}, 500, 1000, 8)


def test_gaussian_moments_and_mass_matrix(gaussian_run):
    state, draws, info = gaussian_run
    x = draws["x"][:, 500:]
    for j, scale in enumerate(SCALES):
        ess = effective_sample_size(x[..., j])
        assert ess > 5000, (j, ess)
        mcse = x[..., j].std() / np.sqrt(ess)
        assert abs(x[..., j].mean()) < 4 * mcse, (j, x[..., j].mean(), mcse)
        np.testing.assert_allclose(x[..., j].std(), scale, rtol=0.1)
    np.testing.assert_allclose(shared(state).inv_mass, SCALES**2, rtol=0.1)
    assert not info.diverging[:, 500:].any()
    assert 0.6 < info.accept_prob[:, 500:].mean() < 0.95
    assert np.unique(info.step_size[:, 500:]).size == 1  # frozen after warmup


def test_every_chain_takes_the_same_number_of_steps(gaussian_run):
    state, _, info = gaussian_run
    steps = info.num_steps
    assert (steps == steps[:1]).all()
    # After warmup: ceil(jitter * T / eps), the jitter a Halton number of t.
    a = shared(state)
    length, eps = np.exp(a.log_trajectory_length_avg), np.exp(a.log_step_size_avg)
    jitter = np.asarray(jax.vmap(chees.halton)(jnp.arange(500, 1500)))
    np.testing.assert_array_equal(steps[0, 500:], np.ceil(jitter * length / eps))
    assert np.unique(steps[0, 500:]).size >= 2  # the jitter varies the length


@pytest.mark.parametrize("metric", ["diag", "fisher", "lowrank"])
def test_adaptation_does_not_depend_on_the_device_split(metric):
    x = {"x": uniform_init(8, 10)}
    go = partial(run, gaussian_potential, x, 100, 20, metric=metric)
    one, four = go(1), go(4)
    # All 120 transitions: the pooled sums are bitwise equal, the rest agrees
    # to float rounding.
    assert_trees(shared(one[0]), shared(four[0]), rtol=1e-5)
    np.testing.assert_allclose(one[1]["x"], four[1]["x"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(one[2].num_steps, four[2].num_steps)
    block = go(None)  # no mesh, one block
    assert_trees(one, block)


@pytest.mark.parametrize("metric", ["diag", "lowrank"])
def test_padding_lanes_never_enter_the_adaptation(metric):
    x = uniform_init(6, 10)
    lanes = [0, 1, 2, None, 3, 4, 5, None]  # 4 devices x 2 lanes, 2 padding
    real = np.array([i is not None for i in lanes])
    ids = np.array([100 + j if i is None else i for j, i in enumerate(lanes)])

    def padded(values):
        rows = [x[i] if i is not None else values.pop() for i in lanes]
        positions = {"x": np.stack(rows)}
        return run(gaussian_potential, positions, 100, 20, 4, real, ids, metric=metric)

    full = partial(np.full, 10, dtype=np.float32)
    wild, tame = padded([full(1e6), full(np.nan)]), padded([x[0], x[1]])
    assert np.isnan(wild[0].potential_energy[3])  # NaN stays NaN
    np.testing.assert_array_equal(wild[1]["x"][real], tame[1]["x"][real])
    assert_trees(wild[0].adapt, tame[0].adapt)
    bare = run(gaussian_potential, {"x": x}, 100, 20, 3, metric=metric)  # none
    assert_trees(shared(wild[0]), shared(bare[0]), rtol=1e-5)
    np.testing.assert_allclose(wild[1]["x"][real], bare[1]["x"], rtol=1e-5, atol=1e-6)


def test_eight_schools_matches_numpyro_nuts():
    sigma, y = eight_schools_data().args
    potential = partial(potential_energy, eight_schools, (sigma,), {"y": y})
    z = uniform_init(64, 10, seed=3)
    init = {"mu": z[:, 0], "tau": z[:, 1], "theta_raw": z[:, 2:]}
    _, draws, info = run(potential, init, 500, 500, 8)
    assert info.diverging[:, 500:].mean() < 0.01
    ours = {"mu": draws["mu"][:, 500:], "tau": np.exp(draws["tau"][:, 500:])}

    mcmc = MCMC(
        NUTS(eight_schools),
        num_warmup=1000,
        num_samples=2000,
        num_chains=4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(0), sigma, y=y)
    ref = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    for name, expected in (("mu", 4.4), ("tau", 3.6)):
        a, b = ours[name], ref[name]
        mcse = [v.std() / np.sqrt(effective_sample_size(v)) for v in (a, b)]
        assert abs(a.mean() - b.mean()) < 4 * np.hypot(*mcse), name
        assert abs(a.mean() - expected) < 0.25, name


def test_shards_vmapped_on_a_device_pool_within_their_own_shard():
    """Two data shards per device, vmapped, pooling over "chain" only.

    Each shard adapts to its own target; the vmapped program rounds a few
    operations differently from a lone shard's, so only the first transitions
    agree to rounding (later ones diverge, as with psum, but stay correct).
    """
    scales = np.stack([SCALES, 3 * SCALES[::-1]])  # shard k's data
    x = np.stack([uniform_init(16, 10, seed=k) for k in range(2)])
    mesh = Mesh(np.array(jax.devices()[:4]), (CHAIN,))

    def shard(positions, ids, real, scale):
        potential = partial(gaussian_potential, scales=scale)
        return block_program(potential, 200, 0, axis_name=CHAIN)(positions, ids, real)

    fn = jax.shard_map(
        jax.vmap(shard, in_axes=(0, None, None, 0)),
        mesh=mesh,
        in_specs=(P(None, CHAIN), P(CHAIN), P(CHAIN), P()),
        out_specs=P(None, CHAIN),
        check_vma=False,
    )
    state, draws, _ = jax.jit(fn)({"x": x}, np.arange(16), np.ones(16, bool), scales)
    for k in range(2):
        inv_mass = np.asarray(state.adapt.inv_mass[k, 0])
        assert np.abs(np.log(inv_mass / scales[k] ** 2)).max() < np.log(1.6)
        potential = partial(gaussian_potential, scales=scales[k])
        alone = run(potential, {"x": x[k]}, 200, 0, 4)[1]["x"]
        np.testing.assert_allclose(
            np.asarray(draws["x"][k, :, :4]), alone[:, :4], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("module", [chees, mams], ids=["chees", "mams"])
def test_a_step_has_one_collective(module):
    """One all-gather, in the warmup update: none per leapfrog (MAMS:
    integrator) step, none else."""
    step = module.build_step(gaussian_potential, 30, axis_name=CHAIN)
    x = {"x": jnp.asarray(uniform_init(8, 10))}
    state = jax.eval_shape(partial(module.init, potential_fn=gaussian_potential), x)
    mesh = Mesh(np.array(jax.devices()[:4]), (CHAIN,))
    fn = jax.shard_map(
        step, mesh=mesh, in_specs=P(CHAIN), out_specs=P(CHAIN), check_vma=False
    )
    keys = jax.random.split(jax.random.key(0), 8)
    lowered = jax.jit(fn).lower(keys, state, jnp.ones(8, bool))
    ops = re.findall(
        r"stablehlo\.(all_gather|all_reduce|all_to_all|collective_\w+)",
        lowered.as_text(),
    )
    assert ops == ["all_gather"]
    compiled = lowered.compile().as_text()
    assert len(re.findall(r"= \S+ all-gather(?:-start)?\(", compiled)) == 1
    assert not re.search(r"all-reduce|all-to-all|collective-permute", compiled)


def test_the_trajectory_length_survives_the_last_metric_update():
    """20-d Gaussian, equicorrelation 0.9, 64 chains, 500 warmup: the slow
    windows end at transitions 99, 149, 249 and 449, and only 50 adaptive
    transitions follow the last one. The old code restarted T at 2 there, so
    sampling ran with T = 2.4 after T had reached 8.9 (the optimum for this
    metric; 5x the ESS per gradient for the means). The last metric update
    changes the marginal sds by 0.3-5%, so the ChEES optimum stays where T
    was; in the 50 terminal transitions Adam (rate 0.025) moves log T by
    about 0.025 per transition with no consistent sign at the optimum
    (measured over three seeds: used / before 0.94-1.06). Bound: the length
    used for sampling is at least half the length reached just before the
    update (old: 0.34)."""
    dim = 20
    cov = 0.9 * np.ones((dim, dim)) + 0.1 * np.eye(dim)
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)

    def potential(z):
        return 0.5 * z["x"] @ precision @ z["x"]

    step = chees.build_step(potential, 500)
    root, lanes = jax.random.key(0), jnp.arange(64)

    def program(positions):
        def one(state, t):
            keys = jax.vmap(
                lambda c: jax.random.fold_in(jax.random.fold_in(root, c), t)
            )
            state, _ = step(keys(lanes), state, jnp.ones(64, bool))
            return state, state.adapt.log_trajectory_length[0]

        state = chees.init(positions, potential)
        return jax.lax.scan(one, state, jnp.arange(500))

    state, log_lengths = jax.jit(program)({"x": uniform_init(64, dim)})
    last_end = np.flatnonzero(ensemble.mass_schedule(500)[1]).max()
    before = float(np.exp(log_lengths[last_end - 1]))
    used = float(np.exp(shared(state).log_trajectory_length_avg))
    assert before > 5.0  # ChEES found a long trajectory before the update
    assert used > 0.5 * before, (used, before)


def two_pass_gradient(x0, x1, p1, accept_prob, real, inv_mass, time):
    """The ChEES gradient as the two-collective code computed it, in float64:
    pooled means first, then the pooled acceptance-weighted change."""
    x0, x1, p1, accept_prob, inv_mass = (
        np.asarray(v, np.float64) for v in (x0, x1, p1, accept_prob, inv_mass)
    )
    sd = np.sqrt(inv_mass)
    w0, w1, v1 = x0[real] / sd, x1[real] / sd, p1[real] * sd
    finite = np.isfinite(w1).all(-1) & np.isfinite(v1).all(-1)
    weight = np.where(finite, accept_prob[real], 0.0)
    w1, v1 = (np.where(finite[:, None], z, 0.0) for z in (w1, v1))
    c1 = w1 - (weight[:, None] * w1).sum(0) / weight.sum()  # collective 1
    c0 = w0 - w0.mean(0)
    change = ((c1 * c1).sum(-1) - (c0 * c0).sum(-1)) * (c1 * v1).sum(-1)
    return time * (weight * change).sum() / weight.sum()  # collective 2


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (1e4, 0.03)])
def test_the_one_collective_gradient_equals_the_two_pass_one(offset, scale):
    """Random lanes on 4 devices x 4, three of them padding with non-finite
    values: the pooled statistics and the ChEES gradient, computed from one
    gather about the running mean, equal the two-pass float64 values. At
    offset 1e4 and sd 0.03 (mean / sd 3e5) the shift keeps float32 exact
    enough (centred about zero, the float32 gradient is 0.9% off here)."""
    rng = np.random.default_rng(0)
    lanes, dim = 16, 5
    real = np.ones(lanes, bool)
    real[[3, 9, 14]] = False

    def normal(sd=1.0):
        return (sd * rng.normal(size=(lanes, dim))).astype(np.float32)

    z0 = normal()
    z1 = 1.5 * z0 + normal(0.3)  # the proposals spread out: ChEES grows
    x0, x1 = np.float32(offset) + scale * z0, np.float32(offset) + scale * z1
    p1 = (z1 + normal(0.5)) / np.float32(scale)
    accept_prob = rng.uniform(size=lanes).astype(np.float32)
    accepted = rng.uniform(size=lanes) < accept_prob
    x = np.where(accepted[:, None], x1, x0)
    x0[~real], x1[~real], p1[~real] = np.nan, np.inf, 1e30
    inv_mass = (scale**2 * rng.uniform(0.5, 2.0, dim)).astype(np.float32)
    shift = x0[real].mean(0) + normal(0.3 * scale)[0]
    draws = ensemble.Welford(jnp.float32(0.0), jnp.asarray(shift), jnp.zeros(dim))
    a = chees.init_adapt(dim, jnp.float32)._replace(
        metric=metrics.diagonal(jnp.asarray(inv_mass)),
        window=metric_window.MetricWindow(draws, None),
    )
    hyper = chees_adapt.Hyper(
        10, 0.651, partial(ensemble.gather_lanes, axis_name=CHAIN),
        0.025, 0.0, 0.95, 1000, jnp.ones(10, bool), jnp.zeros(10, bool),
        jnp.zeros(10, bool), "diag", CHAIN,
    )  # fmt: skip

    def pooled(x0, x1, p1, x, accept_prob, real, a):
        zeros = jnp.zeros_like(accept_prob)
        moved = hmc.Moved(x1, p1, x, zeros, x, zeros, zeros, accept_prob)
        stats = chees_adapt.Stats(x0, moved, real, jnp.float32(1.7), None)
        return chees_adapt.chees_gradient(a, stats, hyper)

    mesh = Mesh(np.array(jax.devices()[:4]), (CHAIN,))
    fn = jax.shard_map(
        pooled, mesh=mesh, in_specs=(P(CHAIN),) * 6 + (P(),), out_specs=P(),
        check_vma=False,
    )  # fmt: skip
    sums, grad = jax.jit(fn)(x0, x1, p1, x, accept_prob, real, a)
    expected = two_pass_gradient(x0, x1, p1, accept_prob, real, inv_mass, 1.7)
    assert abs(expected) > 1.0  # a gradient worth comparing
    np.testing.assert_allclose(grad, expected, rtol=1e-4)
    np.testing.assert_allclose(sums["n"], real.sum())
    inv_accept = (1 / np.asarray(accept_prob, np.float64)[real]).sum()
    np.testing.assert_allclose(sums["inv_accept"], inv_accept, rtol=1e-6)
    dx = np.asarray(x, np.float64)[real] - shift
    batch = sums["batch"]["draws"]
    np.testing.assert_allclose(batch["s1"], dx.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch["s2"], (dx * dx).sum(0), rtol=1e-5)


def test_the_potential_is_traced_once_per_step_whatever_the_warmup():
    traces = [0]

    def potential(z):
        traces[0] += 1
        return gaussian_potential(z)

    x = {"x": jnp.asarray(uniform_init(4, 10))}
    state = chees.init(x, potential)
    assert traces[0] == 1
    for num_warmup in (0, 10, 1000):
        traces[0] = 0
        step = chees.build_step(potential, num_warmup)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)  # raw (4, 2) keys
        jax.make_jaxpr(step)(keys, state, jnp.ones(4, bool))
        assert traces[0] == 1


def test_lowrank_metric_learns_a_correlated_gaussian():
    """Sampler(kernel="chees", metric="lowrank"): means and variances within
    4 MCSE, and the adapted metric whitens the covariance: its eigenvalues in
    the metric lie within [1/(2c), 2c] (c = CUTOFF: the estimator leaves
    directions inside [1/c, c] alone; x2 for the estimation error of 16 x 32
    buffered draws in d = 10), where a diagonal metric leaves them at the
    correlation matrix's (condition number about 100)."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    cov = ((q * np.logspace(-1, 1, 10)) @ q.T).astype(np.float32)
    sampler = cm.Sampler(
        correlated, num_chains=16, num_warmup=400, num_samples=500, devices=2,
        kernel="chees", metric="lowrank", progress_bar=False,
    )  # fmt: skip
    result = sampler.run(0, cov)
    x = np.asarray(result.samples["x"])
    for j in range(10):
        ess, ess2 = (effective_sample_size(x[..., j] ** k) for k in (1, 2))
        var = cov[j, j]
        assert abs(x[..., j].mean()) < 4 * np.sqrt(var / ess), j
        assert abs((x[..., j] ** 2).mean() - var) < 4 * np.sqrt(2 * var**2 / ess2), j
    adapt = jax.tree.map(lambda a: np.asarray(a[0], np.float64), result.state.adapt)
    s, U, lam = adapt.metric
    root = s[:, None] * (np.eye(10) + (U * (np.sqrt(lam) - 1)) @ U.T)
    white = np.linalg.solve(root, np.linalg.solve(root, cov).T)
    eig = np.linalg.eigvalsh(white)
    c = metrics.CUTOFF
    assert 1 / (2 * c) < eig.min() and eig.max() < 2 * c, eig
    assert (lam != 1).sum() >= 2  # the low-rank part is used
