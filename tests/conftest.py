"""Eight host CPU devices for every test, set before JAX starts."""

import os
import re

_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    [
        *re.sub(rf"{_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split(),
        f"{_FLAG}=8",
    ]
)

# The disk cache of compiled programs is off unless a test turns it on (with
# Sampler(cache_dir=...)): compile counts must not depend on earlier runs.
os.environ["CHAINMESH_CACHE_DIR"] = ""

import contextlib  # noqa: E402

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import pytest  # noqa: E402

_COMPILES = [0]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCounter:
    """Counts XLA backend compilations inside a ``with`` block."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        start = _COMPILES[0]
        yield self
        self.count = _COMPILES[0] - start


@pytest.fixture
def count_compiles() -> CompileCounter:
    """``with count_compiles() as c: ...; c.count`` is JAX's own compile count."""
    return CompileCounter()


def pytest_configure(config) -> None:
    assert len(jax.devices()) == 8, "tests need 8 host devices (see conftest.py)"
