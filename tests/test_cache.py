"""The program cache from several threads: tracing serialized, running not."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpyro
import numpyro.distributions as dist

import chainmesh as cm

Y = np.random.default_rng(2).normal(1.0, 1.0, size=20).astype(np.float32)
CONFIG = {
    "num_chains": 2,
    "devices": 2,
    "num_warmup": 50,
    "num_samples": 50,
    "progress_bar": False,
}
THREADS = 6


def thread_model(y):
    """A model of this file only, so its programs start cold here."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _run(seed: int) -> np.ndarray:
    return cm.Sampler(thread_model, **CONFIG).run(seed, Y).samples["mu"]


def test_cold_and_warm_calls_from_threads(count_compiles):
    sequential = [_run(seed) for seed in range(THREADS)]  # JAX's small ops warm
    cm.clear_cache()  # chainmesh's programs cold again
    with count_compiles() as cold, ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(_run, range(THREADS)))
    assert cold.count == 2  # one init and one chunk program, compiled once
    with count_compiles() as warm, ThreadPoolExecutor(THREADS) as pool:
        again = list(pool.map(_run, range(THREADS)))
    assert warm.count == 0
    for seed in range(THREADS):
        np.testing.assert_array_equal(threaded[seed], sequential[seed])
        np.testing.assert_array_equal(again[seed], sequential[seed])
    assert not np.array_equal(threaded[0], threaded[1])


def test_a_warm_call_does_not_wait_for_another_threads_compile():
    """Another thread's cold call holds the compile lock; a warm call runs."""
    tracing, release = threading.Event(), threading.Event()

    def blocking_model(y):  # blocks its first trace, under the compile lock
        tracing.set()
        release.wait(timeout=300)
        thread_model(y)

    warm_sampler = cm.Sampler(thread_model, **CONFIG)
    first = warm_sampler.run(0, Y).samples["mu"]
    cold = threading.Thread(
        target=cm.Sampler(blocking_model, **CONFIG).run, args=(0, Y), daemon=True
    )
    draws = []
    warm = threading.Thread(
        target=lambda: draws.append(warm_sampler.run(0, Y).samples["mu"]),
        daemon=True,
    )
    try:
        cold.start()
        assert tracing.wait(timeout=300), "the cold call never started tracing"
        warm.start()
        warm.join(timeout=120)  # a regression waits here, then fails
        finished_while_compiling = not warm.is_alive() and not release.is_set()
    finally:
        release.set()
        cold.join(timeout=300)
        warm.join(timeout=300)
    assert finished_while_compiling
    assert not cold.is_alive()
    np.testing.assert_array_equal(draws[0], first)
