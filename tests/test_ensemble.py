"""Ensemble kernels in the Sampler: ``kernel="chees"`` and ``adapt="ensemble"``.

Both adapt shared parameters from statistics pooled over every real chain of
the mesh. The tests check what pooling promises: one step size (and one
trajectory length) for all chains, independence from the device split,
padding chains kept out, bitwise resume of the adaptation state, pooling
within a data set only, and a dense metric learned from all chains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import correlated, linreg, linreg_data

import chainmesh as cm

KERNELS = {
    "chees": {"kernel": "chees"},
    "mams": {"kernel": "mams"},
    "ensemble": {"adapt": "ensemble"},
}
FIXED_LENGTH = ("chees", "mams")
"""Kernels whose chains all run one jittered trajectory length."""
X, Y = linreg_data()
FAST = {"num_warmup": 60, "num_samples": 40, "progress_bar": False}


def _run(name: str, chains: int, devices: int, **options):
    config = {**FAST, **options}
    sampler = cm.Sampler(
        linreg, num_chains=chains, devices=devices, **KERNELS[name], **config
    )
    return sampler.run(0, X, Y)


@pytest.fixture(scope="module", params=list(KERNELS))
def four_by_two(request):
    """8 chains, 4 devices x 2: the reference run of each kernel."""
    return request.param, _run(request.param, 8, 4)


def test_every_chain_shares_the_adapted_step_size(four_by_two):
    name, result = four_by_two
    eps = result.extra["step_size"]
    assert eps.shape == (8, 40)
    assert np.unique(eps).size == 1  # one value, frozen after warmup
    # MAMS's unit velocity covers sqrt(d) = 2.4 times less ground per unit of
    # time than an HMC momentum: its steps are that much longer.
    assert 0.05 < eps[0, 0] < (5.0 if name == "mams" else 2.0)
    if name in FIXED_LENGTH:
        steps = result.extra["num_steps"]
        assert np.all(steps == steps[:1])  # one trajectory length per transition
        assert np.unique(steps).size > 1  # jittered
        assert result.stats["lockstep_efficiency"] == 1.0
    else:
        assert "tree_depth" in result.extra
    (inverse_mass,) = (
        result.state.adapt_state.inverse_mass_matrix.values()
        if (name == "ensemble")
        else (result.state.adapt.inv_mass,)
    )
    m = np.asarray(inverse_mass)
    np.testing.assert_array_equal(m, np.broadcast_to(m[:1], m.shape))
    assert not np.allclose(m[0], 1.0)  # learned from the slow windows


def test_posterior_matches_nuts(four_by_two):
    """Means within 5 Monte-Carlo standard errors of a long NUTS run."""
    _, result = four_by_two
    ref = cm.Sampler(
        linreg, num_chains=8, devices=4, num_warmup=300, num_samples=1000,
        progress_bar=False,
    ).run(1, X, Y)  # fmt: skip
    for site in ("beta", "sigma"):
        x = result.samples[site].reshape(8, 40, -1)
        truth = ref.samples[site].reshape(-1, x.shape[-1]).mean(0)
        for j in range(x.shape[-1]):
            ess = cm.diagnostics.ess_bulk(x[..., j])
            se = x[..., j].std() / np.sqrt(ess)
            assert abs(x[..., j].mean() - truth[j]) < 5 * se + 1e-3, (site, j)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNELS))
def test_the_device_split_changes_only_rounding(name):
    """1 device x 8 chains and 4 devices x 2: the same pooled statistics, up
    to the rounding of differently compiled blocks (which the adaptation
    feedback amplifies: compared over 12 transitions)."""
    # MAMS's long isokinetic steps amplify rounding faster (1e-7 to 5e-3 in
    # 6 transitions here): compared over its first 6, to 2e-2.
    n = 3 if name == "mams" else 6
    options = {"num_warmup": n, "num_samples": n}
    one, four = _run(name, 8, 1, **options), _run(name, 8, 4, **options)
    np.testing.assert_allclose(
        one.extra["step_size"], four.extra["step_size"], rtol=1e-4
    )
    atol = 2e-2 if name == "mams" else 1e-3
    np.testing.assert_allclose(one.samples["beta"], four.samples["beta"], atol=atol)


@pytest.mark.parametrize("name", list(KERNELS))
def test_padding_chains_never_enter_the_pooled_statistics(name):
    """7 chains on 4 devices x 2 run one padding chain. With one seed it uses
    key ``fold_in(root, 7)``; with one key per chain it reuses chain 0's key.
    The real chains' keys are the same, so their draws are equal only if the
    padding chain's different trajectory never reaches a pooled statistic."""
    root = jax.random.key(0)
    keys = jnp.stack([jax.random.fold_in(root, i) for i in range(7)])
    options = {"init_strategy": "init_to_uniform"}
    padded = cm.Sampler(
        linreg, num_chains=7, devices=4, **KERNELS[name], **FAST, **options
    )
    assert padded.plan.num_padding == 1
    assert_same_draws(padded.run(root, X, Y), padded.run(keys, X, Y))


@pytest.mark.parametrize("name", list(KERNELS))
def test_resume_mid_warmup_is_bitwise(name, tmp_path, monkeypatch, four_by_two):
    if four_by_two[0] != name:
        pytest.skip("one resume per kernel")
    options = {"chunk_size": 20, "checkpoint_dir": str(tmp_path), "checkpoint_every": 1}
    with monkeypatch.context() as m:
        interrupt_after(m, 2)  # after 40 of 60 warmup transitions
        with pytest.raises(Interrupted):
            _run(name, 8, 4, **options)
    sampler = cm.Sampler(
        linreg, num_chains=8, devices=4, **KERNELS[name], **FAST, **options
    )
    resumed = sampler.run(0, X, Y, resume=True)
    assert_same_draws(_run(name, 8, 4, chunk_size=20), resumed)


