"""Checkpoint, resume after SIGKILL, and streaming draws to disk."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import RESUME_CONFIG, linreg, linreg_data

import chainmesh as cm
from chainmesh import checkpoint

CHILD = Path(__file__).with_name("checkpoint_child.py")
X, Y = linreg_data()


@pytest.fixture(scope="module")
def uninterrupted():
    return cm.Sampler(linreg, **RESUME_CONFIG).run(0, X, Y)


def _assert_same(a, b):
    for name in a.samples:
        np.testing.assert_array_equal(a.samples[name], b.samples[name])
    for name in a.extra:
        np.testing.assert_array_equal(a.extra[name], b.extra[name])


def _kill_child(directory: Path, stop_at: int, when: str) -> None:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(stop_at), when],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "KILLME", line
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()


@pytest.mark.parametrize(
    ("stop_at", "when", "resumes_at"),
    [
        (4, "after", 4),  # killed during warmup (chunks 0-5 are warmup)
        (8, "after", 8),  # killed during sampling
        (10, "during", 8),  # killed while writing: the previous checkpoint holds
    ],
)
def test_resume_after_sigkill_is_bitwise_equal(
    tmp_path, uninterrupted, stop_at, when, resumes_at
):
    _kill_child(tmp_path, stop_at, when)
    saved = checkpoint.load(tmp_path)
    assert saved.progress["next_chunk"] == resumes_at
    if when == "during":
        assert (tmp_path / "checkpoint.npz.tmp").exists()
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    resumed = sampler.run(0, X, Y, resume=True)
    _assert_same(uninterrupted, resumed)
    assert checkpoint.load(tmp_path).progress["next_chunk"] == 12


def test_resume_refuses_another_run(tmp_path):
    cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    with pytest.raises(ValueError, match="cannot resume.*seed"):
        sampler.run(1, X, Y, resume=True)
    with pytest.raises(ValueError, match="cannot resume.*data"):
        sampler.run(0, X, Y + 1.0, resume=True)
    other = {**RESUME_CONFIG, "target_accept_prob": 0.9}
    with pytest.raises(ValueError, match="cannot resume.*target_accept_prob"):
        cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **other).run(
            0, X, Y, resume=True
        )


def test_resume_without_checkpoint_starts_fresh(tmp_path, uninterrupted):
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    _assert_same(uninterrupted, sampler.run(0, X, Y, resume=True))


def test_checkpoint_files_need_no_pickle(tmp_path):
    cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as z:
        assert z["draws.beta"].shape == (4, 60, 3)
    assert (tmp_path / "manifest.json").read_text().startswith("{")


def test_unwritable_checkpoint_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="checkpoint_dir .* is not writable"):
        cm.Sampler(linreg, checkpoint_dir=str(blocker / "sub"), **RESUME_CONFIG)


def test_full_disk_fails_before_sampling(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    with pytest.raises(ValueError, match="GB free but checkpoints need"):
        sampler.run(0, X, Y)


def test_store_streams_draws_to_npy(tmp_path, uninterrupted):
    result = cm.Sampler(linreg, store=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    assert isinstance(result.samples["beta"], np.memmap)
    _assert_same(uninterrupted, result)
    on_disk = np.load(tmp_path / "draws" / "beta.npy", allow_pickle=False)
    np.testing.assert_array_equal(on_disk, uninterrupted.samples["beta"])
    assert os.path.getsize(tmp_path / "extra" / "diverging.npy") > 4 * 60


@pytest.mark.slow
def test_streaming_keeps_host_memory_flat(tmp_path):
    """Peak RSS with store= stays below the in-memory run by most of the draws."""
    script = Path(__file__).parents[1] / "scripts" / "bench_memory.py"
    peaks = {}
    for mode in ("in-memory", "streamed"):
        out = subprocess.run(
            [sys.executable, str(script), "--chains", "64", "--draws", "5000"]
            + ["--child", mode, str(tmp_path / mode)],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    draws_mb = peaks["streamed"]["draws_mb"]
    assert draws_mb > 120
    saved = peaks["in-memory"]["peak_rss_mb"] - peaks["streamed"]["peak_rss_mb"]
    assert saved > 0.6 * draws_mb
