"""``chainmesh bench --suite``: targets, verdict, report, and one tiny run."""

import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
from harness.configs import CONFIGS as HARNESS_CONFIGS
from harness.configs import UNSUPPORTED as HARNESS_UNSUPPORTED

from chainmesh.bench import suite
from chainmesh.bench.suite_report import summary_rows, with_ratios
from chainmesh.bench.targets import (
    CONFIGS,
    PEERS,
    UNSUPPORTED,
    correlated_args,
    load_target,
    suite_names,
)

TINY_POSTERIORS = ("kidiq-kidscore_momiq", "sblrc-blr")
TINY_CONFIGS = ("nuts-vmap", "chees")
TINY = ["--suite", "posteriordb", "--posteriors", ",".join(TINY_POSTERIORS)]
TINY += ["--configs", ",".join(TINY_CONFIGS), "--chains", "2", "--devices", "2"]
TINY += ["--warmup", "40", "--samples", "40"]
# BlackJAX MAMS runs as many steps as its tuned length asks (no cap): on
# sblrc its step size collapsed and one run took 924 s. Its peer code runs in
# test_bench.py on a Gaussian.
TINY_PEERS = tuple(p for p in PEERS if p != "blackjax:mams")
TINY += ["--peers", ",".join(TINY_PEERS)]


def test_configurations_are_the_harness_configurations():
    assert CONFIGS is HARNESS_CONFIGS  # one table, read by both
    assert UNSUPPORTED is HARNESS_UNSUPPORTED


@pytest.mark.parametrize("suite_name", ["posteriordb", "models"])
def test_every_reference_parameter_is_named_in_the_draws(suite_name):
    """A sample shaped (chains, draws, ...) per site names every reference
    parameter of every target."""
    from numpyro import handlers
    from numpyro.infer import init_to_uniform

    names = suite_names(suite_name)
    assert len(names) == (10 if suite_name == "posteriordb" else 5)
    for name in names:
        target = load_target(suite_name, name)
        model = handlers.substitute(
            handlers.seed(target.model, 0), substitute_fn=init_to_uniform
        )
        trace = handlers.trace(model).get_trace(*target.args)
        samples = {
            k: np.broadcast_to(site["value"], (2, 3, *np.shape(site["value"])))
            for k, site in trace.items()
            if site["type"] in ("sample", "deterministic")
            and not site.get("is_observed")
        }
        named = target.named(samples)
        assert set(target.reference) <= set(named), name
        assert all(x.shape == (2, 3) for x in named.values()), name


def test_correlated_reference_sds_are_the_covariance_diagonal():
    tril, sds = correlated_args(d=20, rho=0.9)
    cov = tril.astype(np.float64) @ tril.T.astype(np.float64)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), sds, rtol=1e-5)
    assert cov[0, 1] == pytest.approx(0.9 * sds[0] * sds[1], rel=1e-5)


def test_unknown_names_are_rejected_naming_the_choices():
    with pytest.raises(ValueError, match="kidiq-kidscore_momiq"):
        load_target("posteriordb", "eight_schools")
    with pytest.raises(ValueError, match="suite must be one of"):
        suite_names("posteriordb-full")
    p = suite.parser()
    for bad in (["--configs", "nuts-fast"], ["--peers", "stan"]):
        with pytest.raises(SystemExit):
            p.parse_args(["--suite", "models", *bad])
    options = suite.resolve(p.parse_args(["--suite", "models", "--quick"]))
    assert (options.chains, options.devices) == (8, 2)
    assert (options.warmup, options.samples) == (300, 500)
    assert options.configs == ["nuts-vmap", "nuts-ensemble", "chees"]
    with pytest.raises(argparse.ArgumentTypeError, match="correlated100"):
        suite.resolve(p.parse_args(["--suite", "models", "--posteriors", "kidiq"]))


def _row(mean, sd, ess, rhat, ref=(0.0, 1.0)):
    row = {"mean": mean, "sd": sd, "ess_bulk": ess, "ess_tail": ess, "r_hat": rhat}
    return row | {"ref_mean": ref[0], "ref_sd": ref[1]}


def test_verdict_fails_on_each_rule_at_its_bound():
    # ESS 400: MCSE 0.05, so z = |mean| / (0.05 + 0.02) = |mean| / 0.07.
    ok = suite.verdict({"a": _row(0.27, 1.14, 400.0, 1.009)})
    assert ok["passed"] and ok["worst_z"] == pytest.approx(0.27 / 0.07)
    assert ok["worst_sd_ratio"] == pytest.approx(1.14) and ok["max_rhat"] == 1.009
    assert not suite.verdict({"a": _row(0.29, 1.0, 400.0, 1.0)})["passed"]  # z 4.1
    assert not suite.verdict({"a": _row(0.0, 0.84, 400.0, 1.0)})["passed"]  # sd
    assert not suite.verdict({"a": _row(0.0, 1.0, 400.0, 1.011)})["passed"]  # R-hat
    assert not suite.verdict({"a": _row(0.0, 1.0, math.nan, 1.0)})["passed"]  # stuck
    worst = suite.verdict({"a": _row(0.0, 1.1, 400, 1.0), "b": _row(0, 0.95, 400, 1.0)})
    assert worst["worst_sd_ratio"] == pytest.approx(1.1)
    free = suite.verdict({"a": _row(5.0, 9.0, 400.0, 1.001, ref=(None, None))})
    assert free["passed"] and free["worst_z"] is None and free["worst_sd_ratio"] is None


def _record(posterior, sampler, ess_per_1000, passed=True):
    return {"posterior": posterior, "sampler": sampler, "status": "ok"} | {
        "ess_per_1000_gradients": ess_per_1000,
        "passed": passed,
    }


