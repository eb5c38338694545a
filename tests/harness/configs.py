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
    "nuts-async": {"inner": "async"},
    # One lane for every two chains: lanes hand chains over as they finish.
    "nuts-async-lanes": {"inner": "async", "lanes": 1, "devices": 2},
}

UNSUPPORTED: dict[str, tuple[str, ...]] = {
    # ChEES adapts a diagonal metric and its own acceptance target (0.651).
    "chees": ("dense_mass", "target_accept_prob"),
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
