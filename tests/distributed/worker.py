"""One process of a multi-process run (started by ``chainmesh launch``).

Usage: worker.py OUT.npz [fail]
Samples 8 chains over every device of every process; process 0 writes the
draws. With ``fail``, process 1 dies (os._exit(3)) right after joining.
"""

import json
import os
import sys

import chainmesh as cm

cm.distributed.initialize()  # the README's spelling
sys.path.insert(0, __file__.rsplit("/", 2)[0])
import jax  # noqa: E402
import numpy as np  # noqa: E402
from models import linreg, linreg_data  # noqa: E402

OTHERS = {
    "chees": {"kernel": "chees"},
    "mams": {"kernel": "mams"},
    "ensemble": {"adapt": "ensemble"},
    "async": {"inner": "async", "lanes": 1},
    "ensemble-lowrank": {"adapt": "ensemble", "metric": "lowrank"},
}

from chainmesh.mesh import plan_chains  # noqa: E402

if sys.argv[2:] == ["fail"] and jax.process_index() == 1:
    os._exit(3)  # die abruptly, like a crash
X, y = linreg_data()
config = {"num_chains": 8, "num_warmup": 100, "num_samples": 100}
result = cm.Sampler(linreg, progress_bar=False, **config).run(0, X, y)
plan = plan_chains(8, jax.devices())
assert result.plan.num_devices == plan.num_devices == len(jax.devices())
assert result.samples["beta"].shape == (8, 100, 3)  # every process: all draws
main_only = cm.Sampler(linreg, progress_bar=False, gather="main", **config)
kept = main_only.run(0, X, y)
if cm.distributed.is_main_process():
    np.testing.assert_array_equal(kept.samples["beta"], result.samples["beta"])
else:
    assert kept.samples == {} and kept.extra == {}
# Ensemble kernels pool over the chains of both processes; async lanes.
others = {
    name: cm.Sampler(linreg, progress_bar=False, **options, **config).run(0, X, y)
    for name, options in OTHERS.items()
}
# Warmup and sampling stop on decisions every process must take alike; the
# others hold no draws (gather="main"): process 0's numbers decide.
AUTO = {"num_warmup": "auto", "target_ess": 200, "chunk_size": 25}
auto = cm.Sampler(linreg, progress_bar=False, gather="main", num_chains=8, **AUTO)
decided = auto.run(0, X, y)
stop = decided.stats["stop"]
assert stop["reason"] == "targets" and stop["warmup_reason"] == "settled"
if not cm.distributed.is_main_process():
    assert decided.samples == {}
others["auto"] = decided
if cm.distributed.is_main_process():
    np.savez(
        sys.argv[1] + ".stop.npz",
        stop=json.dumps({k: stop[k] for k in ("warmup", "samples", "draws")}),
    )
    np.savez(
        sys.argv[1],
        processes=jax.process_count(),
        devices=len(jax.devices()),
        **{f"samples.{k}": v for k, v in result.samples.items()},
        **{f"extra.{k}": v for k, v in result.extra.items()},
        **{
            f"{name}.{group}.{k}": v
            for name, r in others.items()
            for group in ("samples", "extra")
            for k, v in getattr(r, group).items()
        },
    )
