"""Benchmark models: their data sets and the raw gradient rate of their potential.

The models are the embedded examples plus ``diamonds``. Data set ``k`` of a
model always has the same shapes as data set 0, so a warm call on data set
``k > 0`` is "new data, same shapes".
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model, potential_energy

from chainmesh.examples import EXAMPLES, Example
from chainmesh.mesh import CHAIN, plan_chains


def diamonds(X, y=None):
    """posteriordb's ``diamonds`` linear regression (brms form, centred X).

    ``b`` gets a wide normal prior where the original has a flat one.
    """
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0, 10)))
    numpyro.sample("y", dist.Normal(intercept + X @ b, sigma), obs=y)


def diamonds_data(seed: int = 0, n: int = 5000, k: int = 24) -> Example:
    """A synthetic stand-in of the diamonds data's shape (N=5000, K=24).

    The real design holds polynomial contrasts of carat, cut, colour and
    clarity, strongly correlated; here columns share three latent factors
    (pairwise correlations around 0.8), which gives the posterior the same
    kind of narrow, correlated ridges. Not the real data.
    """
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 3))
    loadings = rng.normal(size=(3, k))
    X = factors @ loadings + 0.5 * rng.normal(size=(n, k))
    X = (X - X.mean(0)) / X.std(0)
    b = rng.normal(0.0, 0.5, size=k)
    y = 7.8 + X @ b + 0.3 * rng.normal(size=n)
    return Example(
        diamonds,
        (X.astype(np.float32), y.astype(np.float32)),
        {"b": b.astype(np.float32)},
    )


def funnel(scale):
    """Neal's funnel in ``1 + len(scale)`` dimensions: ``v ~ N(0, 3)``,
    ``x_i ~ N(0, scale_i * exp(v / 2))``. Step sizes that suit the neck are
    far too small for the mouth: NUTS's trees vary most from chain to chain
    (where vectorized NUTS wastes most), and one global trajectory length
    fits neither end."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(0.0, scale * jnp.exp(v / 2)).to_event(1))


def funnel_data(seed: int = 0, d: int = 10) -> Example:
    """The 10-D funnel (``v`` and 9 ``x``); data set ``k`` scales ``x`` by
    ``1 + k / 100`` (same shapes, a new program argument)."""
    scale = np.full(d - 1, 1.0 + seed / 100, np.float32)
    return Example(funnel, (scale,), {"v": np.zeros((), np.float32)})


BENCH_MODELS = {**EXAMPLES, "diamonds": diamonds_data, "funnel10": funnel_data}
"""Model name -> data factory ``(seed) -> Example``."""

_FIXED_DATA = ("eight_schools", "gaussian100")
"""Examples whose factory ignores the seed: new data sets are jittered copies."""


def bench_data(name: str, index: int) -> Example:
    """Data set ``index`` of model ``name`` (same shapes for every index).

    Args:
        name: A key of ``BENCH_MODELS``.
        index: 0 for the cold call, 1, 2, ... for the warm calls.
    """
    example = BENCH_MODELS[name](seed=index)
    if name not in _FIXED_DATA or index == 0:
        return example
    rng = np.random.default_rng(index)
    # Multiplicative jitter keeps the sign, so scales stay positive.
    args = tuple(
        (a * (1 + 0.05 * rng.normal(size=a.shape))).astype(a.dtype)
        for a in example.args
    )
    return example._replace(args=args)


def _gradient_program(model, mesh: Mesh):
    """``(z, n, args) -> z``: ``n`` batched potential gradients per device."""

    def per_device(z, n, args):
        energy_grad = jax.vmap(
            jax.value_and_grad(lambda q: potential_energy(model, args, {}, q))
        )

        def body(_, carry):
            # Each step feeds the next: nothing can be hoisted out of the loop.
            z, total = carry
            energy, grad = energy_grad(z)
            return jax.tree.map(lambda a, g: a - 1e-6 * g, z, grad), total + energy

        local = jax.tree.leaves(z)[0].shape[0]
        return jax.lax.fori_loop(0, n, body, (z, jnp.zeros(local)))

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(CHAIN), P(), P()),
            out_specs=P(CHAIN),
            check_vma=False,
        )
    )


def raw_gradient_rate(
    name: str, chains: int, devices: Sequence[jax.Device], window_s: float = 0.5
) -> dict:
    """Batched gradient evaluations per second, chains placed like chainmesh's.

    A ``fori_loop`` of ``vmap(value_and_grad(potential))`` runs on each
    device's block of chains under ``shard_map``: the rate no sampler of these
    chains on these devices can beat. The best of five timed windows is kept,
    so a burst of other work on the machine lowers it less.

    Args:
        name: A key of ``BENCH_MODELS``.
        chains: Chains (gradients per iteration, padding chains not counted).
        devices: The devices to spread the chains over.
        window_s: Minimum length of each timed window.
    """
    example = bench_data(name, 0)
    plan = plan_chains(chains, list(devices))
    mesh = Mesh(np.asarray(plan.devices, dtype=object), (CHAIN,))
    z0 = initialize_model(
        jax.random.PRNGKey(0),
        example.model,
        model_args=example.args,
        init_strategy=init_to_median,
    ).param_info.z
    z = {k: np.repeat(np.asarray(v)[None], plan.total_chains, 0) for k, v in z0.items()}
    z = jax.device_put(z, NamedSharding(mesh, P(CHAIN)))
    data = jax.device_put(example.args, NamedSharding(mesh, P()))
    program = _gradient_program(example.model, mesh)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(program(z, np.int32(n), data))
        return time.perf_counter() - t0

    timed(1)  # compile
    n, seconds = 16, timed(16)
    while seconds < window_s and n < 1 << 24:
        n *= 2 if seconds > window_s / 8 else 8
        seconds = timed(n)
    best = min([seconds, *(timed(n) for _ in range(4))])
    return {
        "raw_gradients_per_s": chains * n / best,
        "iterations": n,
        "seconds": best,
        "plan": str(plan),
    }
