"""Sampler configurations every harness test runs: adding a kernel is one line.

``CONFIGS`` (from ``chainmesh.bench.targets``) maps a test id to
``chainmesh.Sampler`` keyword options. The posteriordb and SBC tests are
parametrized over it; a posterior's or an SBC model's own settings
(``dense_mass``, ``target_accept_prob``) are added on top by ``options``,
minus those a kernel does not take (``UNSUPPORTED``).
"""

from __future__ import annotations

from typing import Any

from chainmesh.bench.targets import CONFIGS, UNSUPPORTED

# One table for the harness and ``chainmesh bench --suite`` (which names its
# runs by these keys): the package holds it, the harness reads it.
__all__ = ["CONFIGS", "UNSUPPORTED", "devices", "options"]


def options(config: str, model_options: dict[str, Any]) -> dict[str, Any]:
    """The Sampler options of ``config`` for a model with ``model_options``
    (``devices`` apart: see ``devices``)."""
    dropped = UNSUPPORTED.get(config, ())
    kept = {k: v for k, v in model_options.items() if k not in dropped}
    own = {k: v for k, v in CONFIGS[config].items() if k != "devices"}
    return {**own, **kept}


def devices(config: str, default: int) -> int:
    """Devices ``config`` runs on: its own ``devices``, else ``default``."""
    return CONFIGS[config].get("devices", default)
