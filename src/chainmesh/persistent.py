"""The persistent compilation cache: compiled programs on disk, across processes.

A new process compiles chainmesh's programs again (seconds) unless it finds
them on disk. chainmesh plugs a cache of its own into JAX's persistent
compilation cache, only while it compiles its own programs:

- one file per program, written to a temporary name and renamed into place,
  so processes writing at once never expose half an entry;
- every entry carries a SHA-256 of its bytes: a corrupt or truncated entry is
  deleted with a warning and the program is compiled again, never loaded;
- entries are native code the process will run, so the directory is created
  private to the user (mode 0700) and a directory another user owns or can
  write to is refused with a warning (chainmesh then compiles as usual);
- the least recently used entries go once the directory passes its size cap.

Where: ``Sampler(..., cache_dir=...)``, else ``$CHAINMESH_CACHE_DIR``, else
``$XDG_CACHE_HOME/chainmesh/xla`` (``~/.cache/chainmesh/xla``). ``cache_dir=
False`` or an empty ``CHAINMESH_CACHE_DIR`` turns it off. The cap is
``$CHAINMESH_CACHE_MAX_MB`` (default 1024 MB); ``clear_disk_cache()`` or
deleting the directory empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jax._src import compilation_cache as _jax_cache
from jax._src import config as _jax_config
from jax._src.compilation_cache_interface import CacheInterface

ENV_DIR = "CHAINMESH_CACHE_DIR"
ENV_MAX_MB = "CHAINMESH_CACHE_MAX_MB"
DEFAULT_MAX_MB = 1024
SUFFIX = ".xla"
_MAGIC = b"chainmesh-xla-1\n"
_DIGEST = 32

_refused: set[str] = set()
_hits = [0]
_hits_lock = threading.Lock()


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/chainmesh/xla``, or ``~/.cache/chainmesh/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chainmesh" / "xla"


def resolve(cache_dir: Any = None) -> Path | None:
    """The cache directory a sampler uses, or None when the cache is off.

    Args:
        cache_dir: A path, ``False`` (off), or None: ``$CHAINMESH_CACHE_DIR``
            (empty: off) if set, else ``default_dir()``.
    """
    if cache_dir is False:
        return None
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if ENV_DIR in os.environ:
        value = os.environ[ENV_DIR].strip()
        return Path(value).expanduser() if value else None
    return default_dir()


def max_bytes() -> int:
    """The size cap in bytes (``$CHAINMESH_CACHE_MAX_MB``, default 1024 MB)."""
    value = os.environ.get(ENV_MAX_MB, "").strip()
    try:
        megabytes = float(value) if value else DEFAULT_MAX_MB
    except ValueError:
        megabytes = DEFAULT_MAX_MB
    return max(0, int(megabytes * 2**20))


def safe_dir(path: Path) -> bool:
    """Create ``path`` private to this user; False (with a warning) if unsafe.

    A directory owned by another user, or writable by group or others, could
    hold code planted by someone else: it is never used.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as err:
        return _refuse(path, f"it cannot be created or read ({err.strerror or err})")
    if not stat.S_ISDIR(info.st_mode):
        return _refuse(path, "it is not a directory")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return _refuse(path, f"it belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = oct(stat.S_IMODE(info.st_mode))
        return _refuse(path, f"other users can write to it (mode {mode})")
    return True


def _refuse(path: Path, why: str) -> bool:
    if str(path) not in _refused:
        _refused.add(str(path))
        warnings.warn(
            f"chainmesh does not use the compilation cache at {str(path)!r}: {why}, "
            "and its entries are code this process would run. Programs are "
            f"compiled as usual. Fix: `chmod 700 {path}` if it is yours, or set "
            f"{ENV_DIR} (or Sampler(cache_dir=...)) to a private directory",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


class DiskCache(CacheInterface):
    """JAX cache entries as checksummed files, written atomically, capped in size.

    Args:
        path: A directory that ``safe_dir`` accepted.
        limit: Size cap in bytes for all entries together.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self._path = Path(path)
        self.limit = limit

    def _file(self, key: str) -> Path:
        return self._path / f"{key}{SUFFIX}"

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None if missing or corrupt (then deleted)."""
        file = self._file(key)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            warnings.warn(
                f"chainmesh: unreadable compilation cache entry {file} "
                f"({err}); compiling again",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        head, digest = data[: len(_MAGIC)], data[len(_MAGIC) : len(_MAGIC) + _DIGEST]
        payload = data[len(_MAGIC) + _DIGEST :]
        if head != _MAGIC or hashlib.sha256(payload).digest() != digest:
            warnings.warn(
                f"chainmesh: corrupt compilation cache entry {file} (checksum "
                "mismatch); deleted, compiling again",
                RuntimeWarning,
                stacklevel=2,
            )
            with contextlib.suppress(OSError):
                file.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(file)  # the modification time is the LRU clock
        with _hits_lock:
            _hits[0] += 1
        return payload

    def put(self, key: str, value: bytes) -> None:
        """Write the entry atomically (temporary file, then rename)."""
        file = self._file(key)
        if file.exists() or len(value) > self.limit:
            return
        tmp = self._path / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        data = _MAGIC + hashlib.sha256(value).digest() + value
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, file)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            warnings.warn(
                f"chainmesh: could not write compilation cache entry {file} ({err})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.evict()

    def evict(self) -> None:
        """Delete least recently used entries until the cap holds."""
        entries = []
        for file in self._path.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                info = file.stat()
                entries.append((info.st_mtime, info.st_size, file))
        total = sum(size for _, size, _ in entries)
        for _, size, file in sorted(entries):
            if total <= self.limit:
                break
            with contextlib.suppress(OSError):
                file.unlink()
            total -= size

    def size(self) -> int:
        """Bytes of all entries."""
        return sum(f.stat().st_size for f in self._path.glob(f"*{SUFFIX}"))


def _open(cache_dir: Any) -> DiskCache | None:
    path = resolve(cache_dir)
    if path is None or not safe_dir(path):
        return None
    return DiskCache(path, max_bytes())


_current: list[DiskCache | None] = [None]


@contextlib.contextmanager
def _settings(cache: DiskCache) -> Iterator[None]:
    """JAX's (thread-local) settings that send every program to ``cache``."""
    with (
        _jax_config.compilation_cache_dir(str(cache._path)),
        _jax_config.persistent_cache_min_compile_time_secs(0.0),
        _jax_config.persistent_cache_min_entry_size_bytes(-1),
    ):
        yield


@contextlib.contextmanager
def active(cache_dir: Any) -> Iterator[None]:
    """Compile inside this block with chainmesh's disk cache (or none if off).

    Hold ``chainmesh.cache.COMPILE_LOCK`` around it: it swaps JAX's process-wide
    cache object for the block and puts the previous one back afterwards, so
    JAX compilations outside chainmesh are left as the user configured them.
    Threads that compile for the block enter ``inherit()``.
    """
    cache = _open(cache_dir)
    if cache is None:
        yield
        return
    saved = (_jax_cache._cache, _jax_cache._cache_initialized, _current[0])
    _jax_cache._cache, _jax_cache._cache_initialized = cache, True
    _current[0] = cache
    try:
        with _settings(cache):
            yield
    finally:
        _jax_cache._cache, _jax_cache._cache_initialized, _current[0] = saved


@contextlib.contextmanager
def inherit() -> Iterator[None]:
    """In a worker thread: the settings of the ``active`` block that started it.

    JAX's settings are thread-local, so a compile in another thread would
    otherwise skip writing programs that compiled in under a second.
    """
    cache = _current[0]
    if cache is None:
        yield
        return
    with _settings(cache):
        yield


def hits() -> int:
    """Entries loaded from disk so far in this process (for ``stats``)."""
    return _hits[0]


def clear_disk_cache(cache_dir: Any = None) -> int:
    """Delete every entry of the disk cache; returns the bytes freed.

    Args:
        cache_dir: As for ``Sampler``; None is the default directory.
    """
    path = resolve(cache_dir)
    if path is None or not path.is_dir():
        return 0
    freed = 0
    for file in [*path.glob(f"*{SUFFIX}"), *path.glob(".*.tmp")]:
        with contextlib.suppress(OSError):
            size = file.stat().st_size
            file.unlink()
            freed += size
    return freed


def disk_cache_size(cache_dir: Any = None) -> int:
    """Bytes the disk cache holds now."""
    path = resolve(cache_dir)
    if path is None or not path.is_dir():
        return 0
    return DiskCache(path, max_bytes()).size()
