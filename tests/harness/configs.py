"""Sampler configurations every harness test runs: adding a kernel is one line.

``CONFIGS`` maps a test id to ``chainmesh.Sampler`` keyword options. The
posteriordb and SBC tests are parametrized over it; a posterior's or an SBC
model's own settings (``dense_mass``, ``target_accept_prob``) are added on top
by ``options``, minus those a kernel does not take (``UNSUPPORTED``).
"""

from __future__ import annotations

from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "nuts-vmap": {"inner": "vmap"},
    "nuts-map": {"inner": "map"},
    "nuts-ensemble": {"adapt": "ensemble"},
    "chees": {"kernel": "chees"},
    "chees-fisher": {"kernel": "chees", "metric": "fisher"},
    "chees-lowrank": {"kernel": "chees", "metric": "lowrank"},
    "nuts-async": {"inner": "async"},
    # One lane for every two chains: lanes hand chains over as they finish.
    "nuts-async-lanes": {"inner": "async", "lanes": 1, "devices": 2},
}

UNSUPPORTED: dict[str, tuple[str, ...]] = {
    # ChEES adapts its own acceptance target (0.651) and no dense metric: a
    # posterior's dense_mass=True would conflict with its metric.
    "chees": ("dense_mass", "target_accept_prob"),
    "chees-fisher": ("dense_mass", "target_accept_prob"),
    "chees-lowrank": ("dense_mass", "target_accept_prob"),
}


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
