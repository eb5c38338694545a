"""One run of ``chainmesh bench --suite``: a sampler on a posterior, in its own process.

``python -m chainmesh.bench.suite_worker --json-args JOB`` loads the target,
makes a cold call (compilation included) and a warm call of the sampler with
another seed, and prints ``BENCH_RESULT {...}``: the warm call's per-parameter
summary (mean, sd, bulk and tail ESS, R-hat, and the reference where known),
its gradients in warmup and sampling, divergences and seconds. The parent
(``chainmesh.bench.suite``) turns that into a scored record.

Seconds: ``wall_s`` is the warm call's wall time minus the compilation inside
it (``jax.monitoring``): zero for chainmesh, BlackJAX and nutpie, whose warm
calls reuse their programs; NumPyro's ``MCMC`` compiles again on every call
(data are closure constants), so it makes one call only, whose difference is
what its sampling costs once compiled (each program's results reach the host
before the next compiles, so no run time hides under a compilation).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.monitoring
import numpy as np

from chainmesh.bench import worker
from chainmesh.bench.peers import PeerDraws
from chainmesh.bench.targets import Target, config_devices, config_options

CHAINMESH = "chainmesh:"
"""Prefix of the chainmesh samplers' names: ``chainmesh:<configuration>``."""

COLD_NUTPIE_DRAWS = 20
"""Warmup and draws of nutpie's cold call: its JAX functions compile on the
first gradient whatever the length, and its gradients are the slowest."""

WALL_NOTES = {
    "nutpie": "Python-callback gradient",
    "numpyro": "compile subtracted (NumPyro compiles on every call)",
}
"""What a sampler's ``wall_s`` means where it is not a plain warm call."""


def summary(target: Target, samples: dict) -> dict[str, dict]:
    """Per scalar parameter: mean, sd, bulk and tail ESS, R-hat, reference."""
    from chainmesh.diagnostics import ess_bulk, ess_tail, r_hat

    draws = target.named({k: np.asarray(v) for k, v in samples.items()})
    missing = sorted(set(target.reference) - set(draws))
    if missing:
        raise KeyError(f"{target.name}: no draws of reference parameters {missing}")
    rows = {}
    for name, x in draws.items():
        x = np.asarray(x, dtype=np.float64)
        ref = target.reference.get(name, (None, None))
        rows[name] = {
            "mean": float(x.mean()),
            "sd": float(x.std(ddof=1)),
            "ess_bulk": ess_bulk(x),
            "ess_tail": ess_tail(x),
            "r_hat": r_hat(x),
            "ref_mean": ref[0],
            "ref_sd": ref[1],
        }
    return rows


def _chainmesh(job: dict, target: Target, config: str) -> Callable[[int], tuple]:
    import chainmesh as cm

    sampler = cm.Sampler(
        target.model,
        num_chains=job["chains"],
        num_warmup=job["warmup"],
        num_samples=job["samples"],
        devices=config_devices(config, job["devices"]),
        progress_bar=False,
        **config_options(config, target.options),
    )

    def call(seed: int, cold: bool = False) -> tuple:
        result = sampler.run(seed, *target.args)
        s = result.stats
        counts = (s["leapfrog_steps_warmup"], s["leapfrog_steps"], s["divergences"])
        return result.samples, *counts, str(sampler.plan)

    return call


def _numpyro(job: dict, target: Target) -> Callable[[int], tuple]:
    from numpyro.infer import MCMC, NUTS, init_to_median

    def call(seed: int) -> tuple:
        kernel = NUTS(target.model, init_strategy=init_to_median, **target.options)
        mcmc = MCMC(
            kernel,
            num_warmup=job["warmup"],
            num_samples=job["samples"],
            num_chains=job["chains"],
            chain_method="vectorized",
            progress_bar=False,
        )
        k_warm, k_sample = jax.random.split(jax.random.PRNGKey(seed))
        mcmc.warmup(
            k_warm, *target.args, extra_fields=("num_steps",), collect_warmup=True
        )
        # On the host before the next program compiles: no overlap to subtract.
        warm = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
        mcmc.run(k_sample, *target.args, extra_fields=("num_steps", "diverging"))
        extra = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
        samples = jax.device_get(mcmc.get_samples(group_by_chain=True))
        plan = f"{job['chains']} chains vectorized on the default device"
        return (
            samples,
            int(np.sum(warm["num_steps"])),
            int(np.sum(extra["num_steps"])),
            int(np.sum(extra["diverging"])),
            plan,
        )

    return call


