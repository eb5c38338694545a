"""The fault table of docs/reliability.md, row by row (single process)."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import linreg, linreg_data

import chainmesh as cm

SMALL = {"num_chains": 4, "devices": 2, "num_warmup": 200, "num_samples": 300}


def test_nonfinite_data_rejected_before_compiling(count_compiles):
    X, y = linreg_data()
    sampler = cm.Sampler(linreg, progress_bar=False, **SMALL)
    y_bad = y.copy()
    y_bad[[3, 7]] = [np.nan, np.inf]
    with count_compiles() as c:
        with pytest.raises(ValueError, match=r"args\[1\] holds 2 NaN/inf"):
            sampler.run(0, X, y_bad)
        with pytest.raises(ValueError, match=r"kwargs\['y'\] holds 2 NaN/inf"):
            sampler.run(0, X, y=y_bad)
    assert c.count == 0


def failing_model(y):
    numpyro.sample("mu", dist.Normal(0.0, 1.0))
    raise RuntimeError("boom: the model's own message")


def test_model_error_surfaces_with_its_message(count_compiles):
    sampler = cm.Sampler(failing_model, progress_bar=False, **SMALL)
    with count_compiles() as c, pytest.raises(RuntimeError, match="boom: the model"):
        sampler.run(0, np.zeros(3, np.float32))
    assert c.count == 0


def nan_beyond_one(scale):
    """A standard normal whose density is NaN for x > 1."""
    x = numpyro.sample("x", dist.Normal(0.0, scale))
    numpyro.factor("hole", jnp.where(x > 1.0, jnp.nan, 0.0))


def test_nan_potential_mid_run_is_a_divergence():
    result = cm.Sampler(nan_beyond_one, progress_bar=False, **SMALL).run(
        0, np.float32(1.0)
    )
    x = result.samples["x"]
    assert np.all(np.isfinite(x)) and x.max() <= 1.0
    assert result.stats["divergences"] > 0
    assert result.stats["divergences"] == int(result.extra["diverging"].sum())
    assert result.samples["x"].shape == (4, 300)
