"""Bad input: every row raises a clear error before anything compiles."""

import jax
import numpy as np
import pytest
from models import discrete_latent, linreg, linreg_data, scale_model

import chainmesh as cm

Y = np.linspace(-1.0, 1.0, 10).astype(np.float32)
SMALL = {"num_warmup": 10, "num_samples": 10, "progress_bar": False}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_chains": 0}, ValueError, "num_chains must be >= 1"),
        ({"num_chains": 2.5}, TypeError, "num_chains must be an int"),
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
        ({"num_warmup": -1}, ValueError, "num_warmup must be >= 0"),
        ({"thinning": 0}, ValueError, "thinning must be >= 1"),
        ({"thinning": 20, "num_samples": 10}, ValueError, "thinning <= num_samples"),
        ({"devices": 9}, ValueError, "devices=9"),
        ({"devices": []}, ValueError, "devices is empty"),
        ({"target_accept_prob": 1.0}, ValueError, "target_accept_prob"),
        ({"target_accept_prob": 0.0}, ValueError, "target_accept_prob"),
        ({"max_tree_depth": 0}, ValueError, "max_tree_depth must be >= 1"),
        ({"init_strategy": "init_to_mean"}, ValueError, "init_strategy"),
        ({"init_strategy": 3}, TypeError, "init_strategy"),
        ({"inner": "pmap"}, ValueError, "inner must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"dense_mass": "yes"}, TypeError, "dense_mass"),
        ({"gather": "some"}, ValueError, "gather must be"),
        ({"metric": "full"}, ValueError, "metric must be one of"),
        ({"metric": "lowrank", "dense_mass": True}, ValueError, "pass only one"),
        ({"metric": "fisher", "inner": "map"}, ValueError, "needs inner='vmap'"),
        (
            {"metric": "lowrank", "inner": "async"},
            ValueError,
            "metric='lowrank' adapts over a device's block.*got inner='async'",
        ),
        ({"kernel": "chees", "metric": "dense"}, ValueError, "kernel='nuts' with"),
        ({"kernel": "chees", "dense_mass": True}, ValueError, "dense_mass=False"),
    ],
)
def test_bad_config(kwargs, error, match, count_compiles):
    with count_compiles() as c, pytest.raises(error, match=match):
        cm.Sampler(scale_model, **{**SMALL, **kwargs})
    assert c.count == 0


def test_dense_mass_is_an_alias_of_the_dense_metric():
    alias = cm.Sampler(scale_model, dense_mass=True, **SMALL).config
    named = cm.Sampler(scale_model, metric="dense", **SMALL).config
    assert alias == named
    assert (named.metric, named.dense_mass) == ("dense", True)
    lowrank = cm.Sampler(scale_model, kernel="chees", metric="lowrank", **SMALL)
    assert lowrank.config.metric == "lowrank" and not lowrank.config.dense_mass


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model must be a callable"):
        cm.Sampler("model")


@pytest.mark.parametrize(
    ("init_params", "match"),
    [
        ({"tau": 1.0}, r"unknown sites \['tau'\].*latent sites are \['sigma'\]"),
        ({"sigma": np.ones(3)}, r"init_params\['sigma'\] has shape \(3,\)"),
        ({"sigma": np.ones((4, 2))}, r"expected the site shape"),
    ],
)
@pytest.mark.parametrize(
    "options", [{}, {"metric": "diag"}, {"adapt": "ensemble"}, {"kernel": "chees"}]
)
def test_bad_init_params(init_params, match, options, count_compiles):
    """Refused before any compilation, whichever kernel is built (building
    one once put its warmup schedule on a device, which compiles)."""
    sampler = cm.Sampler(scale_model, num_chains=4, devices=2, **SMALL, **options)
    with count_compiles() as c, pytest.raises(ValueError, match=match):
        sampler.run(0, Y, init_params=init_params)
    assert c.count == 0


def test_init_to_value_needs_values(count_compiles):
    sampler = cm.Sampler(scale_model, init_strategy="init_to_value", **SMALL)
    with count_compiles() as c, pytest.raises(ValueError, match="needs init_params"):
        sampler.run(0, Y)
    assert c.count == 0


def test_discrete_latent_rejected(count_compiles):
    sampler = cm.Sampler(discrete_latent, **SMALL)
    with (
        count_compiles() as c,
        pytest.raises(ValueError, match=r"discrete latent .*'z'"),
    ):
        sampler.run(0, Y)
    assert c.count == 0


def test_bad_seed_and_args():
    sampler = cm.Sampler(scale_model, **SMALL)
    with pytest.raises(TypeError, match="seed must be"):
        sampler.run("zero", Y)
    keys = jax.random.split(jax.random.key(0), 3)  # num_chains is 4
    with pytest.raises(ValueError, match="seed holds 3 keys but num_chains=4"):
        sampler.run(keys, Y)
    with pytest.raises(TypeError, match="static_argnames must be a tuple"):
        cm.Sampler(scale_model, static_argnames="y")


def test_nonfinite_init_names_sites():
    X, y = linreg_data()
    sampler = cm.Sampler(linreg, num_chains=2, devices=2, **SMALL)
    bad = {"sigma": np.array([1.0, -1.0])}  # chain 1 outside sigma's support
    with pytest.raises(ValueError, match=r"chains \[1\].*sites \['sigma', 'y'\]"):
        sampler.run(0, X, y, init_params=bad)


def test_partial_init_to_value_warns():
    X, y = linreg_data()
    sampler = cm.Sampler(linreg, init_strategy="init_to_value", devices=2, **SMALL)
    with pytest.warns(UserWarning, match=r"no value for sites \['beta'\]"):
        sampler.init(0, X, y, init_params={"sigma": 1.0})
