"""Bad data and bad directories: clear errors that name the argument, early."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import linreg, linreg_data, normal_mean

import chainmesh as cm
from chainmesh import validation

Y = np.linspace(-1.0, 1.0, 10).astype(np.float32)
SMALL = {"num_chains": 2, "devices": 2, "num_warmup": 20, "num_samples": 20}


def _big(x: np.ndarray) -> np.ndarray:
    out = x.astype(np.float64)
    out[2] = 1e39  # finite in float64, inf in the float32 the program receives
    return out


# (model arguments as (args, kwargs), error, message): every row raises before
# anything compiles.
BAD_DATA = [
    (((Y.tolist() + [float("nan")],), {}), ValueError, r"args\[0\] holds 1 NaN"),
    (((_big(Y),), {}), ValueError, r"args\[0\] holds 1 NaN/inf.*cast to float32"),
    (((), {"y": _big(Y)}), ValueError, r"kwargs\['y'\] holds 1 NaN/inf.*float32"),
]


@pytest.mark.parametrize(("data", "error", "match"), BAD_DATA)
def test_bad_data_raises_before_compiling(data, error, match, count_compiles):
    args, kwargs = data
    sampler = cm.Sampler(normal_mean, progress_bar=False, **SMALL)
    with count_compiles() as c, pytest.raises(error, match=match):
        sampler.run(0, *args, **kwargs)
    assert c.count == 0


@pytest.mark.parametrize(
    ("args", "kwargs"), [(("text",), {}), (([Y, "x"],), {}), ((Y,), {"extra": 3})]
)
def test_static_values_where_data_belongs_are_named(args, kwargs):
    """Non-arrays are static values of the model: a model that wanted data
    fails with its own error while it is traced (before any NUTS program is
    compiled), and a note names what chainmesh passed."""
    sampler = cm.Sampler(normal_mean, progress_bar=False, **SMALL)
    with pytest.raises(Exception) as info:
        sampler.run(0, *args, **kwargs)
    assert "as static Python values" in "\n".join(getattr(info.value, "__notes__", []))


def test_a_list_of_numbers_is_data_like_numpy():
    sampler = cm.Sampler(normal_mean, progress_bar=False, **SMALL)
    as_array = sampler.run(0, Y)
    as_list = sampler.run(0, Y.tolist())  # float64 values of float32 numbers
    np.testing.assert_array_equal(as_array.samples["mu"], as_list.samples["mu"])
    X, y = linreg_data()
    nested = cm.Sampler(linreg, progress_bar=False, **SMALL).run(0, X.tolist(), y)
    assert nested.samples["beta"].shape == (2, 20, 3)


def test_device_data_is_checked_on_device(monkeypatch):
    """A NaN in a JAX array is found without copying the array to the host."""
    y = jnp.asarray(Y).at[4].set(jnp.nan)
    good = jnp.asarray(Y)

    def no_host_copy(self, *args, **kwargs):
        raise AssertionError("device data copied to host by the finite check")

    monkeypatch.setattr(type(good), "__array__", no_host_copy)
    validation.check_finite((good,), {})  # passes, on device
    with pytest.raises(ValueError, match=r"args\[0\] holds 1 NaN/inf"):
        validation.check_finite((y,), {"scale": np.float32(1.0)})


def test_python_float_checked_after_the_cast():
    with pytest.raises(ValueError, match=r"kwargs\['s'\].*cast to float32"):
        validation.check_finite((), {"s": 1e39})
    validation.check_finite((), {"s": 1e30})
    jax.config.update("jax_enable_x64", True)
    try:
        validation.check_finite((), {"s": 1e39})  # fits float64
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("option", ["store", "checkpoint_dir"])
def test_unusable_directory_is_named(option, count_compiles, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for path in ("/proc/nope", str(blocker / "sub")):
        with count_compiles() as c, pytest.raises(ValueError, match=option):
            cm.Sampler(normal_mean, **{option: path})
        assert c.count == 0
