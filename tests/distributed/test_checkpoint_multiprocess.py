"""Resume a 2-process run whose processes have their own checkpoint dirs."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("checkpoint_worker.py")
LAUNCH = [sys.executable, "-m", "chainmesh.cli", "launch"]


def _launch(args: list[str], timeout: float) -> int:
    """Run the launcher; on a hang stop it and every worker it started."""
    cmd = [*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--"]
    child = subprocess.Popen([*cmd, *args], start_new_session=True)
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the launcher's own group only
        child.wait()
        raise


@pytest.mark.parametrize("store", ["", "store"])  # draws in checkpoints, or not
def test_processes_resume_from_process_0s_checkpoint(tmp_path, store):
    stop_at = 6  # 4 warmup chunks, then 2 of the 4 sampling chunks
    worker = [sys.executable, str(WORKER), str(tmp_path), str(stop_at), store]
    assert _launch(worker, 300) == 0
    assert (tmp_path / "ckpt-0" / "checkpoint.npz").exists()
    assert not (tmp_path / "ckpt-1" / "checkpoint.npz").exists()  # node-local
    if store:  # each process's draws so far are in its own store
        assert (tmp_path / "store-1" / "store.json").exists()
    for process in (0, 1):
        with np.load(tmp_path / f"out-{process}.npz") as z:
            # interrupted run from 0, resumed from process 0's chunk, whole run
            assert z["starts"].tolist() == [0, stop_at], process
            assert "cannot resume" in str(z["refused"]) and "seed" in str(z["refused"])
            names = [k.split(".", 1)[1] for k in z.files if k.startswith("whole.")]
            assert "beta" in names and "diverging" in names
            for name in names:
                np.testing.assert_array_equal(z[f"resumed.{name}"], z[f"whole.{name}"])
