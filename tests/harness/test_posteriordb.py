"""Statistical correctness of every sampler config against posteriordb references.

Each posterior is sampled with fixed seeds, and every reference parameter must
match: the mean within four Monte-Carlo standard errors (bulk ESS of our draws)
plus a small floor for the reference's own error, and the sd within 15%.
Posteriors flagged ``x64`` sample in float64 (see ``models.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
import pytest

import chainmesh as cm

from .configs import CONFIGS, devices, options
from .models import POSTERIORS, Posterior

NUM_CHAINS = 4
NUM_WARMUP = 500
NUM_SAMPLES = 1000
SEED = 0
MEAN_Z = 4.0
MEAN_FLOOR = 0.02
SD_RTOL = 0.15


@contextlib.contextmanager
def precision(x64: bool) -> Iterator[None]:
    """Sets ``jax_enable_x64`` inside the block and restores it after."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", x64)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _mismatches(posterior: Posterior, samples: dict[str, np.ndarray]) -> list[str]:
    """Describes every reference parameter whose draws miss the tolerances."""
    draws = posterior.stan_draws(samples)
    bad = []
    for name, (ref_mean, ref_sd) in posterior.reference.items():
        x = draws[name]
        ess = cm.diagnostics.ess_bulk(x)
        mean_tol = MEAN_Z * ref_sd / np.sqrt(ess) + MEAN_FLOOR * ref_sd
        mean_err = abs(float(x.mean()) - ref_mean)
        sd_err = abs(float(x.std()) - ref_sd)
        if not (mean_err <= mean_tol and sd_err <= SD_RTOL * ref_sd):
            bad.append(
                f"{name}: mean {x.mean():.6g} vs {ref_mean:.6g} "
                f"(|err| {mean_err:.3g} > tol {mean_tol:.3g}?), "
                f"sd {x.std():.6g} vs {ref_sd:.6g}, ess {ess:.0f}"
            )
    return bad


def test_precision_builds_float64_data_and_restores_flag() -> None:
    """Inside ``precision(True)`` data are float64; the flag is restored after."""
    posterior = POSTERIORS["kidiq-kidscore_momiq"]
    before = bool(jax.config.jax_enable_x64)
    with precision(True):
        args = posterior.args(posterior.data())
    assert [a.dtype for a in args] == [np.float64] * len(args)
    assert bool(jax.config.jax_enable_x64) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(POSTERIORS))
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config: str, name: str) -> None:
    """Means and sds of every reference parameter match posteriordb."""
    posterior = POSTERIORS[name]
    with precision(posterior.x64):
        sampler = cm.Sampler(
            posterior.model,
            num_chains=NUM_CHAINS,
            num_warmup=NUM_WARMUP,
            num_samples=NUM_SAMPLES,
            devices=devices(config, NUM_CHAINS),
            progress_bar=False,
            **options(config, posterior.sampler_kwargs),
        )
        result = sampler.run(SEED, *posterior.args(posterior.data()))

    draws = posterior.stan_draws(result.samples)
    assert set(posterior.reference) <= set(draws)
    for x in draws.values():
        assert x.shape == (NUM_CHAINS, NUM_SAMPLES)
        assert x.dtype == (np.float64 if posterior.x64 else np.float32)
    bad = _mismatches(posterior, result.samples)
    assert not bad, "\n".join(bad)