@pytest.mark.parametrize("name", list(KERNELS))
def test_data_sets_pool_on_their_own(name):
    """Two data sets of different scales in one BatchSampler call: the step
    size is shared within a data set and differs between them."""
    ys = np.stack([Y, 20.0 * Y]).astype(np.float32)
    xs = np.stack([X, X])
    out = cm.BatchSampler(
        linreg, num_datasets=2, num_chains=4, devices=4, **KERNELS[name], **FAST
    ).run(0, xs, ys)
    eps = out.extra["step_size"]
    assert eps.shape == (2, 4, 40)
    for k in range(2):
        assert np.unique(eps[k]).size == 1
    if name == "mams":  # steps in whitened units: the metric takes the scale
        assert abs(np.log(eps[0, 0, 0] / eps[1, 0, 0])) > 0.01
    else:
        assert eps[0, 0, 0] > 1.5 * eps[1, 0, 0]  # sigma 20x larger: smaller steps


def far_mean(level, y):
    """``y ~ N(mu, 1)`` with ``mu`` near ``level``: the posterior sd is
    ``len(y) ** -0.5`` and its mean / sd is ``level * sqrt(len(y))``."""
    mu = numpyro.sample("mu", dist.Normal(level, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.parametrize("name", ["chees", "ensemble"])  # MAMS: ChEES's window
def test_pooled_variance_is_accurate_far_from_zero(name):
    """1000 observations at 1e3 and at 1e4 (mean / sd 3e4 and 3e5): the
    pooled moments are accumulated about a running shift, so float32 does not
    cancel. Summed about zero (the old ensemble NUTS), the estimate was 2.2x
    too large at 1e3 and negative at 1e4; ChEES's first window, summed about
    zero, was 0.54x at 1e3. The final inverse mass comes from the last slow
    window (warmup 300: transitions 150-249) of 8 chains, n = 800 pooled
    draws, whose ESS is at least n / 3 here (sampling draws: NUTS 0.35 n,
    ChEES 0.75 n); a variance from n_eff draws has relative standard error
    sqrt(2 / n_eff) <= sqrt(6 / n) = 0.087, and Stan's shrinkage targets
    1e-3, the true value. Bound: 4 SE."""
    sampler = cm.Sampler(
        far_mean, num_chains=8, devices=4, num_warmup=300, num_samples=10,
        progress_bar=False, **KERNELS[name],
    )  # fmt: skip
    noise = np.random.default_rng(0).normal(size=1000)
    truth = 1.0 / (1000 + 1 / 10.0**2)
    for level in (1e3, 1e4):
        y = (level + noise).astype(np.float32)
        result = sampler.run(0, np.float32(level), y)
        state = result.state
        inverse_mass = (
            state.adapt.inv_mass
            if name == "chees"
            else next(iter(state.adapt_state.inverse_mass_matrix.values()))
        )
        estimate = float(np.asarray(inverse_mass)[0, 0])
        assert abs(estimate / truth - 1) < 4 * np.sqrt(6 / 800), (level, estimate)


def test_ensemble_learns_a_dense_metric_from_all_chains():
    sd = np.array([1.0, 10.0, 0.1])
    corr = np.array([[1.0, 0.95, -0.5], [0.95, 1.0, -0.6], [-0.5, -0.6, 1.0]])
    cov = (corr * np.outer(sd, sd)).astype(np.float32)
    result = cm.Sampler(
        correlated, num_chains=8, devices=4, dense_mass=True, adapt="ensemble",
        num_warmup=200, num_samples=300, progress_bar=False,
    ).run(0, cov)  # fmt: skip
    (inverse_mass,) = result.state.adapt_state.inverse_mass_matrix.values()
    m = np.asarray(inverse_mass, np.float64)
    assert m.shape == (8, 3, 3)
    np.testing.assert_array_equal(m, np.broadcast_to(m[:1], m.shape))
    learned = m[0] / np.sqrt(np.outer(np.diag(m[0]), np.diag(m[0])))
    assert np.max(np.abs(learned - corr)) < 0.05  # 8 chains' draws, pooled
    np.testing.assert_allclose(np.sqrt(np.diag(m[0])), sd, rtol=0.15)
    x = result.samples["x"].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(x.std(0), sd, rtol=0.1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel": "chees", "inner": "map"}, "kernel='chees'.*inner='vmap'"),
        ({"adapt": "ensemble", "inner": "map"}, "adapt='ensemble'.*inner='vmap'"),
        ({"kernel": "chees", "dense_mass": True}, "diagonal mass.*dense_mass=False"),
        ({"kernel": "hmc"}, "kernel must be one of"),
        ({"adapt": "pooled"}, "adapt must be one of"),
    ],
)
def test_bad_kernel_options_fail_before_compiling(options, message):
    with pytest.raises(ValueError, match=message):
        cm.Sampler(linreg, **options)


def test_chees_targets_the_papers_acceptance_by_default():
    assert cm.Sampler(linreg, kernel="chees").config.target_accept_prob == 0.651
    assert cm.Sampler(linreg).config.target_accept_prob == 0.8
    assert (
        cm.Sampler(
            linreg, kernel="chees", target_accept_prob=0.7
        ).config.target_accept_prob
        == 0.7
    )
