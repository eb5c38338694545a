"""Sampler configurations every harness test runs: adding a kernel is one line.

``CONFIGS`` (from ``chainmesh.bench.targets``) maps a test id to
``chainmesh.Sampler`` keyword options. The posteriordb and SBC tests are
parametrized over it; a posterior's or an SBC model's own settings
(``dense_mass``, ``target_accept_prob``) are added on top by ``options``,
minus those a kernel does not take (``UNSUPPORTED``).
"""

from __future__ import annotations

from chainmesh.bench.targets import (
    CONFIGS,
    UNSUPPORTED,
    config_devices,
    config_options,
)

# One table for the harness and ``chainmesh bench --suite`` (which names its
# runs by these keys): the package holds it, the harness reads it.
__all__ = ["CONFIGS", "UNSUPPORTED", "devices", "options", "sbc_cases"]

SBC_ONLY = {
    # The Fisher metrics share the low-rank configurations' transition
    # (NUTS on whitened coordinates) and update; their estimator is new
    # code, and eight schools (a funnel) is where it can go wrong.
    "nuts-fisher": ("eight_schools_noncentered",),
    "nuts-ensemble-fisher": ("eight_schools_noncentered",),
    # MAMS's velocity lives on a sphere: normal_mean has one parameter.
    "mams": ("eight_schools_noncentered", "logistic"),
}
"""SBC models a configuration runs, where not every one: each distinct code
path keeps SBC cases, and the suite stays within its time budget."""


def sbc_cases(models: list[str]) -> list[tuple[str, str]]:
    """(configuration, SBC model) pairs the SBC test runs."""
    return [(c, m) for c in CONFIGS for m in models if m in SBC_ONLY.get(c, models)]


options = config_options
"""The Sampler options of a configuration for a model's own options."""

devices = config_devices
"""Devices a configuration runs on: its own ``devices``, else the default."""
