"""``inner="async"`` through the Sampler: the same chains as ``map``, with
padding, thinning, lanes, resume, data sets and the schedule's counters.

The kernel itself (the per-lane tree machine) is tested against NumPyro's
transition in ``test_async_nuts.py``; here the Sampler's plumbing is: keys,
inits, chunks, padding lanes, thinning and checkpoints.
"""

import numpy as np
import pytest
from harness.test_posteriordb import precision
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import correlated, linreg, linreg_data, normal_mean

import chainmesh as cm
from chainmesh.counters import LOW_BITS, slowest_times
from chainmesh.examples import eight_schools_data

FAST = {"num_warmup": 60, "num_samples": 40, "progress_bar": False}
X, Y = linreg_data()
NORMAL_Y = np.random.default_rng(0).normal(1.0, 1.0, size=20).astype(np.float32)


EXACT = {"num_warmup": 20, "num_samples": 30, "progress_bar": False}
"""Short enough for float64 rounding to stay below 1e-8: the adaptation is a
feedback loop, and after 60 warmup transitions even map and vmap (NumPyro's
transition, vmapped or not) differ by 1e-5 on eight schools."""


@pytest.mark.slow
def test_async_draws_equal_map_in_float64():
    """Eight schools in float64: every chain's draws and fields under async
    (one lane per chain, and 3 lanes for 4 chains per device) equal map's."""
    example = eight_schools_data()
    with precision(True):
        args = tuple(np.asarray(a, np.float64) for a in example.args)
        runs = {
            name: cm.Sampler(
                example.model, num_chains=8, devices=2, **options, **EXACT
            ).run(0, *args)
            for name, options in {
                "map": {"inner": "map"},
                "async": {"inner": "async"},
                "async3": {"inner": "async", "lanes": 3},
            }.items()
        }
    ref = runs["map"]
    assert ref.samples["mu"].dtype == np.float64
    for name in ("async", "async3"):
        for group in ("samples", "extra"):
            for k, x in getattr(ref, group).items():
                np.testing.assert_allclose(
                    getattr(runs[name], group)[k], x, rtol=1e-8, atol=1e-10,
                    err_msg=f"{name} {group}.{k}",
                )  # fmt: skip
    assert_same_draws(runs["async"], runs["async3"])  # warmup in one chunk
    assert runs["async"].stats["leapfrog_steps"] == ref.stats["leapfrog_steps"]


def test_padding_lanes_stay_out_of_the_stats():
    """10 chains on 4 devices (2 padding) draw what chains 0-9 of 12 draw."""
    kw = {"devices": 4, "inner": "async", **FAST}
    ten = cm.Sampler(normal_mean, num_chains=10, **kw).run(0, NORMAL_Y)
    twelve = cm.Sampler(normal_mean, num_chains=12, **kw).run(0, NORMAL_Y)
    np.testing.assert_array_equal(ten.samples["mu"], twelve.samples["mu"][:10])
    steps = twelve.extra["num_steps"].astype(np.int64)
    assert ten.stats["leapfrog_steps"] == steps[:10].sum()
    assert ten.stats["divergences"] == twelve.extra["diverging"][:10].sum()
    # Every lane slot of every iteration is paid for, padding lanes included.
    assert ten.stats["lockstep_steps"] == twelve.stats["lockstep_steps"]
    assert ten.stats["lockstep_steps"] >= steps.sum()
    assert 0 < ten.stats["lockstep_efficiency"] <= ten.stats["lockstep_bound"] <= 1


def test_thinning_keeps_every_kth_transition():
    kw = {"num_chains": 4, "devices": 2, "inner": "async", "num_warmup": 60}
    full = cm.Sampler(linreg, num_samples=30, progress_bar=False, **kw).run(0, X, Y)
    thinned = cm.Sampler(
        linreg, num_samples=30, thinning=3, progress_bar=False, **kw
    ).run(0, X, Y)
    np.testing.assert_array_equal(
        thinned.samples["beta"], full.samples["beta"][:, 2::3]
    )
    assert thinned.stats["leapfrog_steps"] == full.stats["leapfrog_steps"]


