"""The NumPyro + ArviZ ecosystem: to_arviz, chain_method, Predictive, plots."""

import dataclasses
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.sharding import Mesh
from models import linreg, linreg_data
from numpyro.infer import MCMC, NUTS, Predictive

import chainmesh as cm
from chainmesh.arviz_io import STAT_NAMES, model_dims
from chainmesh.cache import COMPILE_LOCK
from chainmesh.examples import eight_schools_data
from chainmesh.mesh import CHAIN

az = pytest.importorskip("arviz")

CHAINS, DRAWS = 6, 300


@pytest.fixture(scope="module")
def schools():
    """Eight schools (a plate, a deterministic site, observed data), 6 chains."""
    example = eight_schools_data()
    sampler = cm.Sampler(
        example.model,
        num_chains=CHAINS,
        num_warmup=200,
        num_samples=DRAWS,
        devices=4,
        inner="map",  # compiles in half the time of vmap for this model
        progress_bar=False,
    )
    return example, sampler.run(0, *example.args)


def test_to_arviz_groups_names_and_dims(schools):
    example, result = schools
    idata = result.to_arviz()
    assert {"posterior", "sample_stats", "observed_data"} <= set(idata.groups())
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "theta_raw", "theta"}
    assert post["theta"].dims == ("chain", "draw", "school")
    assert post["theta_raw"].dims == ("chain", "draw", "school")
    assert post["mu"].shape == (CHAINS, DRAWS)
    np.testing.assert_array_equal(post["theta"].values, result.samples["theta"])
    stats = idata.sample_stats
    assert set(stats.data_vars) == set(STAT_NAMES.values())
    assert set(STAT_NAMES.values()) == {
        "diverging",
        "energy",
        "lp",
        "tree_depth",
        "n_steps",
        "acceptance_rate",
        "step_size",
    }
    np.testing.assert_array_equal(stats["lp"], -result.extra["potential_energy"])
    np.testing.assert_array_equal(stats["n_steps"], result.extra["num_steps"])
    np.testing.assert_array_equal(stats["acceptance_rate"], result.extra["accept_prob"])
    assert stats["diverging"].dtype == bool
    assert idata.observed_data["y"].dims == ("school",)
    np.testing.assert_array_equal(idata.observed_data["y"], example.args[1])


def test_arviz_diagnostics_agree_with_chainmesh(schools):
    _, result = schools
    idata = result.to_arviz()
    table = az.summary(idata, round_to="none")
    rows = result.summary(print_=False)
    assert set(table.index) == set(rows)
    rhat = az.rhat(idata)
    rhat64 = az.rhat(idata.posterior.astype("float64"))
    ess = az.ess(idata, method="bulk")
    for label, row in rows.items():
        name, _, index = label.partition("[")
        pick = {"school": int(index[:-1])} if index else {}
        x = result.samples[name][..., pick["school"]] if pick else result.samples[name]
        ours = cm.diagnostics.r_hat(x)
        assert table.loc[label, "mean"] == pytest.approx(row["mean"], rel=1e-5)
        assert table.loc[label, "sd"] == pytest.approx(row["sd"], rel=1e-4)
        # Same rank-normalized split R-hat; ArviZ folds float32 draws in
        # float32, which reorders near-ties of |x - median|: ~1e-5 apart.
        assert float(rhat[name].sel(pick)) == pytest.approx(ours, abs=1e-4)
        assert float(rhat64[name].sel(pick)) == pytest.approx(ours, abs=1e-10)
        assert table.loc[label, "r_hat"] == pytest.approx(ours, abs=1e-4)
        # Bulk ESS: both use Stan's estimator (with its last-term correction).
        assert float(ess[name].sel(pick)) == pytest.approx(row["ess_bulk"], rel=1e-6)
    energy = result.extra["energy"].astype(np.float64)
    centered = energy - energy.mean(axis=1, keepdims=True)
    direct = (np.diff(energy, axis=1) ** 2).sum(1) / (centered**2).sum(1)
    np.testing.assert_allclose(az.bfmi(idata), direct, rtol=1e-4)


