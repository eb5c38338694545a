"""Lane-asynchronous NUTS: NumPyro's transitions, lanes, counters, buffers.

The references are chainmesh's NumPyro kernel (``build_nuts(...).step``) run
in lockstep (``vmap``: the same batched arithmetic as the async lanes; on CPU
the two agree to the last bit) and one chain at a time (unbatched). XLA
rounds an unbatched gradient differently in the last bit, and warmup
amplifies that: on this model the unbatched chains differ from NumPyro's own
``vmap`` by 1e-14 after 2 transitions, 1e-8 after 20 and 1e-3 after 40, so
against them only early transitions are compared to 1e-8.
"""

from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import init_to_uniform

from chainmesh.config import SamplerConfig
from chainmesh.counters import LOW_BITS
from chainmesh.examples import eight_schools_data
from chainmesh.kernels.async_nuts import ASYNC_COUNTERS, build_async
from chainmesh.kernels.nuts import build_nuts, extra_fields
from chainmesh.model import inspect_model, prepared

CHAINS = 8
FIELDS = ("potential_energy", "num_steps", "accept_prob", "diverging", "step_size")


class Setup(NamedTuple):
    args: tuple
    step: object  # one chain's NumPyro transition
    chunk: object  # AsyncNUTS.chunk
    state: object  # the block's initial states


def setup(dtype=np.float32, dense: bool = False, num_warmup: int = 50) -> Setup:
    """Eight schools (non-centered), ``CHAINS`` chains initialized uniformly."""
    example = eight_schools_data()
    args = tuple(np.asarray(a, dtype) for a in example.args)
    config = SamplerConfig(num_chains=CHAINS, num_warmup=num_warmup, dense_mass=dense)
    info = inspect_model(example.model, args, {})
    model = prepared(example.model, info)
    kernel = build_nuts(model, config, info)
    keys = jax.random.split(jax.random.PRNGKey(0), CHAINS)
    init = jax.vmap(lambda k: kernel.init(k, init_to_uniform(), args, {}))
    state, valid = jax.jit(init)(keys)
    assert np.all(valid)
    step = partial(kernel.step, args=args, kwargs={})
    return Setup(args, step, build_async(model, config, info).chunk, state)


def run_async(s: Setup, size: int, lanes=None, real=None):
    """The jitted chunk ``(state, n_draws, per_draw, collect) -> out``; the
    draws are unconstrained (``post`` is the identity)."""
    chunk = partial(
        s.chunk, size=size, post=lambda z: z, args=s.args, kwargs={}, lanes=lanes
    )
    real = jnp.ones(CHAINS, bool) if real is None else real
    return jax.jit(lambda st, n, k, c: chunk(st, real, n, k, c))


def lockstep(s: Setup, state, n: int):
    """``n`` vmapped NumPyro transitions: ``(state, z, extra)``, chains first."""

    def one(st, _):
        st = jax.vmap(s.step)(st)
        return st, (st.z, extra_fields(st))

    state, out = jax.lax.scan(one, state, None, length=n)
    return state, *jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)


def one_at_a_time(s: Setup, state, n: int):
    """``n`` NumPyro transitions of each chain, unbatched: ``(z, extra)``."""

    def chain(st):
        def one(st, _):
            st = s.step(st)
            return st, (st.z, extra_fields(st))

        return jax.lax.scan(one, st, None, length=n)[1]

    return jax.lax.map(chain, state)


def totals(words) -> list[int]:
    words = np.asarray(words, np.int64)
    return [int(hi) * (1 << LOW_BITS) + int(lo) for lo, hi in words]


def assert_close(actual, expected, tol: float) -> None:
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=0, atol=tol
        )


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("lanes", [None, 3])
def test_numpyro_transitions_float64(x64, lanes):
    """100 transitions (50 of warmup) in two chunks are NumPyro's, per chain."""
    s = setup(np.float64)
    chunk = run_async(s, 60, lanes)
    state, z1, e1, _ = chunk(s.state, 60, 1, True)
    state, z2, e2, _ = chunk(state, 40, 1, True)
    z = jax.tree.map(lambda a, b: jnp.concatenate([a, b[:, :40]], 1), z1, z2)
    extra = jax.tree.map(lambda a, b: jnp.concatenate([a, b[:, :40]], 1), e1, e2)
    ref_state, ref_z, ref_extra = jax.jit(partial(lockstep, s, n=100))(s.state)
    assert_close(z, ref_z, 1e-10)
    assert_close(
        {k: extra[k] for k in FIELDS}, {k: ref_extra[k] for k in FIELDS}, 1e-10
    )
    assert_close(state, ref_state, 1e-10)
    assert np.asarray(state.i).tolist() == [100] * CHAINS
    # One chain at a time: equal (to rounding) before chaos amplifies it.
    early = 10
    alone_z, alone_extra = jax.jit(partial(one_at_a_time, s, n=early))(s.state)
    assert_close(jax.tree.map(lambda x: x[:, :early], z), alone_z, 1e-8)
    for k in FIELDS:
        assert_close(extra[k][:, :early], alone_extra[k], 1e-8)
    # Every tree has the size NumPyro's has, for all 100 transitions.
    np.testing.assert_array_equal(extra["num_steps"], ref_extra["num_steps"])


