"""BatchSampler: many data sets of one shape, all data sets x chains in one call."""

import numpy as np
import pytest
from models import normal_mean, normal_mean_posterior

import chainmesh as cm

RNG = np.random.default_rng(5)
YS = RNG.normal(size=(4, 25)).astype(np.float32) + np.arange(4)[:, None]
CONFIG = {
    "num_chains": 2,
    "devices": 2,
    "num_warmup": 150,
    "num_samples": 200,
    "progress_bar": False,
}


@pytest.fixture(scope="module")
def four():
    """4 data sets x 2 chains on 2 devices: 2 data sets x 2 chains per device."""
    return cm.BatchSampler(normal_mean, 4, **CONFIG).run(0, YS)


def test_every_data_set_gets_its_posterior(four):
    assert four.samples["mu"].shape == (4, 2, 200)
    assert four.plan.devices.shape == (2, 1) and four.plan.shards_per_device == 2
    for k in range(4):
        mean, sd = normal_mean_posterior(YS[k])
        draws = four.results[k].samples["mu"]
        np.testing.assert_array_equal(draws, four.samples["mu"][k])
        ess = cm.diagnostics.ess_bulk(draws)
        assert abs(draws.mean() - mean) <= 4 * sd / np.sqrt(ess)


def test_lockstep_spans_every_lane_of_a_device(four):
    """A device vectorizes its 2 data sets x 2 chains: it pays 4 x the longest."""
    steps = four.extra["num_steps"].astype(np.int64)  # (dataset, chain, draw)
    assert four.stats["leapfrog_steps"] == steps.sum()
    per_device = steps.reshape(2, 4, -1).max(axis=1)  # (device, draw)
    assert four.stats["lockstep_steps"] == 4 * per_device.sum()


def test_padding_data_sets_stay_out_of_stats(four):
    """3 data sets on 2 rows run a padding copy of data set 0 as data set 3:
    the 4-data-set run with ys[3] = ys[0] runs the same lanes."""
    ys = YS.copy()
    ys[3] = ys[0]
    padded_like = cm.BatchSampler(normal_mean, 4, **CONFIG).run(0, ys)
    three = cm.BatchSampler(normal_mean, 3, **CONFIG).run(0, YS[:3])
    assert three.plan.num_shard_padding == 1
    np.testing.assert_array_equal(three.samples["mu"], padded_like.samples["mu"][:3])
    steps = padded_like.extra["num_steps"].astype(np.int64)
    assert three.stats["leapfrog_steps"] == steps[:3].sum()
    assert three.stats["lockstep_steps"] == padded_like.stats["lockstep_steps"]


def test_arguments_need_the_data_set_axis(count_compiles):
    sampler = cm.BatchSampler(normal_mean, 4, **CONFIG)
    with count_compiles() as c:
        with pytest.raises(ValueError, match=r"args\[0\] has shape \(25,\)"):
            sampler.run(0, YS[0])
        with pytest.raises(ValueError, match="num_datasets must be >= 1"):
            cm.BatchSampler(normal_mean, 0)
    assert c.count == 0
