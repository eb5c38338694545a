"""BlackJAX peer samplers, measured like the others (``bench`` extra).

Both are written as a careful user would: the model's unconstrained potential
from NumPyro, data as ``jit`` arguments (a warm call on new data does not
recompile), chains vectorized on the default device, NumPyro's
``init_to_median`` per chain, warmup and sampling as two programs so the
sampling phase is timed alone.

``blackjax_chees``: ``blackjax.chees_adaptation`` (ChEES with Adam, identity
metric, Halton jitter) followed by ``blackjax.dynamic_hmc`` with the adapted
step size and trajectory length. ``blackjax_nuts``: ``blackjax.window_adaptation``
(Stan's windows) per chain, then ``blackjax.nuts`` with each chain's step size
and metric. ``blackjax_mams``: BlackJAX's MAMS tuner
(``adjusted_mclmc_find_L_and_step_size``, its defaults: acceptance 0.9,
diagonal preconditioning, two integrator steps per trajectory on average)
per chain, then ``adjusted_mclmc_dynamic`` (minimal-norm integrator, a
uniformly jittered number of steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

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


class PeerDraws(NamedTuple):
    """What one call of a peer sampler returns.

    Attributes:
        samples: Site -> ``(chains, draws, ...)`` constrained draws.
        steps_warmup: ``(chains, warmup)`` leapfrog steps (gradients).
        steps_sampling: ``(chains, draws)`` leapfrog steps.
        diverging: ``(chains, draws)`` divergent transitions.
        sampling_s: Seconds of the sampling program alone.
    """

    samples: dict
    steps_warmup: np.ndarray
    steps_sampling: np.ndarray
    diverging: np.ndarray
    sampling_s: float


class Potential(NamedTuple):
    """A NumPyro model's unconstrained log density, inits and constraints."""

    logdensity: Callable[[tuple, dict], jax.Array]
    init: Callable[[jax.Array, tuple], dict]
    postprocess: Callable[[tuple], Callable[[dict], dict]]


def numpyro_potential(model: Callable, args: tuple, chains: int) -> Potential:
    """The potential every peer samples: data as arguments, NumPyro's
    ``init_to_median`` per chain, constrained values plus deterministics."""
    from numpyro.infer import init_to_median
    from numpyro.infer.util import (
        find_valid_initial_params,
        initialize_model,
        potential_energy,
    )

    from chainmesh.model import postprocess_fn

    def logdensity(args: tuple, z: dict) -> jax.Array:
        return -potential_energy(model, args, {}, z)

    prototype = initialize_model(jax.random.key(0), model, model_args=args).param_info.z

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

    return Potential(logdensity, init, lambda args: postprocess_fn(model, args, {}))


def _sampling_program(
    potential: Potential, samples: int, chains: int, step: Callable
) -> Callable:
    """``(key, carry, args) -> (draws, steps, divergent)``: ``samples`` draws of
    ``step(key, carry, logdensity) -> (carry, info)`` vmapped over chains,
    where ``carry`` is a chain's ``(state, kernel parameters)``."""

    def run(key, carry, args):
        logdensity = partial(potential.logdensity, args)
        post = potential.postprocess(args)

        def one(carry, k):
            carry, info = jax.vmap(step, in_axes=(0, 0, None))(
                jax.random.split(k, chains), carry, logdensity
            )
            return carry, (jax.vmap(post)(carry[0].position), info)

        _, (draws, info) = jax.lax.scan(one, carry, jax.random.split(key, samples))
        swap = partial(jnp.swapaxes, axis1=0, axis2=1)
        return (
            jax.tree.map(swap, draws),
            swap(info.num_integration_steps),
            swap(info.is_divergent),
        )

    return run


