"""Sampling until the targets hold, and warmup that ends when it has settled."""

import json

import numpy as np
import pytest
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import linreg, linreg_data, normal_mean, normal_mean_posterior

import chainmesh as cm
from chainmesh import checkpoint, diagnostics, stopping
from chainmesh.config import SamplerConfig

X, Y = linreg_data()
TARGETS = {
    "num_chains": 8,
    "devices": 2,
    "num_warmup": "auto",
    "target_ess": 300,
    "chunk_size": 25,
    "progress_bar": False,
}


def _met(samples: dict, n: int, ess: float, rhat: float) -> bool:
    """The targets, recomputed with the scalar diagnostics on n draws."""
    for x in samples.values():
        x = np.asarray(x[:, :n], np.float64).reshape(x.shape[0], n, -1)
        for j in range(x.shape[-1]):
            column = x[..., j]
            if np.ptp(column) == 0:
                continue
            if not (
                diagnostics.ess_bulk(column) >= ess
                and diagnostics.ess_tail(column) >= ess
                and diagnostics.r_hat(column) <= rhat
            ):
                return False
    return True


@pytest.fixture(scope="module")
def auto():
    return cm.Sampler(linreg, **TARGETS).run(0, X, Y)


def test_stops_at_the_first_chunk_where_the_targets_hold(auto):
    stop = auto.stats["stop"]
    n = stop["draws"]
    assert stop["reason"] == "targets" and stop["samples"] == n
    assert auto.samples["beta"].shape == (8, n, 3)
    assert auto.extra["diverging"].shape == (8, n)
    assert [c["draws"] for c in stop["checks"]] == list(range(25, n + 1, 25))
    assert _met(auto.samples, n, 300, 1.01)
    assert not any(_met(auto.samples, k, 300, 1.01) for k in range(25, n, 25))
    assert stop["min_ess_bulk"] >= 300 and stop["max_rhat"] <= 1.01


def test_auto_warmup_ends_at_a_window_with_the_final_buffer(auto):
    stop = auto.stats["stop"]
    config = {k: v for k, v in TARGETS.items() if k != "devices"}
    plan = stopping.warmup_plan(SamplerConfig(**config))
    settled = [w for w in stop["windows"] if w["settled"]]
    assert stop["warmup_reason"] == "settled" and len(settled) == 1
    # The window it ended at, plus the final step-size buffer.
    assert stop["warmup"] == settled[0]["end"] + (1000 - plan.final)
    assert settled[0]["end"] in plan.candidates
    # Every window before it was checked and found unsettled.
    assert all(not w["settled"] for w in stop["windows"][:-1])
    # The kernel left warmup: its counter is past the schedule's end.
    assert int(np.asarray(auto.state.i).min()) == 1000 + stop["samples"]


def test_a_new_target_compiles_nothing(auto, count_compiles):
    fixed = {k: v for k, v in TARGETS.items() if k != "target_ess"}
    fixed.update(num_warmup=1000, num_samples=50)
    with count_compiles() as c:
        other = cm.Sampler(linreg, **{**TARGETS, "target_ess": 100, "max_rhat": 1.05})
        loose = other.run(1, X, Y)
        cm.Sampler(linreg, **fixed).run(0, X, Y)
    assert c.count == 0
    assert loose.stats["stop"]["reason"] == "targets"
    assert loose.stats["stop"]["draws"] < auto.stats["stop"]["draws"] + 25


