"""Where a cold start's seconds go: trace, lower and XLA per program build.

Usage: python scripts/compile_profile.py [--devices 4] [--chains 16] [--cache DIR]

Runs the demo (logistic regression N=5000 P=20, 500 + 1000) once in this fresh
process and prints ``Result.stats``'s compile breakdown. With ``--cache DIR``
the XLA stage reads and fills chainmesh's disk cache: run it twice, the second
run is what every later process pays.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--cache", default=None, help="disk cache dir (default off)")
    options = parser.parse_args()
    start = time.perf_counter()
    import chainmesh as cm

    cm.set_host_device_count(options.devices)
    from chainmesh.examples import logistic_data

    example = logistic_data(seed=0)
    sampler = cm.Sampler(
        example.model,
        num_chains=options.chains,
        num_warmup=500,
        num_samples=1000,
        devices=options.devices,
        progress_bar=False,
        cache_dir=options.cache or False,
    )
    stats = sampler.run(0, *example.args).stats
    keys = ("compile_s", "compile_trace_s", "compile_lower_s", "compile_xla_s")
    keys += ("warmup_s", "sampling_s", "gradients_per_s")
    report = {k: round(stats[k], 2) for k in keys}
    report["programs_from_disk"] = stats["programs_from_disk"]
    report["wall_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
