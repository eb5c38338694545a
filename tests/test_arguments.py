"""NumPyro models run unchanged: static arguments, values of data, enumeration, keys."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import Design, design_model, normal_mean
from numpyro.contrib.funsor import markov
from numpyro.infer import MCMC, NUTS

import chainmesh as cm
from chainmesh import arguments

CONFIG = {
    "num_chains": 4,
    "devices": 2,
    "num_warmup": 400,
    "num_samples": 600,
    "progress_bar": False,
}
SMALL = {
    "num_chains": 2,
    "devices": 2,
    "num_warmup": 20,
    "num_samples": 20,
    "progress_bar": False,
}
"""For tests that only look at an initial state or at what is compiled."""
HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)
Y = np.random.default_rng(1).normal(2.0, 1.0, size=25).astype(np.float32)


def _numpyro(model, *args, **kwargs):
    """NumPyro's NUTS on the same model and data: the reference."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=CONFIG["num_warmup"],
        num_samples=CONFIG["num_samples"],
        num_chains=4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(11), *args, **kwargs)
    return {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}


def _agree(ours: dict, theirs: dict, sites) -> None:
    """Every scalar of ``sites``: means within 4 combined MCSE."""
    for site in sites:
        a = ours[site].reshape(*ours[site].shape[:2], -1)
        b = theirs[site].reshape(*theirs[site].shape[:2], -1)
        for j in range(a.shape[-1]):
            x, y = a[..., j], b[..., j]
            se = np.hypot(
                x.std() / np.sqrt(cm.diagnostics.ess_bulk(x)),
                y.std() / np.sqrt(cm.diagnostics.ess_bulk(y)),
            )
            assert abs(x.mean() - y.mean()) <= 4 * se, (site, j, x.mean(), y.mean())


def funnel(dim=10):
    """NumPyro's funnel example signature: a Python int sets a shape."""
    y = numpyro.sample("y", dist.Normal(0.0, 1.5))
    numpyro.sample("x", dist.Normal(0.0, jnp.exp(y / 2)).expand([dim]).to_event(1))


def test_python_int_shapes_positional_and_keyword(count_compiles):
    sampler = cm.Sampler(funnel, **CONFIG)
    by_keyword = sampler.run(0, dim=3)
    assert by_keyword.samples["x"].shape == (4, 600, 3)
    assert by_keyword.stats["static_args"] == ["dim"]
    with count_compiles() as c:
        by_position = sampler.run(0, 3)  # same static value: the same programs
    assert c.count == 0 and by_position.stats["compilations"] == 0
    np.testing.assert_array_equal(by_position.samples["x"], by_keyword.samples["x"])
    five = sampler.run(0, dim=5)  # a new value compiles once
    assert five.samples["x"].shape == (4, 600, 5)
    assert five.stats["compilations"] == 2 and five.stats["static_args"] == ["dim"]
    y = by_keyword.samples["y"]
    assert abs(y.mean()) <= 4 * 1.5 / np.sqrt(cm.diagnostics.ess_bulk(y))


def random_walk(T, y=None):
    """A Python int in a distribution's integer argument."""
    s = numpyro.sample("s", dist.GaussianRandomWalk(1.0, num_steps=T))
    numpyro.sample("y", dist.Normal(s, 1.0), obs=y)


def test_python_int_distribution_argument():
    y = np.random.default_rng(2).normal(size=6).cumsum().astype(np.float32)
    ours = cm.Sampler(random_walk, **CONFIG).run(0, 6, y).samples
    assert ours["s"].shape == (4, 600, 6)
    # Conjugate: the posterior of the walk is Gaussian with this precision.
    precision = np.eye(6) + (
        np.diag([2.0] * 5 + [1.0]) - np.eye(6, k=1) - np.eye(6, k=-1)
    )
    cov = np.linalg.inv(precision)
    mean = cov @ y
    s = ours["s"]
    for j in range(6):
        ess = cm.diagnostics.ess_bulk(s[..., j])
        assert abs(s[..., j].mean() - mean[j]) <= 4 * np.sqrt(cov[j, j] / ess)


