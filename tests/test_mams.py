"""MAMS over a mesh: the integrator, correctness, device independence, padding.

The block-level runs reuse ``test_chees``'s program (``init``, then a ``scan``
of ``step`` with per-lane keys ``fold_in(fold_in(root, chain), transition)``);
``test_chees`` also counts MAMS's collectives.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from test_chees import SCALES, assert_trees, gaussian_potential, run, uniform_init

import chainmesh as cm
from chainmesh.diagnostics import effective_sample_size
from chainmesh.kernels import isokinetic, mams, mams_adapt, metrics

go = partial(run, module=mams)


def shared(state: mams.State):
    """The adaptation state of lane 0 (it is the same on every lane)."""
    return jax.tree.map(lambda x: x[0], state.adapt)


@pytest.fixture(scope="module")
def gaussian_run():
    """64 chains on 8 devices, 500 warmup + 1000 draws of the 10-d Gaussian."""
    return go(gaussian_potential, {"x": uniform_init(64, 10)}, 500, 1000, 8)


def test_gaussian_moments_and_mass_matrix(gaussian_run):
    """Means within 4 MCSE of 0, sds within 10% (an sd from >= 5000 effective
    draws has relative error below 1%), the inverse mass within 10%."""
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
    assert 0.8 < info.accept_prob[:, 500:].mean() < 0.97  # target 0.9
    assert np.unique(info.step_size[:, 500:]).size == 1  # frozen after warmup


def test_every_chain_takes_the_same_jittered_number_of_steps(gaussian_run):
    """``ceil(2 h L / eps)`` steps of two gradients, ``h`` a Halton number."""
    state, _, info = gaussian_run
    steps = info.num_steps
    assert (steps == steps[:1]).all()
    a = shared(state)
    length, eps = np.exp(a.log_length_avg), np.exp(a.log_step_size_avg)
    jitter = np.asarray(jax.vmap(mams.halton)(jnp.arange(500, 1500)))
    expected = np.clip(np.ceil(2 * jitter * length / eps), 1, 511)
    np.testing.assert_array_equal(steps[0, 500:], 2 * expected)


def test_the_integrator_is_reversible_and_its_energy_error_shrinks():
    """Forward then back with the velocity flipped returns to the start, and
    the kinetic energy changes cancel (the Metropolis ratio rests on both);
    the energy error of a trajectory shrinks as the step does."""
    dim = 6
    cov = 0.5 * np.ones((dim, dim)) + 0.5 * np.eye(dim)
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)

    def potential(q):
        return 0.5 * q @ precision @ q

    metric = metrics.diagonal(jnp.linspace(0.5, 2.0, dim))
    x0 = jnp.asarray(uniform_init(1, dim)[0])
    u0 = jax.random.normal(jax.random.key(3), (dim,))
    u0 = u0 / jnp.linalg.norm(u0)

    def trajectory(x, u, eps, n):
        value_and_grad = jax.value_and_grad(potential)
        b1 = isokinetic.MINIMAL_NORM_B1
        kinetic = 0.0
        _, g = value_and_grad(x)
        for _ in range(n):
            for coef, drift in ((b1, True), (1 - 2 * b1, True), (b1, False)):
                force = -metrics.whitened_velocity(metric, g)
                u, change = isokinetic.turn(u, force, coef * eps)
                kinetic += change
                if drift:
                    x = x + 0.5 * eps * metrics.unwhiten(metric, u)
                    _, g = value_and_grad(x)
        return x, u, kinetic

    x1, u1, k1 = trajectory(x0, u0, 0.3, 20)
    x2, u2, k2 = trajectory(x1, -u1, 0.3, 20)
    np.testing.assert_allclose(x2, x0, atol=1e-4)
    np.testing.assert_allclose(-u2, u0, atol=1e-4)
    assert abs(float(k1 + k2)) < 1e-3 * abs(float(k1))
    errors = []
    for eps, n in ((0.4, 10), (0.2, 20), (0.1, 40)):  # the same time
        x, _, kinetic = trajectory(x0, u0, eps, n)
        errors.append(abs(float(potential(x) - potential(x0) + kinetic)))
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # order 2 at least


def test_turn_keeps_a_unit_velocity():
    u = jnp.asarray([0.6, 0.8, 0.0])
    for eps in (1e-3, 1.0, 1e3):
        new, _ = isokinetic.turn(u, jnp.asarray([3.0, -1.0, 2.0]), eps)
        np.testing.assert_allclose(jnp.linalg.norm(new), 1.0, rtol=1e-6)
    new, change = isokinetic.turn(u, jnp.zeros(3), 1.0)  # no force: no turn
    np.testing.assert_allclose(new, u, rtol=1e-6)
    assert float(change) == 0.0


@pytest.mark.parametrize(
    "metric", ["diag", pytest.param("lowrank", marks=pytest.mark.slow)]
)
def test_adaptation_does_not_depend_on_the_device_split(metric):
    """Pooled sums are summed in chain order: 1 and 4 devices agree to
    rounding over 120 transitions; one block without a mesh is bitwise 1."""
    x = {"x": uniform_init(8, 10)}
    run_on = partial(go, gaussian_potential, x, 100, 20, metric=metric)
    one, four = run_on(1), run_on(4)
    assert_trees(shared(one[0]), shared(four[0]), rtol=1e-4)
    np.testing.assert_array_equal(one[2].num_steps, four[2].num_steps)
    assert_trees(one, run_on(None))


def test_padding_lanes_never_enter_the_adaptation():
    x = uniform_init(6, 10)
    lanes = [0, 1, 2, None, 3, 4, 5, None]  # 4 devices x 2 lanes, 2 padding
    real = np.array([i is not None for i in lanes])
    ids = np.array([100 + j if i is None else i for j, i in enumerate(lanes)])

    def padded(values):
        rows = [x[i] if i is not None else values.pop() for i in lanes]
        return go(gaussian_potential, {"x": np.stack(rows)}, 100, 20, 4, real, ids)

    full = partial(np.full, 10, dtype=np.float32)
    wild, tame = padded([full(1e6), full(np.nan)]), padded([x[0], x[1]])
    np.testing.assert_array_equal(wild[1]["x"][real], tame[1]["x"][real])
    assert_trees(wild[0].adapt, tame[0].adapt)


def conjugate(y):
    """mu ~ N(0, 10) (3-vector), y_n ~ N(mu, 1): the posterior is known."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
    numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def test_sampler_matches_the_conjugate_posterior():
    """Sampler(kernel="mams") on 8 chains over 2 devices: each mean within 4
    MCSE of the exact posterior mean, each sd within 10%."""
    y = np.random.default_rng(0).normal([1.0, -2.0, 5.0], 1.0, (20, 3))
    y = y.astype(np.float32)
    precision = 20 + 1 / 100
    mean, sd = y.sum(0) / precision, precision**-0.5
    result = cm.Sampler(
        conjugate, num_chains=8, devices=2, kernel="mams", progress_bar=False
    ).run(0, y)
    x = result.samples["mu"]
    assert x.shape == (8, 1000, 3)
    for j in range(3):
        ess = cm.diagnostics.ess_bulk(x[..., j])
        assert abs(x[..., j].mean() - mean[j]) < 4 * sd / np.sqrt(ess)
        np.testing.assert_allclose(x[..., j].std(), sd, rtol=0.1)
    assert (result.extra["num_steps"] % 2 == 0).all()  # two gradients a step
    assert result.stats["lockstep_efficiency"] == 1.0