KERNELS = {
    "nuts": {},
    "ensemble": {"adapt": "ensemble"},
    "chees": {"kernel": "chees"},
    "mams": {"kernel": "mams"},
}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_an_auto_run_resumes_bitwise(tmp_path, monkeypatch, kernel):
    config = {**TARGETS, **KERNELS[kernel], "checkpoint_every": 1}
    whole = cm.Sampler(linreg, **config).run(0, X, Y)
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **config)
    saved = []
    original = checkpoint.save_checkpoint

    def record(directory, manifest, progress, *args, **kwargs):
        saved.append(dict(progress))
        original(directory, manifest, progress, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", record)
    assert_same_draws(whole, sampler.run(0, X, Y))
    monkeypatch.undo()
    # Right after the warmup decided to jump (the jump still to make), and
    # mid-sampling, before the stopping check.
    jumping = next(p for p in saved if p["jump"] >= 0)
    sampling = [p for p in saved if 0 < p["filled"] and p["stop"] is None]
    for at in (jumping["next_chunk"], sampling[-1]["next_chunk"]):
        interrupt_after(monkeypatch, at)
        with pytest.raises(Interrupted):
            sampler.run(0, X, Y)
        monkeypatch.undo()
        resumed = sampler.run(0, X, Y, resume=True)
        assert_same_draws(whole, resumed)
        for key in ("warmup", "samples", "draws", "reason", "windows", "checks"):
            assert resumed.stats["stop"][key] == whole.stats["stop"][key], key


def test_max_samples_warns_with_the_numbers(recwarn):
    config = {**TARGETS, "target_ess": 10**6, "max_samples": 60}
    with pytest.warns(UserWarning, match="max_samples=60 without meeting"):
        out = cm.Sampler(linreg, **config).run(0, X, Y)
    stop = out.stats["stop"]
    assert stop["reason"] == "max_samples" and stop["draws"] == 60
    assert out.samples["beta"].shape == (8, 60, 3)
    assert [c["draws"] for c in stop["checks"]] == [25, 50, 60]


def test_var_names_and_thinning():
    config = {**TARGETS, "var_names": ("sigma",), "thinning": 2, "target_ess": 200}
    out = cm.Sampler(linreg, **config).run(0, X, Y)
    stop = out.stats["stop"]
    n = stop["draws"]
    assert stop["samples"] == 2 * n and out.samples["beta"].shape == (8, n, 3)
    assert stop["min_ess_bulk_at"] == "sigma"
    sigma = {"sigma": out.samples["sigma"]}
    assert _met(sigma, n, 200, 1.01)
    assert not any(_met(sigma, k, 200, 1.01) for k in range(25, n, 25))


def test_store_files_keep_room_and_record_the_draws(tmp_path):
    out = cm.Sampler(linreg, store=str(tmp_path), **TARGETS).run(0, X, Y)
    n = out.stats["stop"]["draws"]
    meta = json.loads((tmp_path / "store.json").read_text())
    assert meta["kept"] == n
    assert out.samples["beta"].shape == (8, n, 3)
    full = np.load(tmp_path / "draws" / "beta.npy", mmap_mode="r")
    assert full.shape == (8, 5000 // 1, 3)
    np.testing.assert_array_equal(full[:, :n], out.samples["beta"])


def test_nested_rhat_target():
    config = {**TARGETS, "num_chains": 16, "target_ess": None, "max_nested_rhat": 1.01}
    out = cm.Sampler(linreg, **config).run(0, X, Y)
    stop = out.stats["stop"]
    n = stop["draws"]
    assert stop["reason"] == "targets" and stop["max_nested_rhat"] <= 1.01
    x, _ = stopping.coordinates(out.samples, 1, n)
    nested = diagnostics.nested_r_hat(x[0], 4)
    assert np.nanmax(nested) == pytest.approx(stop["max_nested_rhat"])


def test_batch_data_sets_report_their_own_stop():
    ys = np.random.default_rng(3).normal(size=(3, 20)).astype(np.float32)
    config = {
        "num_chains": 4,
        "devices": 2,
        "num_warmup": 100,
        "target_ess": 200,
        "chunk_size": 10,
        "progress_bar": False,
    }
    out = cm.BatchSampler(normal_mean, 3, **config).run(0, ys)
    stop = out.stats["stop"]
    n = stop["draws"]
    assert out.samples["mu"].shape == (3, 4, n)
    firsts = []
    for k, own in enumerate(stop["datasets"]):
        draws = {"mu": out.samples["mu"][k]}
        first = next(m for m in range(10, n + 1, 10) if _met(draws, m, 200, 1.01))
        assert own["met"] and own["draws"] == first
        firsts.append(first)
        mean, sd = normal_mean_posterior(ys[k])
        ess = own["min_ess_bulk"]
        assert abs(out.samples["mu"][k, :, :first].mean() - mean) < 4 * sd / ess**0.5
    assert n == max(firsts)


def test_bad_targets_are_refused_before_compiling():
    with pytest.raises(ValueError, match="max_samples= instead"):
        cm.Sampler(linreg, target_ess=100, num_samples=100)
    with pytest.raises(ValueError, match="max_samples applies to runs"):
        cm.Sampler(linreg, max_samples=100)
    with pytest.raises(ValueError, match="num_chains >= 16"):
        cm.Sampler(linreg, num_chains=8, max_nested_rhat=1.01)
    with pytest.raises(ValueError, match="num_warmup must be an int or 'auto'"):
        cm.Sampler(linreg, num_warmup="fast")
    with pytest.raises(ValueError, match="max_warmup=300 caps"):
        cm.Sampler(linreg, max_warmup=300)
    with pytest.raises(ValueError, match="target_ess must be >= 1"):
        cm.Sampler(linreg, target_ess=0)
    with pytest.raises(ValueError, match="max_rhat must be > 1"):
        cm.Sampler(linreg, max_rhat=1.0)
    with pytest.raises(TypeError, match="var_names must be a tuple"):
        cm.Sampler(linreg, target_ess=100, var_names="beta")


def test_unknown_var_names_are_refused_before_compiling(count_compiles):
    sampler = cm.Sampler(linreg, target_ess=100, var_names=("gamma",))
    with count_compiles() as c, pytest.raises(ValueError, match="'gamma'"):
        sampler.run(0, X, Y)
    assert c.count == 0
