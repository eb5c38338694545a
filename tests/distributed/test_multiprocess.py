"""Several processes, one mesh: jax.distributed on 127.0.0.1."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from models import linreg, linreg_data

import chainmesh as cm

WORKER = Path(__file__).with_name("worker.py")
LAUNCH = [sys.executable, "-m", "chainmesh.cli", "launch"]


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "draws.npz"
    cmd = [*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--"]
    done = subprocess.run(
        [*cmd, sys.executable, str(WORKER), str(out)], timeout=300, check=False
    )
    assert done.returncode == 0
    X, y = linreg_data()
    # 1 process x 4 devices: the same 2 chains per device as 2 processes x 2.
    local = cm.Sampler(
        linreg,
        num_chains=8,
        devices=4,
        num_warmup=100,
        num_samples=100,
        progress_bar=False,
    ).run(0, X, y)
    with np.load(out) as z:
        assert int(z["processes"]) == 2 and int(z["devices"]) == 4
        for name, x in local.samples.items():
            np.testing.assert_array_equal(z[f"samples.{name}"], x)
        for name, x in local.extra.items():
            np.testing.assert_array_equal(z[f"extra.{name}"], x)
        # Pooled adaptation and async lanes over 2 processes: bitwise equal
        # to 1 process.
        for kernel, options in {
            "chees": {"kernel": "chees"},
            "mams": {"kernel": "mams"},
            "ensemble": {"adapt": "ensemble"},
            "async": {"inner": "async", "lanes": 1},
            "ensemble-lowrank": {"adapt": "ensemble", "metric": "lowrank"},
        }.items():
            one = cm.Sampler(
                linreg, num_chains=8, devices=4, num_warmup=100, num_samples=100,
                progress_bar=False, **options,
            ).run(0, X, y)  # fmt: skip
            for group in ("samples", "extra"):
                for name, x in getattr(one, group).items():
                    np.testing.assert_array_equal(z[f"{kernel}.{group}.{name}"], x)
        # Auto warmup and target ESS: both processes took 1 process's decisions.
        auto = cm.Sampler(
            linreg, num_chains=8, devices=4, num_warmup="auto", target_ess=200,
            chunk_size=25, progress_bar=False,
        ).run(0, X, y)  # fmt: skip
        for group in ("samples", "extra"):
            for name, x in getattr(auto, group).items():
                np.testing.assert_array_equal(z[f"auto.{group}.{name}"], x)
    with np.load(str(out) + ".stop.npz") as z:
        stop = json.loads(str(z["stop"]))
    assert stop == {k: auto.stats["stop"][k] for k in ("warmup", "samples", "draws")}


@pytest.mark.slow  # 32 s: waits for a timeout
def test_a_dying_process_stops_the_others(tmp_path):
    cmd = [*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--"]
    start = time.monotonic()
    done = subprocess.run(
        [*cmd, sys.executable, str(WORKER), str(tmp_path / "x.npz"), "fail"],
        timeout=120,
        check=False,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "process 1 exited with code 3" in done.stderr
    # Process 1 dies; process 0 is stopped (by the launcher or by JAX's
    # coordination service noticing the dead peer), not left hanging.
    assert done.returncode != 0
    assert time.monotonic() - start < 90
    assert not (tmp_path / "x.npz").exists()