def glmm(dept, male, applications, admit=None):
    """NumPyro's UCBadmit example: a shape computed from the data's values."""
    num_dept = len(np.unique(dept))
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(2)))
    with numpyro.plate("dept", num_dept):
        v = numpyro.sample(
            "v", dist.MultivariateNormal(v_mu, scale_tril=jnp.diag(sigma))
        )
    logits = v[dept, 0] + v[dept, 1] * male
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


UCB = {
    "dept": np.repeat(np.arange(6), 2),
    "male": np.tile([1.0, 0.0], 6).astype(np.float32),
    "applications": np.array(
        [825, 108, 560, 25, 325, 593, 417, 375, 191, 393, 373, 341], np.int32
    ),
    "admit": np.array([512, 89, 353, 17, 120, 202, 138, 131, 53, 94, 22, 24], np.int32),
}


@pytest.mark.slow
def test_shapes_from_data_values_retry_with_the_argument_static(count_compiles):
    sampler = cm.Sampler(glmm, **CONFIG)
    with pytest.warns(UserWarning, match=r"needs the values of \['dept'\]"):
        ours = sampler.run(0, **UCB)
    assert ours.stats["static_args"] == ["dept"]
    with count_compiles() as c:  # same dept values: no compile, no warning
        again = sampler.run(1, **{**UCB, "admit": UCB["admit"] + 1})
    assert c.count == 0 and again.stats["compilations"] == 0
    _agree(ours.samples, _numpyro(glmm, **UCB), ("v_mu", "sigma"))