def test_a_one_parameter_model_is_refused_before_compiling():
    def line(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    sampler = cm.Sampler(line, kernel="mams", progress_bar=False)
    with pytest.raises(ValueError, match="kernel='mams' needs at least 2"):
        sampler.run(0, np.zeros(3, np.float32))


def test_chains_far_in_the_tails_all_come_in():
    """sblrc from NumPyro's init_to_median on 8 chains: potentials 1e4 to 9e6
    at the start. Without the unadjusted burn-in the pooled step size fell to
    1e-8 and four chains never moved (potential still 2e6-9e6 after 500
    warmup transitions); with it every chain's potential is within the
    posterior's range (about 160-170) after 100."""
    from chainmesh.bench.targets import load_target

    target = load_target("posteriordb", "sblrc-blr")
    result = cm.Sampler(
        target.model, num_chains=8, devices=2, kernel="mams", num_warmup=100,
        num_samples=50, progress_bar=False,
    ).run(0, *target.args)  # fmt: skip
    potential = result.extra["potential_energy"]
    assert potential.max() < 200.0, potential.max(axis=1)
    assert result.extra["step_size"][0, 0] > 1e-3


def test_rounding_alone_does_not_inform_the_step_size():
    """A transition whose potentials are too large for float32 to resolve its
    energy error, and whose error is no larger than that rounding, is left
    out of dual averaging; a resolved one, or a clear rejection, counts."""
    u0 = jnp.asarray([100.0, 4e8, 4e8, 4e8], jnp.float32)
    delta = jnp.asarray([0.5, 3.0, 1e6, jnp.inf], jnp.float32)
    informed = mams_adapt._informative(u0, u0, delta)
    np.testing.assert_array_equal(informed, [True, False, True, True])