def _timed_call(
    warm: Callable, sample: Callable, potential: Potential, seed: int, args: tuple
) -> PeerDraws:
    """Warmup, then the sampling program timed alone."""
    k_init, k_warm, k_sample = jax.random.split(jax.random.key(seed), 3)
    carry, steps_warmup = warm(k_warm, potential.init(k_init, args), args)
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
    draws, steps, divergent = jax.device_get(sample(k_sample, carry, args))
    seconds = time.perf_counter() - t0
    steps_warmup = np.asarray(jax.device_get(steps_warmup)).T  # (chains, warmup)
    return PeerDraws(draws, steps_warmup, steps, divergent, seconds)


def blackjax_chees(
    model: Callable, args: tuple, chains: int, warmup: int, samples: int
) -> Callable[[int, tuple], PeerDraws]:
    """BlackJAX ChEES: ``call(seed, args) -> PeerDraws`` (data as arguments)."""
    import blackjax
    import optax

    potential = numpyro_potential(model, args, chains)
    bits = int(np.ceil(np.log2(warmup + samples)))

    @jax.jit
    def warm(key: jax.Array, positions: dict, args: tuple) -> tuple:
        adaptation = blackjax.chees_adaptation(
            partial(potential.logdensity, args), chains
        )
        (states, params), info = adaptation.run(
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
        kernel = (params["step_size"], adjusted, inverse_mass)
        kernels = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (chains, *x.shape)), kernel
        )
        return (states, kernels), info.info.num_integration_steps

    def step(k, carry, logdensity):
        state, (step_size, steps, inverse_mass) = carry
        hmc = blackjax.dynamic_hmc.build_kernel(
            next_random_arg_fn=lambda i: i + 1,
            integration_steps_fn=lambda i: steps[i],
        )
        state, info = hmc(k, state, logdensity, step_size, inverse_mass)
        return (state, carry[1]), info

    sample = jax.jit(_sampling_program(potential, samples, chains, step))
    return partial(_timed_call, warm, sample, potential)


def blackjax_nuts(
    model: Callable,
    args: tuple,
    chains: int,
    warmup: int,
    samples: int,
    dense_mass: bool = False,
    target_accept_prob: float = 0.8,
) -> Callable[[int, tuple], PeerDraws]:
    """BlackJAX NUTS after ``window_adaptation``, each chain adapting its own
    step size and metric (as NumPyro and Stan do): ``call(seed, args)``."""
    import blackjax

    potential = numpyro_potential(model, args, chains)

    @jax.jit
    def warm(key: jax.Array, positions: dict, args: tuple) -> tuple:
        def one(k, position):
            adaptation = blackjax.window_adaptation(
                blackjax.nuts,
                partial(potential.logdensity, args),
                is_mass_matrix_diagonal=not dense_mass,
                target_acceptance_rate=target_accept_prob,
            )
            (state, params), info = adaptation.run(k, position, num_steps=warmup)
            kernel = (params["step_size"], params["inverse_mass_matrix"])
            return state, kernel, info.info.num_integration_steps

        keys = jax.random.split(key, chains)
        states, kernels, steps = jax.vmap(one)(keys, positions)
        return (states, kernels), steps.T  # (warmup, chains), as ChEES's

    nuts = blackjax.nuts.build_kernel()

    def step(k, carry, logdensity):
        state, (step_size, inverse_mass) = carry
        state, info = nuts(k, state, logdensity, step_size, inverse_mass)
        return (state, carry[1]), info

    sample = jax.jit(_sampling_program(potential, samples, chains, step))
    return partial(_timed_call, warm, sample, potential)


TUNING_FRACTION = 0.3
"""Transitions BlackJAX's MAMS tuner runs, per transition it is told will
follow (``frac_tune1`` and ``frac_tune2`` of 0.1, the first twice)."""


