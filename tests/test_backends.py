"""The seed backend's contract on ShardedBackend, and its six defects fixed."""

import dataclasses
import types
import warnings

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from einops import rearrange
from models import linreg, linreg_data, scale_model

from chainmesh.backends import (
    BackendCapabilities,
    CMCBackend,
    CMCConfig,
    ShardedBackend,
    as_config,
)

X, Y = linreg_data()
N_PARAMS = 5  # beta (3) + sigma + the deterministic beta_sum, per draw
CONFIG = CMCConfig(num_chains=10, num_warmup=100, num_samples=100)
EXTRA = ("energy", "diverging", "accept_prob", "num_steps", "potential_energy")
SCALE_Y = np.random.default_rng(1).normal(0.0, 1.5, size=20).astype(np.float32)


def seed_split(num_chains: int, num_devices: int) -> list[int]:
    """The seed backend's chain split: floor + remainder."""
    base, rem = divmod(num_chains, num_devices)
    return [base + (i < rem) for i in range(num_devices)]


def seed_chain_keys(key: jax.Array, num_chains: int, num_devices: int) -> np.ndarray:
    """The seed backend's keys: split per device, then per chain on the device."""
    device_keys = jax.random.split(key, num_devices)
    counts = seed_split(num_chains, num_devices)
    return np.concatenate(
        [
            jax.random.key_data(jax.random.split(k, c))
            for k, c in zip(device_keys, counts, strict=True)
            if c
        ]
    )


@pytest.fixture(scope="module")
def four():
    """One linreg run: 10 chains on 4 devices (3 per device, 2 padding)."""
    backend = ShardedBackend(devices=4)
    flat = backend.run(linreg, CONFIG, 0, model_args=(X, Y))
    return backend, flat


def test_chain_split_pads_instead_of_floor_remainder(four):
    backend, flat = four
    assert seed_split(10, 4) == [3, 3, 2, 2]
    plan = backend.last_result.plan
    assert (plan.num_devices, plan.chains_per_device, plan.num_padding) == (4, 3, 2)
    assert plan == backend.sampler(linreg, CONFIG).plan
    # Padding chains run and are dropped: never more chains than asked for.
    assert flat["beta"].shape == (10 * 100, 3)
    assert backend.get_samples()["beta"].shape == (10, 100, 3)


def test_flat_layout_is_chain_major_like_mcmc_get_samples(four):
    backend, flat = four
    grouped = backend.get_samples()
    assert set(flat) == {"beta", "sigma", "beta_sum"}
    for name, x in grouped.items():
        np.testing.assert_array_equal(flat[name], rearrange(x, "c s ... -> (c s) ..."))
    np.testing.assert_array_equal(flat["sigma"][300:400], grouped["sigma"][3])
    np.testing.assert_array_equal(
        backend.get_samples(group_by_chain=False)["beta"], flat["beta"]
    )


def test_defect1_fixed_one_program_runs_all_devices_at_once(four):
    backend, _ = four
    state = backend.last_result.state
    for leaf in jax.tree.leaves(state):
        assert len(leaf.sharding.device_set) == 4
        assert [s.data.shape[0] for s in leaf.addressable_shards] == [3, 3, 3, 3]
    assert backend.get_capabilities() == BackendCapabilities(True, True, 4)


def test_defect2_fixed_extra_fields_kept(four):
    backend, _ = four
    grouped = backend.get_extra_fields()
    flat = backend.get_extra_fields(group_by_chain=False)
    for name in EXTRA:
        assert grouped[name].shape == (10, 100), name
        assert flat[name].shape == (1000,), name
    assert grouped["diverging"].dtype == bool
    assert np.all(grouped["num_steps"] >= 1)


def test_defect3_fixed_draws_independent_of_device_count(four):
    key = jax.random.key(0)
    # The seed backend's chain keys change with the device count.
    assert not np.array_equal(seed_chain_keys(key, 8, 2), seed_chain_keys(key, 8, 4))
    # chainmesh: chain i uses fold_in(key, i); same chains per device -> bitwise.
    backend, _ = four
    two = ShardedBackend(devices=2)
    flat = two.run(
        linreg, dataclasses.replace(CONFIG, num_chains=6), key, model_args=(X, Y)
    )
    assert two.last_result.plan.chains_per_device == 3
    assert flat["beta"].shape == (600, 3)
    for name, x in two.get_samples().items():
        np.testing.assert_array_equal(x, backend.get_samples()[name][:6])
    for name in EXTRA:
        np.testing.assert_array_equal(
            two.get_extra_fields()[name], backend.get_extra_fields()[name][:6]
        )


