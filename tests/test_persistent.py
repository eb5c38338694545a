"""The disk cache of compiled programs: same draws, safe to share, self-healing."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from models import linreg, linreg_data

import chainmesh as cm
from chainmesh import persistent

X, Y = linreg_data()
CONFIG = {
    "num_chains": 4,
    "devices": 2,
    "num_warmup": 50,
    "num_samples": 50,
    "progress_bar": False,
}
CHILD = """
import sys
sys.path.insert(0, {tests!r})
import chainmesh as cm
import numpy as np
from models import linreg, linreg_data
X, Y = linreg_data()
result = cm.Sampler(linreg, cache_dir=sys.argv[1], **{config!r}).run(0, X, Y)
np.save(sys.argv[2], result.samples["beta"])
print(result.stats["compilations"], result.stats["programs_from_disk"])
"""


def _run(cache_dir):
    cm.clear_cache()  # in-memory programs gone: as in a new process
    return cm.Sampler(linreg, cache_dir=cache_dir, **CONFIG).run(0, X, Y)


def _entries(path: Path) -> list[Path]:
    return sorted(path.glob(f"*{persistent.SUFFIX}"))


def test_loaded_programs_draw_the_same_numbers(tmp_path):
    off = _run(False)
    first = _run(tmp_path)
    assert first.stats["compilations"] == 2 and first.stats["programs_from_disk"] == 0
    assert len(_entries(tmp_path)) == 2
    assert (tmp_path.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in _entries(tmp_path))
    second = _run(tmp_path)
    assert second.stats["compilations"] == 0
    assert second.stats["programs_from_disk"] == 2
    for result in (first, second):
        np.testing.assert_array_equal(result.samples["beta"], off.samples["beta"])
    assert off.stats["programs_from_disk"] == 0


def test_a_corrupt_entry_costs_a_compile_and_a_warning(tmp_path):
    reference = _run(tmp_path)
    for entry in _entries(tmp_path):
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte
        entry.write_bytes(bytes(data[: len(data) - 7]))  # and truncated
    with pytest.warns(RuntimeWarning, match="corrupt compilation cache entry"):
        healed = _run(tmp_path)
    assert healed.stats["compilations"] == 2
    np.testing.assert_array_equal(healed.samples["beta"], reference.samples["beta"])
    again = _run(tmp_path)  # the rewritten entries load
    assert again.stats["programs_from_disk"] == 2


@pytest.mark.parametrize("unsafe", ["group-writable", "world-writable", "foreign"])
def test_a_directory_others_control_is_never_used(tmp_path, unsafe):
    cache = tmp_path / "cache"
    _run(cache)  # two valid entries
    before = {f.name: f.read_bytes() for f in _entries(cache)}
    if unsafe == "foreign":
        if os.getuid() != 0:
            pytest.skip("only root can give a directory to another user")
        os.chown(cache, 65534, 65534)
    else:
        cache.chmod(0o770 if unsafe == "group-writable" else 0o777)
    persistent._refused.clear()
    with pytest.warns(RuntimeWarning, match="does not use the compilation cache"):
        result = _run(cache)
    assert result.stats["compilations"] == 2
    assert result.stats["programs_from_disk"] == 0
    assert {f.name: f.read_bytes() for f in _entries(cache)} == before


def test_concurrent_processes_share_one_directory(tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "child.py"
    tests = str(Path(__file__).parent)
    script.write_text(CHILD.format(tests=tests, config=CONFIG))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), str(tmp_path / f"{i}.npy")],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [c.communicate(timeout=600)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0, 0], outputs
    draws = [np.load(tmp_path / f"{i}.npy") for i in range(3)]
    for d in draws[1:]:
        np.testing.assert_array_equal(d, draws[0])
    assert not list(cache.glob(".*.tmp"))  # nothing half written is left
    disk = persistent.DiskCache(cache, persistent.max_bytes())
    keys = [f.name.removesuffix(persistent.SUFFIX) for f in _entries(cache)]
    assert len(keys) == 2 and all(disk.get(k) is not None for k in keys)
    late = subprocess.run(
        [sys.executable, str(script), str(cache), str(tmp_path / "late.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert late.stdout.split() == ["0", "2"]  # a later process compiles nothing


def test_least_recently_used_entries_go_past_the_cap(tmp_path):
    disk = persistent.DiskCache(tmp_path, limit=3 * 1100)
    for i in range(5):
        disk.put(f"k{i}", bytes([i]) * 1000)
        os.utime(tmp_path / f"k{i}{persistent.SUFFIX}", (i, i))
        disk.evict()
    assert disk.get("k0") is None and disk.get("k1") is None
    assert disk.get("k4") == bytes([4]) * 1000
    size = disk.size()
    assert 0 < size <= 3 * 1100
    assert persistent.disk_cache_size(tmp_path) == size
    assert persistent.clear_disk_cache(tmp_path) == size
    assert persistent.disk_cache_size(tmp_path) == 0


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv(persistent.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert persistent.resolve() == tmp_path / "chainmesh" / "xla"
    assert persistent.resolve(False) is None
    assert persistent.resolve(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(persistent.ENV_DIR, "")
    assert persistent.resolve() is None  # an empty variable turns it off
    monkeypatch.setenv(persistent.ENV_DIR, str(tmp_path / "y"))
    assert persistent.resolve() == tmp_path / "y"
    with pytest.raises(TypeError, match="cache_dir must be"):
        cm.Sampler(linreg, cache_dir=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert persistent.safe_dir(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").stat().st_mode & 0o777 == 0o700
