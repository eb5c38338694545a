"""The disk cache of compiled programs: same draws, safe to share, self-healing."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as jax_cache
from jax._src import compiler
from models import linreg, linreg_data

import chainmesh as cm
from chainmesh import building, cachedir, persistent
from chainmesh.cache import COMPILE_LOCK

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


@pytest.mark.parametrize(
    "unsafe",
    [
        "group-writable",
        pytest.param("world-writable", marks=pytest.mark.slow),  # same check
        pytest.param("foreign", marks=pytest.mark.slow),
    ],
)
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
    cachedir._refused.clear()
    with pytest.warns(RuntimeWarning, match="does not use the compilation cache"):
        result = _run(cache)
    assert result.stats["compilations"] == 2
    assert result.stats["programs_from_disk"] == 0
    assert {f.name: f.read_bytes() for f in _entries(cache)} == before


@pytest.mark.slow  # 25 s: two processes
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
    keys = [f.name.removesuffix(persistent.SUFFIX) for f in _entries(cache)]
    with persistent.DiskCache(cache, persistent.max_bytes()) as disk:
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
    with persistent.DiskCache(tmp_path, limit=3 * 1100) as disk:
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
        fd = cachedir.checked(tmp_path / "new" / "deep", create=True)
    assert fd is not None
    os.close(fd)
    for folder in (tmp_path / "new", tmp_path / "new" / "deep"):
        assert folder.stat().st_mode & 0o777 == 0o700  # whatever the umask


@pytest.mark.parametrize(
    ("mode", "owner", "used"),
    [(0o777, None, False), (0o770, None, False), (0o1777, None, True)]
    + [(0o755, 65534, False), (0o755, 0, True)],
)
def test_every_folder_above_the_cache_is_checked(tmp_path, mode, owner, used):
    """A folder above that others can write (not sticky) or own is refused.

    Whoever can write to a folder above can rename the private cache folder
    away and put one of theirs in its place. Checked on the mode bits and
    owner (root passes every access check, so access is not what is tested).
    """
    if owner is not None and os.getuid() != 0:
        pytest.skip("only root can give a folder to another user")
    shared = tmp_path / "shared"
    cache = shared / "user" / "cache"
    cache.mkdir(mode=0o700, parents=True)
    (shared / "user").chmod(0o700)
    shared.chmod(mode)
    if owner is not None:
        os.chown(shared, owner, owner)
    cachedir._refused.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disk = persistent._open(cache)
    refusals = [str(w.message) for w in caught]
    assert (disk is not None) == used
    if used:
        disk.close()
        assert refusals == []
    else:
        assert (
            len(refusals) == 1 and "does not use the compilation cache" in refusals[0]
        )
        assert repr(str(shared)) in refusals[0]  # names the folder to fix
        with pytest.raises(cachedir.UnsafeError):
            persistent.DiskCache(cache, 10**6)


def test_a_folder_swapped_for_a_link_is_never_followed(tmp_path, monkeypatch):
    """Entries are read through the folder opened once, not through its path."""
    mine, theirs = tmp_path / "cache", tmp_path / "theirs"
    with persistent.DiskCache(theirs, 10**6) as other:
        other.put("k", b"planted")  # valid, checksummed: another user's program
    with persistent.DiskCache(mine, 10**6) as disk:
        disk.put("k", b"mine")
        mine.rename(tmp_path / "moved")
        mine.symlink_to(theirs)  # swapped after the folder was checked
        assert disk.get("k") == b"mine"
        disk.put("j", b"new")
    assert (tmp_path / "moved" / f"j{persistent.SUFFIX}").exists()
    assert not (theirs / f"j{persistent.SUFFIX}").exists()
    (tmp_path / "link").symlink_to(tmp_path)
    swapped = tmp_path / "link" / "moved"
    with monkeypatch.context() as patch:  # as if the link appeared after resolving
        patch.setattr(cachedir.os.path, "realpath", str)
        with pytest.raises(cachedir.UnsafeError, match="is a link or a file"):
            cachedir.open_dir(swapped, create=False)
    with persistent.DiskCache(swapped, 10**6) as disk:  # the user's own link
        assert disk.get("k") == b"mine"


@pytest.mark.parametrize("entry", ["link", "group-writable", "foreign"])
def test_an_entry_someone_else_could_write_is_deleted_unread(tmp_path, entry):
    outside = tmp_path / "outside"
    with persistent.DiskCache(outside, 10**6) as other:
        other.put("k", b"planted")
    cache = tmp_path / "cache"
    file = cache / f"k{persistent.SUFFIX}"
    with persistent.DiskCache(cache, 10**6) as disk:
        if entry == "link":
            file.symlink_to(outside / file.name)
        else:
            file.write_bytes((outside / file.name).read_bytes())
            if entry == "foreign":
                if os.getuid() != 0:
                    pytest.skip("only root can give a file to another user")
                os.chown(file, 65534, 65534)
            else:
                file.chmod(0o620)
        with pytest.warns(RuntimeWarning, match="unusable compilation cache entry"):
            assert disk.get("k") is None
    assert not file.exists() and not file.is_symlink()
    assert (outside / file.name).exists()  # a link's target is left alone


def _unloadable(entry: Path) -> None:
    """Rewrite ``entry`` as one that passes its checksum but does not load."""
    payload = jax_cache.compress_executable(
        jax_cache.combine_executable_and_time(b"not an executable", 1)
    )
    with persistent.DiskCache(entry.parent, 10**9) as disk:
        entry.unlink()
        disk.put(entry.name.removesuffix(persistent.SUFFIX), payload)


@pytest.mark.slow  # 15-17 s; the quick run keeps the other refusals
def test_an_entry_that_does_not_load_is_replaced(tmp_path):
    """One entry passes its checksum but does not load, one is a directory."""
    reference = _run(tmp_path)
    unloadable, folder = _entries(tmp_path)
    _unloadable(unloadable)
    folder.unlink()
    (folder / "inside").mkdir(parents=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        healed = _run(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert f"{unloadable} passed its checksum but did not load" in messages
    assert f"unusable compilation cache entry {folder}" in messages
    assert healed.stats["compilations"] == 2
    assert healed.stats["programs_from_disk"] == 0
    np.testing.assert_array_equal(healed.samples["beta"], reference.samples["beta"])
    assert _entries(tmp_path) == [unloadable, folder]
    assert unloadable.is_file() and folder.is_file()
    again = _run(tmp_path)  # the replaced entries load
    assert again.stats["programs_from_disk"] == 2
    assert again.stats["compilations"] == 0


def test_no_cap_and_bad_caps(tmp_path, monkeypatch):
    monkeypatch.setenv(persistent.ENV_MAX_MB, "inf")
    assert persistent.max_bytes() >= 2**62
    disk = persistent._open(tmp_path)  # used to raise OverflowError
    disk.put("k", b"x" * 1000)
    disk.close()
    assert persistent.disk_cache_size(tmp_path) > 1000
    monkeypatch.setenv(persistent.ENV_MAX_MB, "0.5")
    assert persistent.max_bytes() == 2**19
    monkeypatch.setenv(persistent.ENV_MAX_MB, "lots")
    with pytest.warns(RuntimeWarning, match="CHAINMESH_CACHE_MAX_MB='lots'"):
        assert persistent.max_bytes() == persistent.DEFAULT_MAX_MB * 2**20


def test_temporary_files_of_killed_writers_count_and_go(tmp_path):
    old, fresh = tmp_path / ".k0.11.aa.tmp", tmp_path / ".k1.12.bb.tmp"
    old.write_bytes(b"x" * 500)
    fresh.write_bytes(b"y" * 300)
    hours_ago = os.stat(old).st_mtime - 2 * persistent.STALE_TMP_S
    os.utime(old, (hours_ago, hours_ago))
    with persistent.DiskCache(tmp_path, limit=10**6) as disk:
        assert disk.size() == 800
        assert persistent.disk_cache_size(tmp_path) == 800
        disk.put("k2", b"z" * 100)  # writing evicts: the killed writer's file goes
        entry = (tmp_path / f"k2{persistent.SUFFIX}").stat().st_size
        assert not old.exists() and fresh.exists()  # a live writer's file stays
        assert disk.size() == 300 + entry
    assert persistent.clear_disk_cache(tmp_path) == 300 + entry
    assert not fresh.exists()


def test_xla_caches_stay_out_of_the_cache_folder(tmp_path, monkeypatch):
    """JAX would put XLA's GPU autotuning cache into chainmesh's folder.

    Checked in the compile options of chainmesh's compiles, in this thread and
    in the threads that compile side by side (``building.compile_all``).
    """
    seen = []
    get_compile_options = compiler.get_compile_options

    def spy(*args, **kwargs):
        options = get_compile_options(*args, **kwargs)
        debug = options.executable_build_options.debug_options
        if jax_cache.is_persistent_cache_enabled():
            autotune = debug.xla_gpu_per_fusion_autotune_cache_dir
            seen.append((autotune, debug.xla_gpu_kernel_cache_file))
        return options

    monkeypatch.setattr(compiler, "get_compile_options", spy)
    x = jnp.arange(3.0)
    with COMPILE_LOCK, persistent.active(tmp_path):
        lowered = [jax.jit(lambda x, k=k: x * k + 1).lower(x) for k in (2.0, 3.0)]
        compiled = building.compile_all(lowered)
        alone = jax.jit(lambda x: x - 4.0).lower(x).compile()
    np.testing.assert_array_equal(compiled[1](x), x * 3.0 + 1)
    np.testing.assert_array_equal(alone(x), x - 4.0)
    assert len(seen) >= 3
    assert set(seen) == {("", "")}
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in _entries(tmp_path)}