def test_failing_runs_never_enter_the_medians():
    records = with_ratios(
        [
            _record("a", "numpyro", 10.0),
            _record("a", "chainmesh:chees", 40.0),
            _record("b", "numpyro", 10.0),
            _record("b", "chainmesh:chees", 900.0, passed=False),
            _record("c", "numpyro", 10.0, passed=False),
            _record("c", "chainmesh:chees", 20.0),
            _record("d", "numpyro", 10.0),
            _record("d", "chainmesh:chees", 5.0),
        ]
    )
    assert records[1]["ess_per_gradient_vs_numpyro"] == pytest.approx(4.0)
    rows = summary_rows(records)["chainmesh:chees"]
    assert rows["median"] == pytest.approx(np.median([4.0, 0.5]))
    assert rows["worst"] == pytest.approx(0.5)
    assert (rows["compared"], rows["failing"], rows["runs"]) == (2, 1, 4)
    assert summary_rows(records)["numpyro"]["failing"] == 1


def test_a_missing_peer_is_skipped_with_a_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nutpie" else real(name, *a),
    )
    options = suite.resolve(suite.parser().parse_args(TINY))
    samplers, skipped = suite.plan_runs(options)
    assert "nutpie" not in samplers and "nutpie:lowrank" not in samplers
    assert skipped == [
        f"skipped {peer}: nutpie not installed (pip install 'chainmesh[bench]' "
        "installs every peer)"
        for peer in ("nutpie", "nutpie:lowrank")
    ]
    assert samplers[:3] == ["numpyro", "chainmesh:nuts-vmap", "chainmesh:chees"]


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """Two posteriors, two configurations, every installed peer, 40 + 40
    draws of 2 chains: twelve processes (a minute or two on 2 quiet cores)."""
    out = tmp_path_factory.mktemp("suite")
    assert suite.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "suite.json").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_suite")  # one worker runs the suite once
def test_tiny_suite_has_every_run_or_a_skip_line(tiny_suite, capsys):
    out, records = tiny_suite
    text = (out / "suite.md").read_text()
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samplers = ["numpyro", *(f"chainmesh:{c}" for c in TINY_CONFIGS), *TINY_PEERS[1:]]
    for sampler in samplers:
        missing = suite.missing_peer(sampler)
        runs = [r for r in records if r["sampler"] == sampler]
        if missing:
            assert not runs and f"- skipped {sampler}: {missing}" in text
        else:
            assert [r["posterior"] for r in runs] == list(TINY_POSTERIORS), sampler
    for r in records:
        assert r["status"] == "ok", (r["sampler"], r.get("reason"))
        assert r["command"].startswith("chainmesh bench --suite posteriordb")
        assert r["versions"]["numpyro"] and r["versions"]["jax"]
        assert (r["chains"], r["devices"]) == (2, 2)
        head = f"| {r['posterior']} | {r['sampler']} | "
        (row,) = [line for line in text.splitlines() if line.startswith(head)]
        assert row[len(head) :].startswith("pass" if r["passed"] else "FAIL")


def _number(value):
    """A saved number: JSON's None stands for NaN (undefined)."""
    return math.nan if value is None else value


def _same(saved, expected):
    """A saved number equals the expected one, or both are undefined."""
    expected = _number(expected)
    if math.isnan(expected):
        return saved is None
    return saved == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_suite")  # one worker runs the suite once
def test_tiny_suite_numbers_agree_with_each_other(tiny_suite):
    """Every derived number is the ratio of the numbers it is made of, and the
    verdict is the one the saved summary gives, recomputed here by hand."""
    _, records = tiny_suite
    base = {r["posterior"]: r for r in records if r["sampler"] == "numpyro"}
    for r in records:
        rows = list(r["summary"].values())
        for key in ("ess_bulk", "ess_tail"):  # undefined anywhere: undefined
            values = [_number(x[key]) for x in rows]
            assert _same(r[f"{key}_min"], min(values) if values else math.nan)
        rhat = [_number(x["r_hat"]) for x in rows]
        assert _same(
            r["max_rhat"], math.nan if any(map(math.isnan, rhat)) else max(rhat)
        )
        assert r["gradients_sampling"] >= 2 * 40 and r["gradients_warmup"] >= 2 * 40
        ess, grads = _number(r["ess_bulk_min"]), r["gradients_sampling"]
        assert _same(r["ess_per_1000_gradients"], 1000 * ess / grads)
        total = grads + r["gradients_warmup"]
        assert _same(r["ess_per_1000_gradients_total"], 1000 * ess / total)
        assert _same(r["ess_per_s"], ess / r["wall_s"])
        theirs = _number(base[r["posterior"]]["ess_per_1000_gradients"])
        mine = _number(r["ess_per_1000_gradients"])
        assert _same(r["ess_per_gradient_vs_numpyro"], mine / theirs)
        z = [
            abs(x["mean"] - x["ref_mean"])
            / (x["ref_sd"] / math.sqrt(_number(x["ess_bulk"])) + 0.02 * x["ref_sd"])
            for x in rows
        ]
        sd_off = [abs(x["sd"] / x["ref_sd"] - 1) for x in rows]
        assert _same(r["worst_z"], math.nan if any(map(math.isnan, z)) else max(z))
        assert abs(r["worst_sd_ratio"] - 1) == pytest.approx(max(sd_off))
        passed = all(v <= 4 for v in z) and all(v <= 1.01 for v in rhat)
        assert r["passed"] == (passed and max(sd_off) <= 0.15)
        if r["sampler"].startswith("chainmesh:"):
            assert r["compilations_warm"] == 0 and r["wall_s"] == r["warm_wall_s"]