@pytest.mark.parametrize("lanes", [None, 2])
def test_resume_is_bitwise(lanes, tmp_path, monkeypatch):
    options = {
        "num_chains": 8, "devices": 2, "inner": "async", "lanes": lanes,
        "chunk_size": 20, "checkpoint_every": 1, **FAST,
    }  # fmt: skip
    with monkeypatch.context() as m:
        interrupt_after(m, 4)  # mid-sampling: 3 of 5 chunks of 20
        with pytest.raises(Interrupted):
            cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **options).run(0, X, Y)
    resumed = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **options)
    assert_same_draws(
        cm.Sampler(linreg, **options).run(0, X, Y), resumed.run(0, X, Y, resume=True)
    )


def test_data_sets_run_async_like_map():
    """BatchSampler: each data set's chains run their own asynchronous loop;
    in float64 the draws equal map's."""
    ys = np.stack([Y, 2.0 * Y, Y[::-1]])
    xs = np.stack([X, X, X])
    with precision(True):
        xs, ys = xs.astype(np.float64), ys.astype(np.float64)
        runs = [
            cm.BatchSampler(
                linreg, num_datasets=3, num_chains=4, devices=4, inner=inner, **EXACT
            ).run(0, xs, ys)
            for inner in ("map", "async")
        ]
    np.testing.assert_allclose(
        runs[1].samples["beta"], runs[0].samples["beta"], rtol=1e-8, atol=1e-10
    )
    assert runs[1].stats["leapfrog_steps"] == runs[0].stats["leapfrog_steps"]


def test_data_sets_pay_for_the_slowest_loop():
    """Two data sets vmapped on one device (an easy and a hard covariance):
    the vmapped loop runs both sets' lanes until the hard set's loop ends, so
    the device pays sets x lanes x the slowest set's iterations. With a lane
    per chain, a set's loop runs as many iterations as its longest chain has
    leapfrog steps (one sampling chunk here)."""
    covs = np.stack([np.eye(2), [[1.0, 0.99], [0.99, 1.0]]]).astype(np.float32)
    out = cm.BatchSampler(
        correlated, 2, num_chains=4, devices=1, inner="async", **FAST
    ).run(0, covs)
    steps = out.extra["num_steps"].astype(np.int64)  # (set, chain, draw)
    iterations = steps.sum(-1).max(-1)  # per set
    assert iterations[1] > 2 * iterations[0]  # very different difficulty
    assert out.stats["lockstep_steps"] == iterations.max() * 4 * 2
    assert out.stats["lockstep_efficiency"] == steps.sum() / (iterations.max() * 8)


def test_slowest_times_is_exact_past_int32():
    """``n x`` the largest two-word counter, for totals beyond 2**31."""
    totals = [3 * 2**30 + 12345, 3 * 2**30 + 999_999, 2**20 - 1]
    words = np.array([[t % 2**LOW_BITS, t >> LOW_BITS] for t in totals], np.int32)
    for n in (1, 7, 2**19 + 3):
        lo, hi = np.asarray(slowest_times(words, n)).tolist()
        assert lo < 2**LOW_BITS and hi * 2**LOW_BITS + lo == max(totals) * n


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lanes": 2}, "lanes=2 needs inner='async'"),
        ({"inner": "async", "lanes": 0}, "lanes must be >= 1"),
        (
            {"inner": "async", "lanes": 5, "num_chains": 8, "devices": 2},
            "lanes=5 is more",
        ),
        ({"inner": "async", "kernel": "chees"}, "kernel='chees'.*inner='vmap'"),
        ({"inner": "async", "adapt": "ensemble"}, "adapt='ensemble'.*inner='vmap'"),
    ],
)
def test_bad_async_options_fail_before_compiling(options, message):
    with pytest.raises(ValueError, match=message):
        cm.Sampler(linreg, **options)
