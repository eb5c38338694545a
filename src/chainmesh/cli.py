"""The ``chainmesh`` command: ``demo`` (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="sample a logistic regression (N=5000, P=20) on a CPU device mesh",
    )
    p.add_argument("--devices", type=int, default=4, help="host CPU devices (4)")
    p.add_argument("--chains", type=int, default=16, help="chains (16)")
    p.add_argument("--warmup", type=int, default=500, help="warmup per chain (500)")
    p.add_argument("--samples", type=int, default=1000, help="draws per chain (1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner", choices=("vmap", "map", "async"), default="vmap")
    p.add_argument("--lanes", type=int, default=None, help="async lanes per device")
    p.add_argument("--kernel", choices=("nuts", "chees", "mams"), default="nuts")
    p.add_argument("--adapt", choices=("chain", "ensemble"), default="chain")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write trace_rank.png and ess_per_second.png into DIR (needs matplotlib)",
    )


def demo(args: argparse.Namespace) -> int:
    """Sample the embedded model and print what a user wants to know."""
    import chainmesh as cm

    cm.set_host_device_count(args.devices)  # before JAX starts its backends
    import numpy as np

    from chainmesh.examples import logistic_data

    example = logistic_data(seed=0)
    sampler = cm.Sampler(
        example.model,
        num_chains=args.chains,
        num_warmup=args.warmup,
        num_samples=args.samples,
        devices=args.devices,
        inner=args.inner,
        lanes=args.lanes,
        kernel=args.kernel,
        adapt=args.adapt,
        progress_bar=not args.no_progress,
    )
    print(f"plan: {sampler.plan}")
    result = sampler.run(args.seed, *example.args)
    rows = result.summary(print_=False)
    truth = np.concatenate([[example.truth["alpha"]], example.truth["beta"]])
    labels = ["alpha"] + [f"beta[{i}]" for i in range(len(example.truth["beta"]))]
    print(f"\n{'':>10}{'true':>9}{'mean':>9}{'sd':>8}{'r_hat':>8}{'ess_bulk':>10}")
    for label, true in zip(labels, truth, strict=True):
        r = rows[label]
        print(
            f"{label:>10}{true:9.3f}{r['mean']:9.3f}{r['sd']:8.3f}"
            f"{r['r_hat']:8.3f}{r['ess_bulk']:10.0f}"
        )
    s = result.stats
    ess = np.array([rows[k]["ess_bulk"] for k in labels])
    pairs = zip(labels, truth, strict=True)
    covered = np.mean([rows[k]["5%"] <= t <= rows[k]["95%"] for k, t in pairs])
    print(
        f"\ndivergences: {s['divergences']}   max r_hat: "
        f"{max(rows[k]['r_hat'] for k in labels):.3f}   min ess_bulk: {ess.min():.0f}"
        f"   true value inside the 90% interval: {100 * covered:.0f}% of coefficients"
    )
    print(
        f"compile: {s['compile_s']:.1f} s ({s['compilations']} programs)   warmup: "
        f"{s['warmup_s']:.1f} s   sampling: {s['sampling_s']:.1f} s   "
        f"min ESS/s (sampling): {ess.min() / s['sampling_s']:.0f}"
    )
    print(
        f"leapfrog steps: {s['leapfrog_steps']}   gradients/s: "
        f"{s['gradients_per_s']:.3g}   lockstep efficiency: "
        f"{s['lockstep_efficiency']:.2f} (warmup {s['lockstep_efficiency_warmup']:.2f})"
    )
    if args.plot:
        from chainmesh.plots import save_plots

        for path in save_plots(result, args.plot):
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chainmesh`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from chainmesh import distributed

        return distributed.main(argv[1:])
    if argv[:1] == ["bench"]:  # loaded only when asked for
        if any(a == "--suite" or a.startswith("--suite=") for a in argv[1:]):
            from chainmesh.bench import suite

            return suite.main(argv[1:])
        from chainmesh.bench import runner

        return runner.main(argv[1:])
    parser = argparse.ArgumentParser(prog="chainmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    sub.add_parser(
        "bench",
        help="benchmark chainmesh against NumPyro (chainmesh bench --help); "
        "--suite posteriordb|models scores every configuration and peer on "
        "every posterior (chainmesh bench --suite posteriordb --help)",
    )
    sub.add_parser(
        "launch",
        help="run a command as P local processes joined by jax.distributed: "
        "launch --processes P --devices-per-process D -- python script.py",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
