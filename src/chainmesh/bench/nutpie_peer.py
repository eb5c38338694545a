"""nutpie on a NumPyro potential, a peer of ``chainmesh bench --suite``.

``nutpie.compiled_pyfunc.from_pyfunc`` takes a Python function returning the
log density and its gradient at a flat float64 vector. Here that function is
``jax.jit(value_and_grad)`` of the same NumPyro potential every other peer
samples, flattened with ``ravel_pytree``; nutpie's Rust sampler runs its own
warmup (step size and a diagonal, or with ``low_rank``, a low-rank modified
metric from gradients and draws) and its own NUTS, and calls back into Python
for every gradient. Its ESS per gradient is nutpie's; its wall time is that
of a Python-callback gradient (the host round trip per leapfrog step), not of
nutpie with a compiled (Stan, PyTensor/Numba) model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from chainmesh.bench.peers import PeerDraws, numpyro_potential


def nutpie_sampler(
    model: Callable,
    args: tuple,
    chains: int,
    warmup: int,
    samples: int,
    cores: int,
    low_rank: bool = False,
) -> Callable[[int, tuple], PeerDraws]:
    """nutpie's NUTS on the model's potential: ``call(seed, args)``.

    Args:
        model: NumPyro model.
        args: Its data (the compiled functions take any data of these shapes).
        chains: Chains; nutpie runs them on ``cores`` threads.
        warmup: nutpie's ``tune`` draws per chain.
        samples: Draws per chain.
        cores: Threads nutpie samples on.
        low_rank: nutpie's ``low_rank_modified_mass_matrix`` (for targets that
            ask for a dense metric).
    """
    import nutpie
    from nutpie.compiled_pyfunc import from_pyfunc

    potential = numpyro_potential(model, args, chains)
    first = jax.tree.map(lambda x: x[0], potential.init(jax.random.key(0), args))
    flat, unravel = ravel_pytree(first)

    @jax.jit
    def logp(x: jax.Array, args: tuple) -> tuple[jax.Array, jax.Array]:
        def density(x: jax.Array) -> jax.Array:
            return potential.logdensity(args, unravel(x.astype(flat.dtype)))

        return jax.value_and_grad(density)(x)

    @jax.jit
    def expand(x: jax.Array, args: tuple) -> dict:
        return potential.postprocess(args)(unravel(x.astype(flat.dtype)))

    shapes = jax.eval_shape(expand, flat, args)
    names = sorted(shapes)

    @jax.jit
    def initial(key: jax.Array, args: tuple) -> jax.Array:
        z = jax.tree.map(lambda x: x[0], potential.init(key, args))
        return ravel_pytree(z)[0]

    def call(seed: int, args: tuple, draws: int | None = None) -> PeerDraws:
        """Sample; ``draws`` (if given) replaces both warmup and samples."""

        def make_logp() -> Callable:
            def fn(x: np.ndarray) -> tuple[float, np.ndarray]:
                value, grad = logp(x, args)
                return float(value), np.asarray(grad, dtype=np.float64)

            return fn

        def make_expand(seed1: int, seed2: int, chain: int) -> Callable:
            def fn(x: np.ndarray) -> dict[str, np.ndarray]:
                values = expand(x, args)
                return {k: np.asarray(values[k], dtype=np.float64) for k in names}

            return fn

        def make_initial(seed: int) -> np.ndarray:
            key = jax.random.key(int(seed) % (1 << 31))
            return np.asarray(initial(key, args), dtype=np.float64)

        compiled = from_pyfunc(
            flat.size,
            make_logp,
            make_expand,
            [np.dtype(np.float64)] * len(names),
            [shapes[k].shape for k in names],
            names,
            make_initial_point_fn=make_initial,
        )
        t0 = time.perf_counter()
        trace = nutpie.sample(
            compiled,
            draws=draws or samples,
            tune=draws or warmup,
            chains=chains,
            cores=cores,
            seed=seed,
            save_warmup=True,
            progress_bar=False,
            low_rank_modified_mass_matrix=low_rank,
        )
        seconds = time.perf_counter() - t0
        values = {
            k: np.asarray(trace.posterior[k].values, dtype=shapes[k].dtype)
            for k in names
        }
        return PeerDraws(
            values,
            np.asarray(trace.warmup_sample_stats["n_steps"].values),
            np.asarray(trace.sample_stats["n_steps"].values),
            np.asarray(trace.sample_stats["diverging"].values),
            seconds,
        )

    return call
