"""Sampler configurations every harness test runs: adding a kernel is one line.

``CONFIGS`` maps a test id to ``chainmesh.Sampler`` keyword options. The
posteriordb and SBC tests are parametrized over it; a posterior's or an SBC
model's own settings (``dense_mass``, ``target_accept_prob``) are added on top.
"""

from __future__ import annotations

from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "nuts-vmap": {"inner": "vmap"},
    "nuts-map": {"inner": "map"},
}