def _peer(job: dict, target: Target, sampler: str) -> Callable[[int], tuple]:
    from chainmesh.bench import peers

    shape = (target.model, target.args, job["chains"], job["warmup"], job["samples"])
    dense = bool(target.options.get("dense_mass", False))
    if sampler == "blackjax:nuts":
        accept = target.options.get("target_accept_prob", 0.8)
        run = peers.blackjax_nuts(*shape, dense_mass=dense, target_accept_prob=accept)
        plan = f"{job['chains']} chains vmapped on the default device"
    elif sampler in ("blackjax:chees", "blackjax:mams"):
        build = (
            peers.blackjax_chees if sampler == "blackjax:chees" else peers.blackjax_mams
        )
        run = build(*shape)
        plan = f"{job['chains']} chains vmapped on the default device"
    elif sampler in ("nutpie", "nutpie:lowrank"):
        from chainmesh.bench.nutpie_peer import nutpie_sampler

        low_rank = dense or sampler == "nutpie:lowrank"
        run = nutpie_sampler(*shape, cores=job["devices"], low_rank=low_rank)
        plan = f"{job['chains']} chains on {job['devices']} threads"
    else:
        raise ValueError(f"unknown sampler {sampler!r}")

    def call(seed: int, cold: bool = False) -> tuple:
        if cold and sampler.startswith("nutpie"):  # compiles the same, in fewer draws
            out: PeerDraws = run(seed, target.args, draws=COLD_NUTPIE_DRAWS)
        else:
            out = run(seed, target.args)
        return (
            out.samples,
            int(np.sum(out.steps_warmup)),
            int(np.sum(out.steps_sampling)),
            int(np.sum(out.diverging)),
            plan,
        )

    return call


def run_job(job: dict) -> dict:
    """Cold and warm call of ``job["sampler"]`` on ``job["posterior"]``."""
    from chainmesh.bench.targets import load_target

    if len(jax.devices()) != job["devices"]:
        raise RuntimeError(
            f"expected {job['devices']} devices, JAX sees {len(jax.devices())}; the "
            "parent must set XLA_FLAGS before this process starts"
        )
    target = load_target(job["suite"], job["posterior"])
    sampler = job["sampler"]
    if sampler.startswith(CHAINMESH):
        call = _chainmesh(job, target, sampler[len(CHAINMESH) :])
    elif sampler == "numpyro":
        call = _numpyro(job, target)
    else:
        call = _peer(job, target, sampler)
    # NumPyro compiles on every call: a cold call first would only double it.
    cold = None
    if sampler != "numpyro":
        with worker.measure() as cold:
            call(job["seed"], cold=True)
    with worker.measure() as warm:
        samples, grad_warmup, grad_sampling, divergences, plan = call(job["seed"] + 1)
    cold = cold or warm
    return {
        "summary": summary(target, samples),
        "gradients_warmup": grad_warmup,
        "gradients_sampling": grad_sampling,
        "divergences": divergences,
        "wall_s": warm.wall_s - warm.compile_s,
        "wall_note": WALL_NOTES.get(sampler, "warm call"),
        "warm_wall_s": warm.wall_s,
        "warm_compile_s": warm.compile_s,
        "compilations_warm": warm.compilations,
        "cold_wall_s": cold.wall_s,
        "compile_s": cold.compile_s,
        "plan": plan,
        "peak_rss_mb": worker.peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse ``--json-args JOB``, run it, print ``BENCH_RESULT {...}``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--json-args":
        print(
            "usage: python -m chainmesh.bench.suite_worker --json-args JOB",
            file=sys.stderr,
        )
        return 2
    job: dict[str, Any] = json.loads(argv[1])
    jax.monitoring.register_event_duration_secs_listener(worker._on_event)
    try:
        out = {"status": "ok", "metrics": run_job(job)}
    except Exception as err:  # reported to the parent, which keeps going
        out = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
    print(worker.RESULT_PREFIX + json.dumps(worker._finite(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
