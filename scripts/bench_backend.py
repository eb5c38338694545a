"""The seed backend's device loop vs ``ShardedBackend``: same model, same chains.

Usage::

    python scripts/bench_backend.py [--devices 4] [--chains 8] [--n 2000] [--p 10]

The host CPU is split into ``--devices`` JAX devices. The device loop is the
pattern chainmesh replaces (DESIGN.md, "The pattern we replace"), written here
with NumPyro directly: chains split floor + remainder, then for each device in
turn a new ``MCMC(NUTS(...), chain_method="parallel")`` runs inside
``jax.default_device(d)``. Each backend is timed cold (first call, compiles
included) and warm (median of ``--repeats`` more calls, new seeds).
"""

from __future__ import annotations

import argparse
import time

import chainmesh as cm


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4, help="host CPU devices (4)")
    p.add_argument("--chains", type=int, default=8, help="chains (8)")
    p.add_argument("--warmup", type=int, default=500, help="warmup per chain (500)")
    p.add_argument("--samples", type=int, default=1000, help="draws per chain (1000)")
    p.add_argument("--n", type=int, default=2000, help="data points (2000)")
    p.add_argument("--p", type=int, default=10, help="covariates (10)")
    p.add_argument("--repeats", type=int, default=3, help="warm calls, median (3)")
    return p.parse_args()


def seed_device_loop(model, config, rng_key, args, devices):
    """The seed backend's ``run``: one ``MCMC.run`` per device, in turn."""
    import jax
    import numpy as np
    from numpyro.infer import MCMC, NUTS, init_to_median

    base, rem = divmod(config.num_chains, len(devices))
    counts = [base + (i < rem) for i in range(len(devices))]
    keys = jax.random.split(rng_key, len(devices))
    parts = []
    for device, count, key in zip(devices, counts, keys, strict=True):
        if count == 0:
            continue
        with jax.default_device(device):
            kernel = NUTS(
                model,
                target_accept_prob=config.target_accept_prob,
                max_tree_depth=config.max_tree_depth,
                dense_mass=config.dense_mass,
                init_strategy=init_to_median,
            )
            mcmc = MCMC(
                kernel,
                num_warmup=config.num_warmup,
                num_samples=config.num_samples,
                num_chains=count,
                chain_method="parallel",
                progress_bar=False,
            )
            mcmc.run(
                key,
                *args,
                extra_fields=(
                    "energy",
                    "diverging",
                    "accept_prob",
                    "num_steps",
                    "potential_energy",
                ),
            )
            parts.append(jax.device_get(mcmc.get_samples()))
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    opts = parse_args()
    cm.set_host_device_count(opts.devices)  # before JAX starts its backends
    import jax
    import numpy as np

    from chainmesh.backends import CMCConfig, ShardedBackend
    from chainmesh.examples import logistic_data

    example = logistic_data(seed=0, n=opts.n, p=opts.p)
    config = CMCConfig(
        num_chains=opts.chains, num_warmup=opts.warmup, num_samples=opts.samples
    )
    devices = jax.devices()[: opts.devices]
    print(
        f"logistic regression N={opts.n} P={opts.p}; {opts.chains} chains on "
        f"{len(devices)} {devices[0].platform} devices; warmup {opts.warmup}, "
        f"samples {opts.samples}; jax {jax.__version__}"
    )

    def loop(seed):
        key = jax.random.PRNGKey(seed)
        return seed_device_loop(example.model, config, key, example.args, devices)

    backend = ShardedBackend(devices=devices)

    def sharded(seed):
        return backend.run(example.model, config, seed, model_args=example.args)

    rows = {}
    for name, fn in (("device loop (seed)", loop), ("ShardedBackend", sharded)):
        draws, cold = timed(fn, 0)
        warm = float(np.median([timed(fn, 1 + r)[1] for r in range(opts.repeats)]))
        rows[name] = (cold, warm, draws)
        assert draws["beta"].shape == (opts.chains * opts.samples, opts.p)

    print(f"\n{'':<20}{'cold s':>9}{'warm s':>9}{'alpha mean':>12}")
    for name, (cold, warm, draws) in rows.items():
        print(f"{name:<20}{cold:>9.2f}{warm:>9.2f}{np.mean(draws['alpha']):>12.3f}")
    (lc, lw, _), (sc, sw, _) = rows.values()
    print(
        f"\nratio device loop / ShardedBackend: cold {lc / sc:.2f}x, warm "
        f"{lw / sw:.2f}x (true alpha {float(example.truth['alpha']):.3f})"
    )
    stats = backend.last_result.stats
    print(
        f"ShardedBackend warm call: {stats['compilations']} compilations, "
        f"lockstep efficiency {stats['lockstep_efficiency']:.2f}, plan "
        f"{backend.last_result.plan}"
    )


if __name__ == "__main__":
    main()
