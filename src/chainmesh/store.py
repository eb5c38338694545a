"""Where kept draws go on the host: memory, or ``.npy`` files on disk.

``FileStore`` preallocates one ``.npy`` file per site (``(chains, draws, ...)``)
and writes each chunk with positioned writes (``os.pwrite``) instead of a
writable memory map, so written pages belong to the page cache, not to the
process: host RSS stays flat however many draws are kept. The result reads the
files back lazily (read-only memory maps).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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

    def flush(self) -> None:
        """Nothing to flush."""


class FileStore:
    """Draws streamed into ``<path>/<group>/<name>.npy`` files.

    Args:
        path: A directory (created if missing); existing files of the same
            names are overwritten by a new run and reused by a resumed one.
        resume: Reopen existing files instead of creating them.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        self._files: dict[tuple[str, str], tuple[int, int, tuple, np.dtype]] = {}

    def _file(self, group: str, name: str) -> Path:
        return self.path / group / f"{name}.npy"

    def allocate(self, group: str, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Create (or, when resuming, reopen) the file of one site."""
        file = self._file(group, name)
        file.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(dtype)
        if not (self.resume and file.exists()):
            header = {"descr": np.lib.format.dtype_to_descr(dtype)}
            header.update({"fortran_order": False, "shape": tuple(shape)})
            with open(file, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                offset = f.tell()
                f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
        else:
            with open(file, "rb") as f:
                np.lib.format.read_magic(f)
                found, _, found_dtype = np.lib.format.read_array_header_1_0(f)
                offset = f.tell()
            if tuple(found) != tuple(shape) or found_dtype != dtype:
                raise ValueError(
                    f"store file {file} holds {found} {found_dtype}, this run needs "
                    f"{tuple(shape)} {dtype}; use a new store directory"
                )
        fd = os.open(file, os.O_RDWR)
        self._files[(group, name)] = (fd, offset, tuple(shape), dtype)

    def write(
        self, group: str, name: str, lead: int, start: int, values: np.ndarray
    ) -> None:
        """Write draws ``start:start + n`` (axis ``lead``) of every chain."""
        fd, offset, shape, dtype = self._files[(group, name)]
        values = np.ascontiguousarray(values, dtype=dtype)
        item = int(np.prod(shape[lead + 1 :], dtype=int)) * dtype.itemsize
        row = shape[lead] * item
        for flat, index in enumerate(np.ndindex(*shape[:lead])):
            where = offset + flat * row + start * item
            os.pwrite(fd, values[index].tobytes(), where)

    def read(self, group: str) -> dict[str, np.ndarray]:
        """The group's files as read-only memory maps."""
        return {
            name: np.load(self._file(g, name), mmap_mode="r")
            for (g, name) in self._files
            if g == group
        }

    def flush(self) -> None:
        """fsync every file (after a checkpoint, so disk and checkpoint agree)."""
        for fd, *_ in self._files.values():
            os.fsync(fd)

    def close(self) -> None:
        """Close the file descriptors."""
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()
