"""Stores of kept draws: files never change under an earlier Result."""

import numpy as np
import pytest
from models import RESUME_CONFIG, linreg, linreg_data

import chainmesh as cm
from chainmesh.store import FileStore

X, Y = linreg_data()


def _copy(result):
    return {k: np.array(v) for k, v in {**result.samples, **result.extra}.items()}


def test_a_new_run_never_changes_an_earlier_result(tmp_path):
    config = {**RESUME_CONFIG, "store": str(tmp_path)}
    first = cm.Sampler(linreg, **config).run(0, X, Y)
    kept = _copy(first)
    second = cm.Sampler(linreg, **config).run(1, X, Y)
    assert not np.array_equal(second.samples["beta"], kept["beta"])
    kept_second = _copy(second)
    # resume=True without a checkpoint starts over: new files as well
    third = cm.Sampler(linreg, **config).run(2, X, Y, resume=True)
    for result, values in ((first, kept), (second, kept_second)):
        for name, x in {**result.samples, **result.extra}.items():
            np.testing.assert_array_equal(x, values[name])
    on_disk = np.load(tmp_path / "draws" / "beta.npy")
    np.testing.assert_array_equal(on_disk, third.samples["beta"])
    assert not np.array_equal(on_disk, kept_second["beta"])


def _store(path, token=None, reuse=False, shape=(2, 5)):
    store = FileStore(path)
    store.allocate("draws", "x", shape, np.float32)
    store.open(token, reuse)
    return store


def test_files_are_reopened_only_for_their_run_token(tmp_path):
    store = _store(tmp_path, "run-a")
    store.write("draws", "x", 1, 0, np.ones((2, 3), np.float32))
    store.close()
    assert FileStore(tmp_path).found_token() == "run-a"
    with pytest.raises(ValueError, match="does not hold the draws.*run-b"):
        _store(tmp_path, "run-b", reuse=True)
    with pytest.raises(ValueError, match=r"holds \(2, 5\).*needs \(2, 6\)"):
        _store(tmp_path, "run-a", reuse=True, shape=(2, 6))
    again = _store(tmp_path, "run-a", reuse=True)
    again.write("draws", "x", 1, 3, np.full((2, 2), 2, np.float32))
    expected = np.array([[1, 1, 1, 2, 2]] * 2, np.float32)
    np.testing.assert_array_equal(again.read("draws")["x"], expected)
    again.close()


def test_a_store_opens_new_files_on_first_write(tmp_path):
    old = _store(tmp_path, "old")
    old.write("draws", "x", 1, 0, np.ones((2, 5), np.float32))
    mapped = old.read("draws")["x"]
    old.close()
    new = FileStore(tmp_path, resume=True)  # no checkpoint says to reuse
    new.allocate("draws", "x", (2, 5), np.float32)
    new.write("draws", "x", 1, 0, np.zeros((2, 1), np.float32))
    assert new.token not in (None, "old") and new.record()["kind"] == "files"
    np.testing.assert_array_equal(mapped, np.ones((2, 5)))
    new.close()
