"""The disk cache's folder, opened so that nobody else can swap what it holds.

Cache entries are native code the process will run, so a folder another user
can change is never used. Changing it does not need write access to the folder
itself: write access to any folder above it lets one rename it away and put
another in its place. So:

- the path is resolved once (the user's own symbolic links are followed
  there), then opened one folder at a time from ``/`` with ``O_NOFOLLOW``,
  each relative to the one above, so that a folder swapped for a link after
  the check fails to open instead of being followed;
- every folder on the way belongs to root or to the user and, unless its
  sticky bit is set (``/tmp``), is writable by neither group nor others; the
  cache folder itself belongs to the user and is writable by nobody else;
- entries are opened relative to the folder's descriptor without following
  links, and checked with ``fstat`` (a regular file of the user's, written by
  nobody else) before a byte of them is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import warnings
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a named pipe planted as an entry must not block the open.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_refused: set[str] = set()


class UnsafeError(Exception):
    """A folder or entry that someone else could have written; says why."""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _check_folder(fd: int, folder: Path, last: bool) -> None:
    info = os.fstat(fd)
    mode = oct(stat.S_IMODE(info.st_mode))
    if last and info.st_uid != _uid():
        raise UnsafeError(f"it belongs to another user (uid {info.st_uid})")
    if not last and info.st_uid not in (0, _uid()):
        raise UnsafeError(
            f"the folder {str(folder)!r} above it belongs to another user "
            f"(uid {info.st_uid}), who could replace it"
        )
    if last and info.st_mode & _OTHERS_WRITE:
        raise UnsafeError(f"other users can write to it (mode {mode})")
    if info.st_mode & _OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
        raise UnsafeError(
            f"other users can write to the folder {str(folder)!r} above it "
            f"(mode {mode}, no sticky bit), so they could replace it"
        )


def open_dir(path: Path, create: bool) -> int:
    """A descriptor of ``path`` after checking every folder from ``/`` down.

    Args:
        path: The cache folder.
        create: Create missing folders (mode 0700) instead of failing.

    Returns:
        A directory descriptor; the caller closes it.

    Raises:
        UnsafeError: A folder on the way someone else could change (or a
            folder swapped for a link while it was opened).
        OSError: Missing (``create=False``) or not readable.
    """
    real = Path(os.path.realpath(path))
    fd = os.open(real.anchor, _DIR)
    try:
        _check_folder(fd, Path(real.anchor), last=len(real.parts) == 1)
        for depth, name in enumerate(real.parts[1:], start=2):
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                child = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            _check_folder(fd, Path(*real.parts[:depth]), depth == len(real.parts))
    except OSError as err:
        os.close(fd)
        if isinstance(err, FileNotFoundError):
            raise
        if err.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or file on the way
            raise UnsafeError(
                f"a folder on its path is a link or a file, not a folder ({err})"
            ) from None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_entry(dir_fd: int, name: str) -> bytes:
    """The bytes of entry ``name``, after checking what it is and whose.

    Refreshes its modification time (the LRU clock).

    Raises:
        FileNotFoundError: No such entry.
        UnsafeError: A link, not a regular file, another user's, or writable
            by others.
    """
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise UnsafeError("it is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeError("it is not a regular file")
        if info.st_uid != _uid():
            raise UnsafeError(f"it belongs to another user (uid {info.st_uid})")
        if info.st_mode & _OTHERS_WRITE:
            mode = oct(stat.S_IMODE(info.st_mode))
            raise UnsafeError(f"other users can write to it (mode {mode})")
        data = file.read()
        with contextlib.suppress(OSError):
            os.utime(fd)
    return data


def write_entry(dir_fd: int, name: str, tmp: str, data: bytes) -> None:
    """Write ``data`` to ``tmp`` (mode 0600), then rename it over ``name``."""
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def remove(dir_fd: int, name: str) -> None:
    """Delete entry ``name`` whatever it is (a folder with what it holds)."""
    with contextlib.suppress(FileNotFoundError):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=dir_fd)
        except PermissionError:
            if not stat.S_ISDIR(
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            ):
                raise
            shutil.rmtree(name, dir_fd=dir_fd)


def listing(dir_fd: int) -> list[tuple[str, float, int]]:
    """``(name, modification time, size)`` of each plain file in the folder."""
    out = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    out.append((entry.name, info.st_mtime, info.st_size))
    return out


def checked(path: Path, create: bool) -> int | None:
    """``open_dir``, or None: missing (``create=False``) or refused with a warning.

    The warning comes once per path and process.
    """
    try:
        return open_dir(path, create)
    except FileNotFoundError:
        if create:
            _refuse(path, "it cannot be created")
        return None
    except UnsafeError as err:
        _refuse(path, str(err))
    except OSError as err:
        _refuse(path, f"it cannot be created or read ({err.strerror or err})")
    return None


def _refuse(path: Path, why: str) -> None:
    if str(path) not in _refused:
        _refused.add(str(path))
        warnings.warn(
            f"chainmesh does not use the compilation cache at {str(path)!r}: {why}, "
            "and its entries are code this process would run. Programs are "
            f"compiled as usual. Fix: `chmod 700 {path}` (and `chmod go-w` on "
            "the folders above it) if it is yours, or set CHAINMESH_CACHE_DIR "
            "(or Sampler(cache_dir=...)) to a private directory",
            RuntimeWarning,
            stacklevel=5,
        )