@pytest.mark.slow
def test_lanes_fewer_than_chains_same_draws(x64):
    """Chains hand their lanes on; chain i's draws do not depend on lanes."""
    s = setup(np.float64)
    outs = [run_async(s, 30, lanes)(s.state, 30, 1, True) for lanes in (None, 3, 5)]
    for out in outs[1:]:
        assert_close(out[:3], outs[0][:3], 1e-12)


@pytest.mark.slow
def test_dense_mass_float64(x64):
    """Dense mass: warmup through a mass-matrix window (30 of 40 transitions)."""
    s = setup(np.float64, dense=True, num_warmup=30)
    state, z, extra, _ = run_async(s, 40)(s.state, 40, 1, True)
    ref_state, ref_z, ref_extra = jax.jit(partial(lockstep, s, n=40))(s.state)
    inverse_mass = next(iter(state.adapt_state.inverse_mass_matrix.values()))
    assert inverse_mass.shape == (CHAINS, 10, 10)
    assert not np.allclose(inverse_mass, np.eye(10))  # the window adapted it
    assert_close(z, ref_z, 1e-9)
    assert_close({k: extra[k] for k in FIELDS}, {k: ref_extra[k] for k in FIELDS}, 1e-9)
    assert_close(state, ref_state, 1e-9)
    alone_z, alone_extra = jax.jit(partial(one_at_a_time, s, n=5))(s.state)
    assert_close(jax.tree.map(lambda x: x[:, :5], z), alone_z, 1e-8)


def test_numpyro_transitions_float32():
    s = setup()
    state, z, extra, _ = run_async(s, 40)(s.state, 40, 1, True)
    ref_state, ref_z, ref_extra = jax.jit(partial(lockstep, s, n=40))(s.state)
    np.testing.assert_array_equal(extra["num_steps"], ref_extra["num_steps"])
    assert_close(z, ref_z, 1e-4)
    assert_close(state.potential_energy, ref_state.potential_energy, 1e-3)


@cache
def float32_runs() -> tuple:
    """Shared by the counter and buffer tests: one setup, one program each."""
    s = setup()
    padding = jnp.arange(CHAINS) < 5
    return s, padding, run_async(s, 12, real=padding), run_async(s, 12, 3, padding)


@pytest.mark.parametrize("lanes", [None, 3])
def test_counters(lanes):
    """Padding chains run but are not counted; bound and lockstep steps."""
    s, real, full, few = float32_runs()
    *_, extra, counts = (full if lanes is None else few)(s.state, 12, 1, True)
    assert counts.shape == (len(ASYNC_COUNTERS), 2)
    got = dict(zip(ASYNC_COUNTERS, totals(counts), strict=True))
    steps = np.asarray(extra["num_steps"], np.int64)
    assert got["leapfrog_steps"] == steps[np.asarray(real)].sum()
    assert got["divergences"] == np.asarray(extra["diverging"])[np.asarray(real)].sum()
    per_chain = steps.sum(1)
    width = CHAINS if lanes is None else lanes
    lower = max(-(-per_chain.sum() // width), per_chain.max())
    assert got["bound_steps"] == width * lower
    assert got["lockstep_steps"] % width == 0
    assert got["lockstep_steps"] >= got["bound_steps"] >= got["leapfrog_steps"]
    if lanes is None:  # lane i runs chain i: the chunk lasts as its longest
        assert got["lockstep_steps"] == got["bound_steps"]


def test_thinning_and_short_chunks(count_compiles):
    """Every per_draw-th transition is a draw; slots past n_draws stay zero;
    collect=False writes the extra fields only; one program for all."""
    s, _, full, _ = float32_runs()
    _, z, extra, _ = full(s.state, 12, 1, True)
    with count_compiles() as compiles:
        state, z2, extra2, _ = full(s.state, 5, 2, True)
        _, z3, extra3, _ = full(s.state, 3, 1, False)
    assert compiles.count == 0
    assert np.asarray(state.i).tolist() == [10] * CHAINS
    picked = np.arange(1, 10, 2)
    assert_close(
        jax.tree.map(lambda x: x[:, picked], z), jax.tree.map(lambda x: x[:, :5], z2), 0
    )
    for k in FIELDS:
        assert_close(extra[k][:, picked], extra2[k][:, :5], 0)
        assert not np.any(extra2[k][:, 5:])
        assert_close(extra[k][:, :3], extra3[k][:, :3], 0)
    assert not any(np.any(x[:, 5:]) for x in jax.tree.leaves(z2))
    assert not any(np.any(x) for x in jax.tree.leaves(z3))


def test_no_draws_leaves_state():
    s, _, full, _ = float32_runs()
    state, _, extra, counts = full(s.state, 0, 1, True)
    assert_close(state, s.state, 0)
    assert totals(counts) == [0, 0, 0, 0]
    assert not any(np.any(x) for x in jax.tree.leaves(extra))
