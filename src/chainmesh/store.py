"""Where kept draws go on the host: memory, or ``.npy`` files on disk.

``FileStore`` preallocates one ``.npy`` file per site (``(chains, draws, ...)``)
and writes each chunk with positioned writes (``os.pwrite``) instead of a
writable memory map, so written pages belong to the page cache, not to the
process: host RSS stays flat however many draws are kept. The result reads the
files back lazily (read-only memory maps).

A new run never writes into files an earlier ``Result`` may still map: it
creates its files under temporary names and renames them over the old ones
(the old memory maps keep the old inodes). Only a run resumed from a
checkpoint reopens files, those of the run it continues, recognised by the
run token in ``store.json``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

META = "store.json"


class MemoryStore:
    """Draws in preallocated host arrays."""

    def __init__(self) -> None:
        self.arrays: dict[str, dict[str, np.ndarray]] = {"draws": {}, "extra": {}}

    def allocate(self, group: str, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Make room for one site (or extra field) of the whole run."""
        self.arrays[group][name] = np.zeros(shape, dtype=dtype)

    def write(
        self, group: str, name: str, lead: int, start: int, values: np.ndarray
    ) -> None:
        """Store draws ``start:start + n`` on axis ``lead`` (after chains)."""
        window = (slice(None),) * lead + (slice(start, start + values.shape[lead]),)
        self.arrays[group][name][window] = values

    def read(self, group: str) -> dict[str, np.ndarray]:
        """All arrays of a group."""
        return self.arrays[group]

    def flush(self) -> None:
        """Nothing to do in memory."""

    def kept(self, draws: int) -> None:
        """Nothing to record in memory (the result holds the draws kept)."""

    def record(self) -> dict[str, Any]:
        """For a checkpoint manifest: the draws are in the checkpoint."""
        return {"kind": "memory"}


