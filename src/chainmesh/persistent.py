"""The persistent compilation cache: compiled programs on disk, across processes.

A new process compiles chainmesh's programs again (seconds) unless it finds
them on disk. chainmesh plugs a cache of its own into JAX's persistent
compilation cache, only while it compiles its own programs:

- one file per program, written to a temporary name and renamed into place,
  so processes writing at once never expose half an entry;
- every entry carries a SHA-256 of its bytes: a corrupt or truncated entry is
  deleted with a warning and the program is compiled again, never loaded;
- entries are native code the process will run, so the directory is created
  private to the user (mode 0700), and a directory that another user owns or
  could write to or replace is refused with a warning (chainmesh then compiles
  as usual); it is opened once and every entry is opened relative to it and
  checked before it is used (``chainmesh.cachedir``);
- an entry that passes its checksum but does not load (written on a machine
  with another CPU, say) is deleted with a warning and compiled again, and is
  not counted in ``programs_from_disk``;
- the least recently used entries go once the directory passes its size cap;
  temporary files that killed writers left count toward it and go after an
  hour;
- JAX's own XLA caches (GPU autotuning results, kernels), which JAX would
  otherwise write into this directory outside its cap and checks, are off
  while chainmesh compiles.

Where: ``Sampler(..., cache_dir=...)``, else ``$CHAINMESH_CACHE_DIR``, else
``$XDG_CACHE_HOME/chainmesh/xla`` (``~/.cache/chainmesh/xla``). ``cache_dir=
False`` or an empty ``CHAINMESH_CACHE_DIR`` turns it off. The cap is
``$CHAINMESH_CACHE_MAX_MB`` (default 1024 MB, ``inf``: none); ``clear_disk_cache()`` or
deleting the directory empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax._src import compilation_cache as _jax_cache
from jax._src import config as _jax_config
from jax._src.compilation_cache_interface import CacheInterface

from chainmesh import cachedir

ENV_DIR = "CHAINMESH_CACHE_DIR"
ENV_MAX_MB = "CHAINMESH_CACHE_MAX_MB"
DEFAULT_MAX_MB = 1024
SUFFIX = ".xla"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0
"""A temporary file this old belongs to a writer that was killed."""
_MAGIC = b"chainmesh-xla-1\n"
_DIGEST = 32
_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_hits = [0]
_hits_lock = threading.Lock()
_loading = threading.local()
"""In a compile block (``_settings``): ``cache``, and ``key``, the entry this
thread handed to JAX that JAX has not yet loaded (or None)."""


def _on_event(event: str, **kwargs: Any) -> None:
    # JAX records a cache hit only once the entry's executable has loaded.
    if event == _HIT_EVENT and getattr(_loading, "key", None) is not None:
        _loading.key = None
        with _hits_lock:
            _hits[0] += 1


jax.monitoring.register_event_listener(_on_event)


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
    """The size cap in bytes (``$CHAINMESH_CACHE_MAX_MB``, default 1024 MB).

    ``inf`` means no cap; a value that is not a number warns and uses the
    default.
    """
    value = os.environ.get(ENV_MAX_MB, "").strip()
    try:
        megabytes = float(value) if value else DEFAULT_MAX_MB
    except ValueError:
        megabytes = math.nan
    if math.isnan(megabytes):
        warnings.warn(
            f"{ENV_MAX_MB}={value!r} is not a number of megabytes; using "
            f"{DEFAULT_MAX_MB}. Set it to a number, or inf for no cap",
            RuntimeWarning,
            stacklevel=2,
        )
        megabytes = DEFAULT_MAX_MB
    return max(0, int(min(megabytes * 2**20, sys.maxsize)))


def _warn(message: str) -> None:
    warnings.warn(f"chainmesh: {message}", RuntimeWarning, stacklevel=4)


class DiskCache(CacheInterface):
    """JAX cache entries as checksummed files, written atomically, capped in size.

    The directory is opened once, when the cache is made (``cachedir``); close
    the cache (or use it in a ``with`` block) to let go of it.

    Args:
        path: The cache directory; created private to the user if missing.
        limit: Size cap in bytes for all entries together.
        fd: ``path`` already opened by ``cachedir.open_dir``, if it was.

    Raises:
        cachedir.UnsafeError: Another user could change the directory.
    """

    def __init__(self, path: Path, limit: int, fd: int | None = None) -> None:
        self._path = Path(path)
        self.limit = limit
        self._fd = cachedir.open_dir(self._path, create=True) if fd is None else fd

    def close(self) -> None:
        """Let go of the directory."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delete(self, name: str) -> None:
        with contextlib.suppress(OSError):
            cachedir.remove(self._fd, name)

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None if missing or unusable (then deleted)."""
        name = f"{key}{SUFFIX}"
        try:
            data = cachedir.read_entry(self._fd, name)
        except FileNotFoundError:
            return None
        except (OSError, cachedir.UnsafeError) as err:
            _warn(
                f"unusable compilation cache entry {self._path / name} ({err}); "
                "deleted, compiling again"
            )
            self._delete(name)
            return None
        head, digest = data[: len(_MAGIC)], data[len(_MAGIC) : len(_MAGIC) + _DIGEST]
        payload = data[len(_MAGIC) + _DIGEST :]
        if head != _MAGIC or hashlib.sha256(payload).digest() != digest:
            _warn(
                f"corrupt compilation cache entry {self._path / name} (checksum "
                "mismatch); deleted, compiling again"
            )
            self._delete(name)
            return None
        if getattr(_loading, "cache", None) is self:
            _loading.key = key  # a hit once JAX says it loaded
        return payload

    def did_not_load(self, key: str, replaced: bool) -> None:
        """Warn that entry ``key`` passed its checksum but JAX could not load it."""
        name = f"{key}{SUFFIX}"
        if not replaced:
            self._delete(name)
        _warn(
            f"compilation cache entry {self._path / name} passed its checksum but "
            "did not load (written by another JAX or XLA version, or on a machine "
            "with another CPU?); "
            + ("replaced by the program compiled now" if replaced else "deleted")
        )

    def put(self, key: str, value: bytes) -> None:
        """Write the entry atomically (temporary file, then rename over any old one)."""
        failed = getattr(_loading, "cache", None) is self and _loading.key == key
        if failed:  # JAX read it, could not load it, compiled the program again
            _loading.key = None
        if len(value) > self.limit:
            if failed:
                self.did_not_load(key, replaced=False)
            return
        name = f"{key}{SUFFIX}"
        tmp = f".{key}.{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        data = _MAGIC + hashlib.sha256(value).digest() + value
        try:
            cachedir.write_entry(self._fd, name, tmp, data)
        except OSError as err:
            if failed:
                self.did_not_load(key, replaced=False)
            _warn(
                f"could not write compilation cache entry {self._path / name} ({err})"
            )
            return
        if failed:
            self.did_not_load(key, replaced=True)
        self.evict()

    def evict(self) -> None:
        """Delete stale temporary files, then the least recently used entries."""
        now, entries, total = time.time(), [], 0
        for name, mtime, size in cachedir.listing(self._fd):
            if name.endswith(SUFFIX):
                entries.append((mtime, size, name))
            elif not _is_tmp(name):
                continue
            elif now - mtime > STALE_TMP_S:
                self._delete(name)
                continue
            total += size
        for _, size, name in sorted(entries):
            if total <= self.limit:
                break
            self._delete(name)
            total -= size

    def size(self) -> int:
        """Bytes of all entries and temporary files."""
        return _bytes(self._fd)


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _bytes(fd: int) -> int:
    listed = cachedir.listing(fd)
    return sum(
        size for name, _, size in listed if name.endswith(SUFFIX) or _is_tmp(name)
    )


def _open(cache_dir: Any) -> DiskCache | None:
    path = resolve(cache_dir)
    fd = None if path is None else cachedir.checked(path, create=True)
    return None if fd is None else DiskCache(path, max_bytes(), fd)


_current: list[DiskCache | None] = [None]


@contextlib.contextmanager
def _settings(cache: DiskCache) -> Iterator[None]:
    """JAX's (thread-local) settings that send every program to ``cache``.

    JAX would also put XLA's own caches (GPU autotuning results, kernels) in
    the directory, outside chainmesh's cap, checksums and ``clear_disk_cache``:
    they are off.
    """
    outer = getattr(_loading, "cache", None), getattr(_loading, "key", None)
    _loading.cache, _loading.key = cache, None
    try:
        with (
            _jax_config.compilation_cache_dir(str(cache._path)),
            _jax_config.persistent_cache_min_compile_time_secs(0.0),
            _jax_config.persistent_cache_min_entry_size_bytes(-1),
            _jax_config.persistent_cache_enable_xla_caches("none"),
        ):
            yield
        if _loading.key is not None:  # read, neither loaded nor written again
            cache.did_not_load(_loading.key, replaced=False)
    finally:
        _loading.cache, _loading.key = outer


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
        cache.close()


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
    fd = None if path is None else cachedir.checked(path, create=False)
    if fd is None:
        return 0
    try:
        sizes = {name: size for name, _, size in cachedir.listing(fd)}
        freed = 0
        for name in os.listdir(fd):
            if name.endswith(SUFFIX) or _is_tmp(name):
                with contextlib.suppress(OSError):
                    cachedir.remove(fd, name)
                    freed += sizes.get(name, 0)
        return freed
    finally:
        os.close(fd)


def disk_cache_size(cache_dir: Any = None) -> int:
    """Bytes the disk cache holds now (entries and temporary files)."""
    path = resolve(cache_dir)
    fd = None if path is None else cachedir.checked(path, create=False)
    if fd is None:
        return 0
    try:
        return _bytes(fd)
    finally:
        os.close(fd)