def test_predictive_and_arviz_posterior_predictive(schools):
    example, result = schools
    sigma = example.args[0]
    predictive = Predictive(example.model, result.samples, batch_ndims=2)
    grouped = predictive(jax.random.key(1), sigma)
    assert grouped["y"].shape == (CHAINS, DRAWS, 8)
    flat = Predictive(example.model, result.get_samples(group_by_chain=False))
    assert flat(jax.random.key(1), sigma)["y"].shape == (CHAINS * DRAWS, 8)
    np.testing.assert_allclose(
        grouped["theta"], result.samples["theta"], rtol=1e-5, atol=1e-5
    )
    idata = result.to_arviz(posterior_predictive=grouped, log_likelihood=True)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "school")
    assert idata.log_likelihood["y"].shape == (CHAINS, DRAWS, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto k: 8 schools is small
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    with pytest.raises(ValueError, match="one value per draw"):
        result.to_arviz(posterior_predictive={"y": np.zeros((5, 8))})


def test_to_arviz_traces_the_model_under_the_compile_lock(schools):
    """NumPyro's handler stack is process-wide: to_arviz traces the model only
    while it holds COMPILE_LOCK, so it waits for a thread that holds the lock
    (here the test's own) and traces once the lock is free."""
    example, result = schools
    traced = threading.Event()

    def model(*args, **kwargs):
        traced.set()
        return example.model(*args, **kwargs)

    result = dataclasses.replace(result, model=model)
    out = {}
    worker = threading.Thread(
        target=lambda: out.update(idata=result.to_arviz(log_likelihood=True)),
        daemon=True,
    )
    with COMPILE_LOCK:
        worker.start()
        traced_while_held = traced.wait(timeout=3)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert not traced_while_held and traced.is_set()
    assert {"observed_data", "log_likelihood"} <= set(out["idata"].groups())


def test_to_arviz_without_arviz_names_the_extra(schools, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"pip install chainmesh\[arviz\]"):
        schools[1].to_arviz()


def _plated(X, y=None):
    w = numpyro.sample("w", dist.Normal(0, 1).expand([3, 2]).to_event(2))
    with numpyro.plate("group", 4, dim=-2):
        with numpyro.plate("item", 5, dim=-1):
            z = numpyro.sample("z", dist.Normal(0, 1))
        u = numpyro.sample("u", dist.Normal(0, 1).expand([1, 2]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        v = numpyro.sample("v", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.deterministic("vsum", v.sum(-1))
        numpyro.sample("y", dist.Normal(X @ w[:, 0] + z.sum() + u.sum(), 1), obs=y)


def test_site_dims_follow_plates_and_skip_broadcast_dims():
    X = np.zeros((7, 3), np.float32)
    tr = numpyro.handlers.trace(numpyro.handlers.seed(_plated, 0)).get_trace(X)
    dims = model_dims(tr)
    assert "w" not in dims  # no plate: default names
    assert dims["z"] == ["group", "item"]
    assert dims["u"] == ["group", None, None]  # the size-1 item dim is a broadcast
    assert dims["v"] == ["obs", None]  # event dim after the plate dim
    assert dims["vsum"] == ["obs"]
    assert dims["y"] == ["obs"]


def _chain_device(block):
    """Which device of the chain axis ran this chain, and the chain's value."""
    return jax.lax.axis_index(CHAIN), block * 2


@pytest.mark.parametrize(
    ("chains", "mesh", "expected"),
    [
        (9, None, [0, 0, 1, 1, 2, 2, 3, 3, 4]),  # 5 devices x 2, 1 padding
        (10, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]),  # 4 devices x 3, 2 padding
        (16, None, [d for d in range(8) for _ in range(2)]),
    ],
)
def test_chain_method_places_chains_by_the_padding_rule(chains, mesh, expected):
    run = cm.chain_method(mesh)(_chain_device)
    device, doubled = run(jnp.arange(chains, dtype=jnp.float32))
    np.testing.assert_array_equal(device, expected)
    np.testing.assert_array_equal(doubled, 2 * np.arange(chains))
    if chains == 16:
        assert len(doubled.sharding.device_set) == 8  # kept sharded, no gather


def test_chain_method_takes_typed_keys_none_leaves_and_meshes():
    keys = jax.random.split(jax.random.key(0), 5)
    mesh = Mesh(np.asarray(jax.devices()[:2]), (CHAIN,))

    def draw(args):
        key, state, params = args
        assert state is None and params is None
        return jax.random.normal(key)

    out = cm.chain_method(mesh)(draw)((keys, None, None))
    np.testing.assert_array_equal(out, jax.vmap(jax.random.normal)(keys))
    with pytest.raises(ValueError, match="one-axis mesh named 'chain'"):
        cm.chain_method(Mesh(np.asarray(jax.devices()[:2]), ("x",)))
    with pytest.raises(ValueError, match="devices=9"):
        cm.chain_method(9)
    with pytest.raises(ValueError, match="same leading chain axis"):
        cm.chain_method()(draw)((keys, jnp.zeros(3), None))


def test_numpyro_mcmc_with_chain_method_matches_vectorized():
    X, y = linreg_data()
    runs = {}
    for method in ("vectorized", cm.chain_method()):
        mcmc = MCMC(
            NUTS(linreg),
            num_warmup=200,
            num_samples=DRAWS,
            num_chains=9,  # 5 devices x 2 chains, 1 padding chain
            chain_method=method,
            progress_bar=False,
        )
        mcmc.run(jax.random.key(3), X, y, extra_fields=("energy",))
        runs[method if isinstance(method, str) else "sharded"] = mcmc
    vec, sharded = runs["vectorized"], runs["sharded"]
    samples = sharded.get_samples(group_by_chain=True)
    assert samples["beta"].shape == (9, DRAWS, 3)
    assert sharded.get_extra_fields(group_by_chain=True)["energy"].shape == (9, DRAWS)
    assert sharded.get_samples()["sigma"].shape == (9 * DRAWS,)
    reference = vec.get_samples(group_by_chain=True)
    for name in ("beta", "sigma"):
        a = np.asarray(samples[name]).reshape(9, DRAWS, -1)
        b = np.asarray(reference[name]).reshape(9, DRAWS, -1)
        for j in range(a.shape[-1]):
            mcse2 = sum(
                x[..., j].var() / cm.diagnostics.ess_bulk(x[..., j]) for x in (a, b)
            )
            diff = abs(a[..., j].mean() - b[..., j].mean())
            assert diff < 4 * np.sqrt(mcse2), (name, j)
            assert cm.diagnostics.r_hat(a[..., j]) < 1.02


def test_demo_plot_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from chainmesh.cli import main

    argv = ["demo", "--devices", "8", "--chains", "4", "--warmup", "60"]
    argv += ["--samples", "60", "--no-progress", "--plot", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("trace_rank.png", "ess_per_second.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {png}" in printed


def test_numpyro_warmup_then_run_passes_sharded_state_back():
    X, y = linreg_data()
    mesh = Mesh(np.asarray(jax.devices()[:4]), (CHAIN,))
    mcmc = MCMC(
        NUTS(linreg),
        num_warmup=60,
        num_samples=40,
        num_chains=7,  # 4 devices x 2 chains, 1 padding chain
        chain_method=cm.chain_method(mesh),
        progress_bar=False,
        jit_model_args=True,
    )
    mcmc.warmup(jax.random.key(0), X, y)
    warm = mcmc.post_warmup_state
    assert warm.z["beta"].shape == (7, 3) and np.all(np.asarray(warm.i) == 60)
    mcmc.run(jax.random.key(1), X, y)
    assert mcmc.get_samples(group_by_chain=True)["beta"].shape == (7, 40, 3)
    assert np.all(np.asarray(mcmc.last_state.i) == 100)
    step = np.asarray(mcmc.last_state.adapt_state.step_size)
    np.testing.assert_array_equal(step, np.asarray(warm.adapt_state.step_size))
