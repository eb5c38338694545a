"""``chainmesh bench``: job planning, worker environment, report, and one tiny run."""

import argparse
import json
import math

import jax
import numpy as np
import pytest

import chainmesh as cm
from chainmesh.bench import runner as bench
from chainmesh.bench.host import wait_for_quiet
from chainmesh.bench.models import BENCH_MODELS, bench_data
from chainmesh.bench.report import LABELS, derive, markdown
from chainmesh.bench.worker import (
    NUMPYRO_METHODS,
    draw_metrics,
    executed_steps,
    loop_units,
)

TINY = ["--model", "gaussian100", "--devices", "2", "--chains", "2"]
TINY += ["--warmup", "30", "--samples", "30"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_one_chain_per_device_methods_need_enough_devices():
    for method in ("chainmesh_1pd", "numpyro_parallel"):
        assert bench.not_applicable(method, devices=2, chains=8)
        assert bench.not_applicable(method, devices=8, chains=8) is None
    assert bench.not_applicable("numpyro_vectorized", devices=1, chains=64) is None


def test_worker_env_replaces_device_count_and_adds_single_thread(monkeypatch):
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"
    )
    flags = bench.worker_env(4, single_thread=True)["XLA_FLAGS"].split()
    assert flags.count("--xla_force_host_platform_device_count=4") == 1
    assert not any(f.endswith("=8") for f in flags)
    assert "--xla_dump_to=/tmp/x" in flags
    assert set(bench.SINGLE_THREAD_FLAGS) <= set(flags)
    plain = bench.worker_env(2, single_thread=False)["XLA_FLAGS"].split()
    assert not set(bench.SINGLE_THREAD_FLAGS) & set(plain)


def test_device_loop_splits_floor_plus_remainder():
    assert [u.chains for u in loop_units(10, ["d0", "d1", "d2", "d3"])] == [3, 3, 2, 2]
    assert [u.device for u in loop_units(2, ["d0", "d1", "d2", "d3"])] == ["d0", "d1"]


def test_executed_steps_pays_the_block_maximum():
    steps = np.array([[1, 4], [3, 2], [5, 5]])
    assert executed_steps(steps, [3]) == 3 * (5 + 5)
    assert executed_steps(steps, [1, 1, 1]) == steps.sum()
    assert executed_steps(steps, [2, 1]) == 2 * (3 + 4) + 10


def test_draw_metrics_bound_the_ess_of_antithetic_chains():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16))
    x[:, 1::2] = -0.9 * x[:, ::2] + 0.1 * x[:, 1::2]  # anti-correlated draws
    steps = np.full(x.shape, 3)
    m = draw_metrics({"x": x}, steps, np.zeros(x.shape, bool))
    assert 0 < m["min_ess_bulk"] <= x.size * np.log10(x.size)
    assert m["leapfrog_useful"] == steps.sum() and m["divergences"] == 0


@pytest.mark.parametrize("name", sorted(BENCH_MODELS))
def test_warm_data_have_the_cold_shapes_and_new_values(name):
    cold, warm = bench_data(name, 0).args, bench_data(name, 1).args
    assert [(a.shape, a.dtype) for a in cold] == [(a.shape, a.dtype) for a in warm]
    assert any(not np.array_equal(a, b) for a, b in zip(cold, warm, strict=True))


def test_bad_options_are_rejected():
    assert _parse("--devices", "1,2", "--methods", "device_loop,chainmesh").methods == [
        "chainmesh",
        "device_loop",
    ]
    for bad in (["--devices", "0,2"], ["--chains", "x"], ["--methods", "stan"]):
        with pytest.raises(SystemExit):
            _parse(*bad)


def test_rounds_combine_to_medians_and_any_failure_fails():
    def ok(warm, compiles):
        metrics = {"warm_wall_s": warm, "compilations_warm": compiles, "plan": "p"}
        return {"status": "ok", "metrics": metrics}

    combined = bench.combine([ok(3.0, 0), ok(1.0, 1), ok(2.0, 0)])
    assert combined["metrics"] == {
        "warm_wall_s": 2.0,
        "compilations_warm": 1,
        "plan": "p",
    }
    failed = bench.combine([ok(1.0, 0), {"status": "error", "reason": "boom"}])
    assert failed == {"status": "error", "reason": "boom"}