def test_defect4_fixed_init_to_value_uses_init_params():
    backend = ShardedBackend(devices=2)
    config = CMCConfig(
        num_chains=3, num_warmup=100, num_samples=100, init_strategy="init_to_value"
    )
    sampler = backend.sampler(scale_model, config)
    assert backend.sampler(scale_model, config) is sampler  # one per (model, config)

    def initial_sigma(values):
        state = sampler.init(0, SCALE_Y, init_params={"sigma": values})
        return np.exp(np.asarray(state.z["sigma"]))  # z is unconstrained: log

    # Chain-shaped leaves are per chain, row i -> chain i, as the seed backend's
    # per-device slices were; the 4th chain is padding and reuses chain 0's value.
    values = np.array([0.5, 1.0, 2.0])
    starts = np.cumsum([0, *seed_split(3, 2)])
    seed_rows = [values[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    np.testing.assert_allclose(
        initial_sigma(values), [*np.concatenate(seed_rows), 0.5], rtol=1e-6
    )
    # Scalar and (1,) leaves broadcast to every chain.
    np.testing.assert_allclose(initial_sigma(1.5), 1.5, rtol=1e-6)
    np.testing.assert_allclose(initial_sigma(np.array([0.7])), 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="init_params"):
        backend.run(scale_model, config, 0, model_args=(SCALE_Y,))
    with pytest.raises(ValueError, match="shape"):
        initial_sigma(np.ones(2))


def test_defect5_fixed_memory_estimate_bounds_a_real_run(four):
    backend, _ = four
    result = backend.last_result
    used = sum(x.nbytes for x in (*result.samples.values(), *result.extra.values()))
    used += sum(x.nbytes for x in jax.tree.leaves(result.state))
    estimate = backend.estimate_memory(len(X), N_PARAMS, 10)
    assert estimate * 1e9 >= used
    # The seed formula (floor division, no stored draws) does not bound it.
    seed_estimate = (10 // 4) * 8 * (len(X) + 4 * N_PARAMS + N_PARAMS**2)
    assert seed_estimate < used
    # ceil: a 9th chain on 4 devices adds a chain to a device, not just draws.
    host_per_chain = 8 * CONFIG.num_samples * (N_PARAMS + 7) / 1e9
    grow = backend.estimate_memory(len(X), N_PARAMS, 9) - backend.estimate_memory(
        len(X), N_PARAMS, 8
    )
    assert grow > 2 * host_per_chain
    dense = dataclasses.replace(CONFIG, dense_mass=True)
    assert backend.estimate_memory(10, 50, 10, config=dense) > backend.estimate_memory(
        10, 50, 10
    )
    with pytest.raises(ValueError, match="n_chains"):
        backend.estimate_memory(10, 5, 0)


def test_defect6_fixed_chain_axis_returned(four):
    backend, flat = four
    grouped = backend.get_samples()
    assert grouped["beta"].shape == (10, 100, 3)
    assert backend.get_extra_fields()["energy"].shape == (10, 100)
    assert not np.array_equal(grouped["sigma"][0], grouped["sigma"][1])


def test_repeat_runs_reuse_compiled_programs(four, count_compiles):
    backend, flat = four
    fresh = ShardedBackend(devices=4)  # a new backend: programs are cached by model
    X2, Y2 = linreg_data(seed=1)
    with count_compiles() as c:
        same = fresh.run(linreg, CONFIG, jax.random.key(0), model_args=(X, Y))
        other = fresh.run(linreg, CONFIG, 1, model_args=(X2, Y2))
    assert c.count == 0
    np.testing.assert_array_equal(same["beta"], flat["beta"])
    assert not np.array_equal(other["beta"], flat["beta"])
    keyword = fresh.run(linreg, CONFIG, 0, model_args=(X,), model_kwargs={"y": Y})
    np.testing.assert_allclose(keyword["beta"], flat["beta"], rtol=1e-5, atol=1e-6)


def closure_model():
    """The seed backend's style: data in the closure, no model arguments."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=SCALE_Y)


def test_closure_model_and_cleanup_twice(count_compiles):
    backend = ShardedBackend()
    config = CMCConfig(num_chains=4, num_warmup=50, num_samples=50)
    flat = backend.run(closure_model, config, 3)
    assert flat["mu"].shape == (200,)
    assert backend.last_result.plan.num_devices == 4  # 4 chains on 8 devices
    with count_compiles() as c:
        backend.sampler(closure_model, config).init(3)
    assert c.count == 0
    backend.cleanup()
    backend.cleanup()
    with pytest.raises(RuntimeError, match="no run yet"):
        backend.get_samples()
    with count_compiles() as c:  # compiled programs were dropped
        backend.sampler(closure_model, config).init(3)
    assert c.count >= 1
    backend.cleanup()


def test_validate_resources(monkeypatch):
    with pytest.warns(UserWarning, match="single"):
        ShardedBackend(devices=1).validate_resources()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardedBackend(devices=4).validate_resources()
    with pytest.raises(RuntimeError, match="empty"):
        ShardedBackend(devices=[]).validate_resources()
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match="no JAX devices"):
        ShardedBackend().validate_resources()


def test_config_is_duck_typed_and_checked():
    assert CMCConfig() == CMCConfig(4, 500, 1000, 0.8, 10, False, "init_to_median")
    with pytest.raises(dataclasses.FrozenInstanceError):
        CMCConfig().num_chains = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        BackendCapabilities(True, True, 1).max_parallel_shards = 2
    fields = {f.name: getattr(CONFIG, f.name) for f in dataclasses.fields(CONFIG)}
    assert as_config(types.SimpleNamespace(**fields, extra="ignored")) == CONFIG
    del fields["dense_mass"]
    with pytest.raises(TypeError, match="dense_mass"):
        ShardedBackend().run(linreg, types.SimpleNamespace(**fields), 0)
    with pytest.raises(ValueError, match="init_strategy"):
        CMCConfig(init_strategy="init_to_nowhere")
    with pytest.raises(ValueError, match="num_chains"):
        as_config(
            types.SimpleNamespace(**{**fields, "dense_mass": False, "num_chains": 0})
        )
    with pytest.raises(TypeError, match="model_args"):
        ShardedBackend().run(linreg, CONFIG, 0, model_args=X)
    with pytest.raises(TypeError):
        CMCBackend()
    assert isinstance(ShardedBackend(), CMCBackend)
