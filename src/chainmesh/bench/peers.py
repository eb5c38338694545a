"""Peer samplers outside NumPyro, measured like the others (``bench`` extra).

``blackjax_chees``: ``blackjax.chees_adaptation`` (ChEES with Adam, identity
metric, Halton jitter) followed by ``blackjax.dynamic_hmc`` with the adapted
step size and trajectory length, written as a careful user would: the model's
unconstrained potential from NumPyro, data as ``jit`` arguments (a warm call
on new data does not recompile), chains vectorized on the default device,
NumPyro's ``init_to_median`` per chain, warmup and sampling as two programs so
the sampling phase is timed alone.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chainmesh.bench.models import bench_data

INITIAL_STEP_SIZE = 0.1
LEARNING_RATE = 0.1
"""Adam's learning rate on the log trajectory length.

BlackJAX 1.2.5 starts the trajectory length at the initial step size (one
leapfrog step) and leaves divergent chains out of the harmonic mean
acceptance (1.7.1 floors the length and no longer gets stuck). Tried
on eight schools (16 chains, 500 warmup) with initial step sizes 0.1, 0.5 and
1.0 and rates 0.025, 0.05 and 0.1, only 0.1 / 0.1 grew the length past one
step (5 steps per transition; step size 0.40); the others ended at 1 step,
with step sizes up to 10.9 once every chain diverged. On the logistic
regression no setting tried (step sizes 0.003 to 1.0, rates 0.025 to 0.1)
left one step per transition. These two constants are the best of that grid.
"""


def run_blackjax_chees(job: dict, worker: Any) -> dict:
    """Cold and warm calls of BlackJAX ChEES, with the chainmesh metrics.

    Args:
        job: The benchmark job (model, chains, warmup, samples, seed).
        worker: The running ``chainmesh.bench.worker`` module (its meters).
    """
    import blackjax
    import optax
    from numpyro.infer import init_to_median
    from numpyro.infer.util import (
        find_valid_initial_params,
        initialize_model,
        potential_energy,
    )

    from chainmesh.model import postprocess_fn

    model = bench_data(job["model"], 0).model
    chains, warmup, samples = job["chains"], job["warmup"], job["samples"]
    bits = int(np.ceil(np.log2(warmup + samples)))

    def logdensity(args: tuple, z: dict) -> jax.Array:
        return -potential_energy(model, args, {}, z)

    prototype = initialize_model(
        jax.random.key(0), model, model_args=bench_data(job["model"], 0).args
    ).param_info.z

    @jax.jit
    def init(key: jax.Array, args: tuple) -> dict:
        def one(k: jax.Array) -> dict:
            (z, _, _), _ = find_valid_initial_params(
                k,
                model,
                init_strategy=init_to_median(),
                model_args=args,
                prototype_params=prototype,
            )
            return z

        return jax.vmap(one)(jax.random.split(key, chains))

    @jax.jit
    def warm(key: jax.Array, positions: dict, args: tuple) -> tuple:
        adaptation = blackjax.chees_adaptation(partial(logdensity, args), chains)
        (states, params), _ = adaptation.run(
            key,
            positions,
            step_size=INITIAL_STEP_SIZE,
            optim=optax.adam(LEARNING_RATE),
            num_steps=warmup,
            max_sampling_steps=samples,
        )
        # The adapted length in steps, per jitter index: BlackJAX 1.2 closes
        # it over integration_steps_fn, 1.7 passes integration_steps_params.
        steps_fn = params["integration_steps_fn"]
        extra = params.get("integration_steps_params", ())
        adjusted = jax.vmap(lambda i: steps_fn(i, *extra))(jnp.arange(2**bits))
        inverse_mass = jnp.broadcast_to(
            jnp.asarray(params["inverse_mass_matrix"]), (_size(positions),)
        )
        return states, params["step_size"], adjusted, inverse_mass

    @jax.jit
    def sample(key, states, step_size, steps, inverse_mass, args: tuple):
        kernel = blackjax.dynamic_hmc(
            partial(logdensity, args),
            step_size=step_size,
            inverse_mass_matrix=inverse_mass,
            next_random_arg_fn=lambda i: i + 1,
            integration_steps_fn=lambda i: steps[i],
        )
        post = postprocess_fn(model, args, {})

        def one(states, k):
            keys = jax.random.split(k, chains)
            states, info = jax.vmap(kernel.step)(keys, states)
            return states, (jax.vmap(post)(states.position), info)

        _, (draws, info) = jax.lax.scan(one, states, jax.random.split(key, samples))
        swap = partial(jnp.swapaxes, axis1=0, axis2=1)
        return (
            jax.tree.map(swap, draws),
            swap(info.num_integration_steps),
            swap(info.is_divergent),
        )

    def call(seed: int, args: tuple) -> tuple:
        key = jax.random.key(seed)
        k_init, k_warm, k_sample = jax.random.split(key, 3)
        states, eps, steps, inverse_mass = warm(k_warm, init(k_init, args), args)
        jax.block_until_ready(states)
        t0 = time.perf_counter()
        out = jax.device_get(sample(k_sample, states, eps, steps, inverse_mass, args))
        return out, time.perf_counter() - t0

    with worker.measure() as cold:
        call(job["seed"], bench_data(job["model"], 0).args)
    args = bench_data(job["model"], 1).args
    with worker.measure() as warm_call:
        (draws, num_steps, diverging), sampling_s = call(job["seed"] + 1, args)
    metrics = worker.draw_metrics(draws, num_steps, diverging)
    return worker._rates(
        {
            "cold_wall_s": cold.wall_s,
            "compile_s": cold.compile_s,
            "compilations_cold": cold.compilations,
            "plan": f"{chains} chains vmapped on the default device",
            "sampling_source": "BlackJAX sampling program of a warm call",
            **worker._call_metrics(warm_call, metrics),
            "leapfrog_executed": metrics["leapfrog_useful"],
            "sampling_s": sampling_s,
            "sampling_useful": int(np.sum(num_steps)),
        }
    )


def _size(tree: Any) -> int:
    """Coordinates of one chain's position (leaves carry the chain axis)."""
    return sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(tree))