def test_command_line_reproduces_the_options():
    options = _parse("--devices", "1,2", "--chains", "8", "--single-thread")
    options.max_busy = 0.5
    assert bench.command_line(options) == (
        "chainmesh bench --model logistic --devices 1,2 --chains 8 --warmup 300 "
        "--samples 500 --repeats 1 --single-thread --max-busy 0.5 --out bench-results"
    )


def test_wait_for_quiet_returns_at_once_when_the_bar_is_high():
    waited, busy = wait_for_quiet(max_busy=1e6, timeout=60)
    assert waited < 10 and (busy is None or busy >= 0)


def _fake_run(method: str, warm: float, ess_per_s: float, status: str = "ok") -> dict:
    metrics = dict.fromkeys(bench.POSITIVE_METRICS, 1.0) | {
        "warm_wall_s": warm,
        "ess_per_s": ess_per_s,
        "gradients_per_s": 50.0,
        "compilations_warm": 0,
        "divergences": 0,
    }
    run = {"devices": 2, "chains": 8, "method": method, "status": status}
    return run | ({"metrics": metrics} if status == "ok" else {"reason": "n/a"})


def test_report_ratios_compare_with_the_best_numpyro_method():
    results = {
        "command": "chainmesh bench",
        "config": {"model": "logistic", "devices": [2], "chains": [8], "warmup": 1}
        | {"samples": 1, "repeats": 1, "seed": 0, "single_thread": True},
        "environment": {"cpu": "cpu", "cores": 2, "dtype": "float32"}
        | {"jax": "x", "jaxlib": "x", "numpyro": "x", "chainmesh": "x"}
        | {"load_average_start": [1.0], "load_average_end": [1.0]},
        "raw_gradient": [
            {"devices": 2, "chains": 8, "status": "ok", "xla_flags": "f"}
            | {"metrics": {"raw_gradients_per_s": 100.0, "plan": "p"}}
        ],
        "runs": [
            _fake_run("chainmesh", warm=1.0, ess_per_s=40.0),
            _fake_run("numpyro_vectorized", warm=4.0, ess_per_s=10.0),
            _fake_run("numpyro_sequential", warm=8.0, ess_per_s=20.0),
            _fake_run("numpyro_parallel", warm=0, ess_per_s=0, status="n/a"),
        ],
    }
    for run in results["runs"]:
        run["xla_flags"] = "f"
    derived = derive(results)["runs"][0]["derived"]
    assert derived["numpyro_best_warm"] == "numpyro_vectorized"
    assert derived["warm_speedup_vs_numpyro"] == pytest.approx(4.0)
    assert derived["numpyro_best_ess_per_s"] == "numpyro_sequential"
    assert derived["ess_per_s_vs_numpyro"] == pytest.approx(2.0)
    assert derived["raw_fraction"] == pytest.approx(0.5)
    text = markdown(results)
    labels = [f"| {LABELS[r['method']]} |" for r in results["runs"]]
    table = [line for line in text.splitlines() if any(x in line for x in labels)]
    assert len(table) == 4 and "n/a" in table[-1]
    assert "| 2 | 8 | 100 | p |" in text  # the raw gradient table
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_the_plot_has_a_colour_for_every_method(tmp_path):
    pytest.importorskip("matplotlib")
    from chainmesh.bench.report import plot

    results = {
        "config": {"model": "m", "devices": [2], "chains": [8], "warmup": 1}
        | {"samples": 1, "single_thread": True},
        "raw_gradient": [],
        "runs": [_fake_run(m, warm=1.0, ess_per_s=1.0) for m in bench.METHODS],
    }
    png = plot(results, tmp_path / "scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny sweep of every method (about a minute and a half on 2 cores)."""
    out = tmp_path_factory.mktemp("bench")
    assert bench.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # one worker runs the sweep once
def test_tiny_run_writes_the_three_files(tiny_run):
    out, results = tiny_run
    text = (out / "results.md").read_text()
    shown = [LABELS[m] for m in bench.DEFAULT_METHODS]
    assert all(f"| 2 | 2 | {label} |" in text for label in shown)
    png = out / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["command"].startswith("chainmesh bench --model gaussian100")
    env = results["environment"]
    for key in ("jax", "jaxlib", "numpyro", "cores", "dtype", "cpu"):
        assert env[key]
    assert all(
        "--xla_force_host_platform_device_count=2" in r["xla_flags"]
        for r in results["runs"]
    )
    assert set(LABELS) == set(bench.METHODS)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # one worker runs the sweep once
def test_tiny_run_numbers_agree_with_each_other(tiny_run):
    """Two accountings of the same work must agree, and ratios must be the
    ratios of the numbers they are made of."""
    _, results = tiny_run
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(bench.DEFAULT_METHODS)
    for method, run in runs.items():
        assert run["status"] == "ok", (method, run.get("reason"))
        m = run["metrics"]
        for key in bench.POSITIVE_METRICS:
            assert m[key] is not None and math.isfinite(m[key]) and m[key] > 0
        assert m["ess_per_s"] == pytest.approx(m["min_ess_bulk"] / m["warm_wall_s"])
        assert m["leapfrog_executed"] >= m["leapfrog_useful"]
    # 2 chains on 2 devices, one per device: nobody waits, so the steps the
    # programs counted equal the steps recorded with the draws, exactly.
    for method in ("chainmesh", "chainmesh_map", "chainmesh_1pd"):
        m = runs[method]["metrics"]
        assert m["leapfrog_executed"] == m["leapfrog_useful"], method
        assert m["lockstep_efficiency"] == 1.0
        # the later process loads both programs from the disk cache
        assert m["programs_from_disk2"] == 2, method
        assert m["compile2_s"] < m["compile_s"], method
    best = min(
        (runs[n]["metrics"]["warm_wall_s"], n) for n in NUMPYRO_METHODS if n in runs
    )
    derived = runs["chainmesh"]["derived"]
    assert derived["numpyro_best_warm"] == best[1]
    assert derived["warm_speedup_vs_numpyro"] == pytest.approx(
        best[0] / runs["chainmesh"]["metrics"]["warm_wall_s"]
    )
    (raw,) = results["raw_gradient"]
    assert raw["status"] == "ok"
    assert derived["raw_fraction"] == pytest.approx(
        runs["chainmesh"]["metrics"]["gradients_per_s"]
        / raw["metrics"]["raw_gradients_per_s"]
    )


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # one worker runs the sweep once
def test_tiny_run_warm_chainmesh_calls_compile_nothing(tiny_run):
    _, results = tiny_run
    for run in results["runs"]:
        warm = run["metrics"]["compilations_warm"]
        if run["method"].startswith("chainmesh"):
            assert warm == 0, run["method"]
        elif run["method"] in NUMPYRO_METHODS:
            assert warm >= 1, run["method"]  # NumPyro recompiles on new data


@pytest.mark.slow
def test_ensemble_kernels_and_blackjax_measure_their_own_work():
    """ChEES runs the same steps on every chain: executed = useful, and a
    warm call compiles nothing, for chainmesh's ChEES and BlackJAX's."""
    pytest.importorskip("blackjax")
    from chainmesh.bench import worker

    jax.monitoring.register_event_duration_secs_listener(worker._on_event)
    job = {"model": "gaussian100", "devices": len(jax.devices()), "chains": 8}
    job |= {"warmup": 60, "samples": 40, "seed": 0}
    for method in ("chainmesh_chees", "blackjax_chees"):
        m = worker.run_job(job | {"method": method})
        assert m["leapfrog_executed"] == m["leapfrog_useful"] >= 8 * 40, method
        assert m["lockstep_efficiency"] == 1.0
        assert m["compilations_cold"] >= 2 and m["compilations_warm"] == 0, method
        assert m["gradients_per_s"] > 0 and m["min_ess_bulk"] > 0


@pytest.mark.slow
def test_blackjax_mams_peer_counts_two_gradients_a_step():
    """BlackJAX MAMS as the bench runs it: draws shaped (chains, draws, ...),
    gradients even (two per minimal-norm step), and on a 2-d standard
    Gaussian the means within 5 Monte-Carlo standard errors of 0."""
    pytest.importorskip("blackjax")
    import numpyro
    import numpyro.distributions as dist

    from chainmesh.bench.peers import blackjax_mams

    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    out = blackjax_mams(model, (), 4, 100, 200)(0, ())
    x = np.asarray(out.samples["x"])
    assert x.shape == (4, 200, 2)
    assert (out.steps_sampling % 2 == 0).all() and out.steps_sampling.min() >= 2
    assert out.steps_warmup.sum() > 0
    for j in range(2):
        ess = cm.diagnostics.ess_bulk(x[..., j])
        assert abs(x[..., j].mean()) < 5 / np.sqrt(ess)