def mixture(y):
    """A two-component mixture with an enumerated assignment per point."""
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(2)))
    locs = numpyro.sample("locs", dist.Normal(jnp.array([-2.0, 2.0]), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample(
            "z", dist.Categorical(weights), infer={"enumerate": "parallel"}
        )
        numpyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


def hmm(y):
    """A two-state HMM with enumerated hidden states, unrolled with markov."""
    stay = numpyro.sample("stay", dist.Beta(jnp.array([8.0, 8.0]), 2.0).to_event(1))
    locs = numpyro.sample("locs", dist.Normal(jnp.array([-1.0, 1.0]), 1.0).to_event(1))
    probs = jnp.stack(
        [jnp.stack([stay[0], 1 - stay[0]]), jnp.stack([1 - stay[1], stay[1]])]
    )
    x = 0
    for t in markov(range(y.shape[0])):
        x = numpyro.sample(
            f"x_{t}", dist.Categorical(probs[x]), infer={"enumerate": "parallel"}
        )
        numpyro.sample(f"y_{t}", dist.Normal(locs[x], 0.5), obs=y[t])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixture", "hmm"])
def test_enumerated_discrete_sites_match_numpyro(case):
    rng = np.random.default_rng(3)
    if case == "mixture":
        model, sites = mixture, ("weights", "locs")
        y = np.concatenate([rng.normal(-2, 1, 30), rng.normal(2, 1, 20)])
    else:
        model, sites = hmm, ("stay", "locs")
        states = (np.arange(16) // 4) % 2
        y = np.where(states, 1.0, -1.0) + 0.5 * rng.normal(size=16)
    y = y.astype(np.float32)
    ours = cm.Sampler(model, **CONFIG).run(0, y)
    assert set(ours.samples) == set(sites)  # discrete sites are summed out
    _agree(ours.samples, _numpyro(model, y), sites)


def test_one_key_per_chain():
    sampler = cm.Sampler(normal_mean, **CONFIG)
    by_seed = sampler.run(7, Y).samples["mu"]
    root = jax.random.PRNGKey(7)
    raw = jnp.stack([jax.random.fold_in(root, i) for i in range(4)])
    np.testing.assert_array_equal(sampler.run(raw, Y).samples["mu"], by_seed)
    typed = jax.random.split(jax.random.key(3), 4)
    split = sampler.run(typed, Y).samples["mu"]
    # Chain i uses key i: the keys in reverse order give the chains in reverse.
    reverse = sampler.run(typed[::-1], Y).samples["mu"]
    np.testing.assert_array_equal(reverse, split[::-1])


def needs_a_latent_value(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if mu > 0:  # Python control flow on a sampled value: no argument can help
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_a_model_error_keeps_its_traceback(count_compiles):
    """Python control flow on a sampled value: no argument can help, so the
    model's own error comes back, pointing at the model's line, with no advice
    to make arguments static."""
    with (
        count_compiles() as c,
        pytest.raises(jax.errors.TracerBoolConversionError) as info,
    ):
        cm.Sampler(needs_a_latent_value, **SMALL).run(0, Y)
    assert c.count == 0
    assert any(entry.name == "needs_a_latent_value" for entry in info.traceback)
    assert not info.value.__suppress_context__
    text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "static_argnames" not in text and "functools.partial" not in text


def test_static_argnames_makes_an_array_static():
    def scaled(y, scale):
        mu = numpyro.sample("mu", dist.Normal(0.0, float(scale.sum())))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    sampler = cm.Sampler(scaled, static_argnames=("scale",), **CONFIG)
    result = sampler.run(0, Y, np.array([10.0]))
    assert result.stats["static_args"] == ["scale"]
    mean, sd = Y.sum() / (25 + 0.01), (25 + 0.01) ** -0.5
    ess = cm.diagnostics.ess_bulk(result.samples["mu"])
    assert abs(result.samples["mu"].mean() - mean) <= 4 * sd / np.sqrt(ess)


def test_static_values_resume_and_feed_cmc_shards(tmp_path):
    """Static values are part of a checkpoint's identity, and shared by CMC shards."""
    config = {**CONFIG, "num_warmup": 40, "num_samples": 40, "chunk_size": 20}
    sampler = cm.Sampler(funnel, checkpoint_dir=str(tmp_path), **config)
    first = sampler.run(0, dim=2)
    resumed = sampler.run(0, dim=2, resume=True)
    np.testing.assert_array_equal(resumed.samples["x"], first.samples["x"])
    with pytest.raises(ValueError, match="cannot resume"):
        sampler.run(0, dim=3, resume=True)

    def shard_model(y, scale):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, float(scale)), obs=y)

    shards = [(Y[:12], 1), (Y[12:24], 1)]
    out = cm.cmc.sample(shard_model, shards, **{**config, "num_samples": 100})
    assert out.shards[0].stats["static_args"] == ["scale"]
    assert abs(out.combined["mu"].mean() - Y[:24].mean()) < 0.5
    with pytest.raises(ValueError, match="differs between shards"):
        cm.cmc.sample(shard_model, [(Y[:12], 1), (Y[12:24], 2)], **config)


def _energy(sampler, *args, mu=0.0, **kwargs):
    """Potential energy of every chain started at ``mu``."""
    state = sampler.init(0, *args, init_params={"mu": mu}, **kwargs)
    return np.asarray(state.potential_energy)[: SMALL["num_chains"]]


class SlotsPrior:
    """A configuration object without ``__dict__``, hashed by identity."""

    __slots__ = ("mu",)

    def __init__(self, mu):
        self.mu = mu


def prior_model(prior):
    numpyro.sample("mu", dist.Normal(prior.mu, 1.0))


def test_a_new_static_object_gets_its_own_program():
    sampler = cm.Sampler(prior_model, **SMALL)
    np.testing.assert_allclose(_energy(sampler, SlotsPrior(0.0)), HALF_LOG_2PI)
    far = _energy(sampler, SlotsPrior(50.0))
    np.testing.assert_allclose(far, 0.5 * 50.0**2 + HALF_LOG_2PI, rtol=1e-6)


def test_an_unhashable_static_object_is_refused_before_compiling(count_compiles):
    sampler = cm.Sampler(design_model, **SMALL)
    with count_compiles() as c, pytest.raises(TypeError) as info:
        sampler.run(0, Design(np.ones(2000, np.float32)))
    assert c.count == 0
    text = str(info.value)
    assert "design" in text and "Design" in text
    assert "static_argnames" in text and "functools.partial" in text


def value_model(g):
    numpyro.sample("mu", dist.Normal(float(g[0]), 1.0))


def test_a_static_array_is_copied():
    """A static array changed in place afterwards does not change the program."""
    sampler = cm.Sampler(value_model, static_argnames=("g",), **SMALL)
    g = np.zeros(3, np.float32)
    sampler.init(0, g)
    g[:] = 50.0  # in place: the programs compiled for zeros must not see it
    np.testing.assert_allclose(_energy(sampler, np.zeros(3, np.float32)), HALF_LOG_2PI)


def signed_model(c):
    numpyro.sample("mu", dist.Normal(math.copysign(5.0, c), 1.0))


def test_static_values_are_keyed_by_type_and_value():
    sampler = cm.Sampler(signed_model, static_argnames=("c",), **SMALL)
    np.testing.assert_allclose(_energy(sampler, 0.0, mu=5.0), HALF_LOG_2PI)
    np.testing.assert_allclose(_energy(sampler, -0.0, mu=5.0), 50 + HALF_LOG_2PI)
    values = [1, 1.0, True, 0.0, -0.0, frozenset({1}), frozenset({1.0})]
    values += [frozenset({True}), (1, 2), (1.0, 2), np.array([1.0]), np.array([-0.0])]
    keys = [arguments.record(signed_model, (), {"c": v}, ("c",)).key for v in values]
    assert len(set(keys)) == len(values)
    same = arguments.record(signed_model, (frozenset({1}),), {}, ("c",)).key
    assert same == keys[5] and hash(same) == hash(keys[5])


def test_trace_affecting_jax_flags_are_part_of_the_program_key():
    sampler = cm.Sampler(normal_mean, **SMALL)
    first = sampler.run(0, Y)
    flag = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not flag)
        toggled = sampler.run(0, Y)
    finally:
        jax.config.update("jax_threefry_partitionable", flag)
    assert toggled.stats["compilations"] == 2  # its own programs
    again = sampler.run(0, Y)  # the first programs again
    assert again.stats["compilations"] == 0
    np.testing.assert_array_equal(again.samples["mu"], first.samples["mu"])


def glmm_one(dept, admit):
    """A shape from one data set's values: its own departments."""
    num_dept = len(np.unique(dept))
    v = numpyro.sample("v", dist.Normal(0.0, 1.0).expand([num_dept]).to_event(1))
    numpyro.sample("admit", dist.Normal(v[dept], 1.0), obs=admit)


def test_a_batched_model_that_needs_data_values_names_the_fixes(count_compiles):
    depts = np.tile(np.arange(3), (2, 2))
    sampler = cm.BatchSampler(glmm_one, 2, **SMALL)
    with count_compiles() as c, pytest.raises(TypeError) as info:
        sampler.run(0, depts, np.zeros(depts.shape, np.float32))
    assert c.count == 0
    assert "['dept']" in str(info.value) and "functools.partial" in str(info.value)
    assert isinstance(info.value.__cause__, arguments.NEEDS_VALUE)
    with pytest.raises(jax.errors.TracerBoolConversionError) as info:
        cm.BatchSampler(needs_a_latent_value, 2, **SMALL).run(0, np.stack([Y, Y]))
    assert any(entry.name == "needs_a_latent_value" for entry in info.traceback)


def test_a_failed_retry_leaves_no_static_argument_behind():
    """Static ``y`` gets past the value the model needed, then the model fails
    on the string: later calls still take ``y`` as data."""
    sampler = cm.Sampler(normal_mean, **SMALL)
    with (
        pytest.warns(UserWarning, match=r"needs the values of \['y'\]"),
        pytest.raises(Exception) as info,
    ):
        sampler.run(0, [Y, "x"])
    assert not isinstance(info.value, arguments.NEEDS_VALUE)
    assert sampler.run(0, Y).stats["static_args"] == []