def blackjax_mams(
    model: Callable, args: tuple, chains: int, warmup: int, samples: int
) -> Callable[[int, tuple], PeerDraws]:
    """BlackJAX MAMS, each chain tuned by BlackJAX's own MAMS tuner over
    ``warmup`` transitions: ``call(seed, args)``. Steps count gradients (two
    per minimal-norm step)."""
    import blackjax
    from blackjax.adaptation.adjusted_mclmc_adaptation import (
        adjusted_mclmc_find_L_and_step_size,
    )
    from blackjax.mcmc.adjusted_mclmc import rescale

    potential = numpyro_potential(model, args, chains)
    mams = blackjax.adjusted_mclmc_dynamic.build_kernel(
        integration_steps_fn=lambda k, avg: jnp.ceil(
            jax.random.uniform(k) * rescale(avg)
        ),
    )

    def kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix,
               integration_steps_params):  # fmt: skip
        return mams(
            rng_key, state, logdensity_fn, step_size,
            inverse_mass_matrix=inverse_mass_matrix,
            integration_steps_params=integration_steps_params,
        )  # fmt: skip

    @jax.jit
    def warm(key: jax.Array, positions: dict, args: tuple) -> tuple:
        logdensity = partial(potential.logdensity, args)

        def one(k, position):
            k_init, k_tune = jax.random.split(k)
            state = blackjax.adjusted_mclmc_dynamic.init(position, logdensity, k_init)
            state, params, steps = adjusted_mclmc_find_L_and_step_size(
                mclmc_kernel=kernel, logdensity_fn=logdensity,
                num_steps=int(round(warmup / TUNING_FRACTION)), state=state,
                rng_key=k_tune, target=0.9,
            )  # fmt: skip
            average = params.L / params.step_size
            return (
                state,
                (params.step_size, params.inverse_mass_matrix, average),
                2 * steps,
            )

        states, kernels, steps = jax.vmap(one)(jax.random.split(key, chains), positions)
        return (states, kernels), steps[None, :]  # (1, chains): all of warmup

    def step(k, carry, logdensity):
        state, (step_size, inverse_mass, average) = carry
        state, info = kernel(k, state, logdensity, step_size, inverse_mass, (average,))
        return (state, carry[1]), info._replace(
            num_integration_steps=2 * info.num_integration_steps
        )

    sample = jax.jit(_sampling_program(potential, samples, chains, step))
    return partial(_timed_call, warm, sample, potential)


def run_blackjax_chees(job: dict, worker: Any) -> dict:
    """Cold and warm calls of BlackJAX ChEES, with the chainmesh metrics.

    Args:
        job: The benchmark job (model, chains, warmup, samples, seed).
        worker: The running ``chainmesh.bench.worker`` module (its meters).
    """
    chains, samples = job["chains"], job["samples"]
    cold_data = bench_data(job["model"], 0)
    call = blackjax_chees(
        cold_data.model, cold_data.args, chains, job["warmup"], samples
    )
    with worker.measure() as cold:
        call(job["seed"], cold_data.args)
    args = bench_data(job["model"], 1).args
    with worker.measure() as warm_call:
        out = call(job["seed"] + 1, args)
    metrics = worker.draw_metrics(out.samples, out.steps_sampling, out.diverging)
    return worker._rates(
        {
            "cold_wall_s": cold.wall_s,
            "compile_s": cold.compile_s,
            "compilations_cold": cold.compilations,
            "plan": f"{chains} chains vmapped on the default device",
            "sampling_source": "BlackJAX sampling program of a warm call",
            **worker._call_metrics(warm_call, metrics),
            "leapfrog_executed": metrics["leapfrog_useful"],
            "sampling_s": out.sampling_s,
            "sampling_useful": int(np.sum(out.steps_sampling)),
        }
    )


def _size(tree: Any) -> int:
    """Coordinates of one chain's position (leaves carry the chain axis)."""
    return sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(tree))


def _per_chain(chains: int, x: jax.Array) -> jax.Array:
    """``x`` repeated along a new leading chain axis."""
    return jnp.broadcast_to(x, (chains, *jnp.shape(x)))