class NullStore:
    """Keeps nothing: for processes that do not hold the draws (gather="main")."""

    def allocate(self, group: str, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Nothing to allocate."""

    def write(
        self, group: str, name: str, lead: int, start: int, values: np.ndarray
    ) -> None:
        """Drop the values."""

    def read(self, group: str) -> dict[str, np.ndarray]:
        """No arrays."""
        return {}

    def kept(self, draws: int) -> None:
        """Nothing is kept."""

    def flush(self) -> None:
        """Nothing to flush."""

    def record(self) -> dict[str, Any]:
        """For a checkpoint manifest: nothing is kept here."""
        return {"kind": "none"}


class FileStore:
    """Draws streamed into ``<path>/<group>/<name>.npy`` files.

    Files are created by ``open`` (``attach`` calls it when checkpointing;
    otherwise the first write does), not by ``allocate``: whether a run reuses
    the files already there depends on the checkpoint it resumes.

    Args:
        path: A directory (created if missing).
        resume: Kept for callers; files are reopened only when the checkpoint
            being resumed names this store's run token (``open(token, True)``).
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        self.token: str | None = None
        self._specs: dict[tuple[str, str], tuple[tuple[int, ...], np.dtype]] = {}
        self._files: dict[tuple[str, str], tuple[int, int]] = {}

    def _file(self, group: str, name: str) -> Path:
        return self.path / group / f"{name}.npy"

    def allocate(self, group: str, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Declare the file of one site; ``open`` creates or reopens it."""
        self._specs[(group, name)] = (tuple(int(n) for n in shape), np.dtype(dtype))

    def found_token(self) -> str | None:
        """The run token in ``store.json`` (None: no readable store there)."""
        try:
            return str(json.loads((self.path / META).read_text())["token"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def open(self, token: str | None = None, reuse: bool = False) -> None:
        """Create new files for run ``token``, or (``reuse``) reopen its files.

        Raises:
            ValueError: ``reuse``, but the directory holds another run's
                files, or files missing or of other shapes.
        """
        if self.token is not None:
            return
        token = token or secrets.token_hex(16)
        if reuse:
            self._reopen(token)
        else:
            self._create(token)
        self.token = token

    def _create(self, token: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        # The new token goes first: a crash halfway never lets the old run's
        # checkpoint resume into files that are (partly) new.
        _write_json(self.path / META, {"token": token, "files": self._listing()})
        for (group, name), (shape, dtype) in self._specs.items():
            file = self._file(group, name)
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
            with open(tmp, "xb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(dtype)}
                header.update({"fortran_order": False, "shape": shape})
                np.lib.format.write_array_header_1_0(f, header)
                offset = f.tell()
                f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
            fd = os.open(tmp, os.O_RDWR)
            os.replace(tmp, file)  # a memmap of the old file keeps its inode
            self._files[(group, name)] = (fd, offset)
        for directory in {self.path, *(self._file(*k).parent for k in self._specs)}:
            _fsync_dir(directory)

    def _reopen(self, token: str) -> None:
        found = self.found_token()
        if found != token:
            raise ValueError(
                f"cannot resume: store {str(self.path)!r} does not hold the draws "
                f"of the checkpointed run (run token {token}, found {found}); pass "
                "the store= directory that run used, or resume=False to start over"
            )
        for (group, name), (shape, dtype) in self._specs.items():
            file = self._file(group, name)
            try:
                with open(file, "rb") as f:
                    np.lib.format.read_magic(f)
                    found_shape, _, found_dtype = np.lib.format.read_array_header_1_0(f)
                    offset = f.tell()
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"cannot resume: store file {file} cannot be read ({err}); "
                    "restore it, or start over with resume=False"
                ) from None
            if tuple(found_shape) != shape or found_dtype != dtype:
                raise ValueError(
                    f"cannot resume: store file {file} holds {found_shape} "
                    f"{found_dtype}, this run needs {shape} {dtype}; restore it, "
                    "or start over with resume=False"
                )
            self._files[(group, name)] = (os.open(file, os.O_RDWR), offset)

    def _listing(self) -> dict[str, list]:
        return {
            f"{group}/{name}": [list(shape), dtype.str]
            for (group, name), (shape, dtype) in self._specs.items()
        }

    def record(self) -> dict[str, Any]:
        """For a checkpoint manifest: where the draws are, and the run token."""
        self.open()
        return {
            "kind": "files",
            "path": str(self.path.resolve()),
            "token": self.token,
            "files": self._listing(),
        }

    def write(
        self, group: str, name: str, lead: int, start: int, values: np.ndarray
    ) -> None:
        """Write draws ``start:start + n`` (axis ``lead``) of every chain."""
        self.open()
        fd, offset = self._files[(group, name)]
        shape, dtype = self._specs[(group, name)]
        values = np.ascontiguousarray(values, dtype=dtype)
        item = int(np.prod(shape[lead + 1 :], dtype=int)) * dtype.itemsize
        row = shape[lead] * item
        for flat, index in enumerate(np.ndindex(*shape[:lead])):
            where = offset + flat * row + start * item
            os.pwrite(fd, values[index].tobytes(), where)

    def read(self, group: str) -> dict[str, np.ndarray]:
        """The group's files as read-only memory maps."""
        self.open()
        return {
            name: np.load(self._file(g, name), mmap_mode="r")
            for (g, name) in self._specs
            if g == group
        }

    def kept(self, draws: int) -> None:
        """Record in ``store.json`` how many draws of each file are the run's.

        A run that stops on targets (``target_ess``) allocates its files for
        ``max_samples // thinning`` draws (sparse on disk: unwritten draws
        take no space) and keeps the first ``draws``.
        """
        self.open()
        _write_json(
            self.path / META,
            {"token": self.token, "files": self._listing(), "kept": draws},
        )

    def flush(self) -> None:
        """fsync every file (after a checkpoint, so disk and checkpoint agree)."""
        for fd, _ in self._files.values():
            os.fsync(fd)

    def close(self) -> None:
        """Close the file descriptors (``read`` still works)."""
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically under a name no other process uses."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "x") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
