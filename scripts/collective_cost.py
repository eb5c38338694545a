"""The cost of one collective on a CPU mesh: N all-gathers (or psums) against N
no-ops in one jitted shard_map loop, for meshes of 1, 2, 4 and 8 devices.

Usage: python scripts/collective_cost.py [--devices 1,2,4,8] [--steps 2000]
       [--lanes 8] [--width 42] [--repeats 5]

Each device holds ``lanes`` rows of ``width`` floats (ChEES on eight schools:
8 chains, 4 d + 2 = 42 floats a lane). The loop body is the same with and
without the collective (a multiply-add that depends on the previous
iteration), so the difference of the two loop times, over ``steps``, is the
cost of one collective. Each mesh size runs in its own process (the device
count is fixed when JAX starts), single-threaded like the benchmarks; the
table gives the best of ``repeats`` warm calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(devices: int, steps: int, lanes: int, width: int, repeats: int) -> dict:
    """Microseconds per loop iteration with and without a collective."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:devices]), ("chain",))

    def loop(kind: str):
        def body(_, x):
            if kind == "all_gather":
                y = lax.all_gather(x, "chain", tiled=True)[:lanes]
            elif kind == "psum":
                y = lax.psum(x, "chain")
            else:
                y = x
            return 0.5 * y + 1.0

        def block(x):
            return lax.fori_loop(0, steps, body, x)

        spec = P("chain")
        fn = jax.shard_map(
            block, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
        )
        return jax.jit(fn)

    x = jax.device_put(
        jnp.ones((devices * lanes, width), jnp.float32),
        NamedSharding(mesh, P("chain")),
    )
    row = {"devices": devices}
    for kind in ("none", "all_gather", "psum"):
        fn = loop(kind)
        fn(x).block_until_ready()  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x).block_until_ready()
            best = min(best, time.perf_counter() - start)
        row[kind] = 1e6 * best / steps
    for kind in ("all_gather", "psum"):
        row[f"{kind}_cost"] = row[kind] - row["none"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--width", type=int, default=42)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.steps, a.lanes, a.width, a.repeats)))
        return
    print("| devices | no-op loop (us) | all_gather (us) | psum (us) |")
    print("|---|---|---|---|")
    for devices in map(int, a.devices.split(",")):
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={devices} "
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        options = [f"--{k}={getattr(a, k)}" for k in ("steps", "lanes", "width")]
        out = subprocess.run(
            [sys.executable, __file__, f"--one={devices}", *options,
             f"--repeats={a.repeats}"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {devices} | {row['none']:.2f} | {row['all_gather_cost']:.1f} "
            f"| {row['psum_cost']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
