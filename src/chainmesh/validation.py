"""Checks of user input that need more than a type: data values, directories.

The data checks look at what the compiled program will receive (after the
cast to JAX's canonical dtypes), and never copy device-resident data to host.
"""

from __future__ import annotations

import numbers
import os
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_number_list(x: Any) -> bool:
    """A (nested) Python list of numbers, which NumPy turns into an array."""
    if not isinstance(x, list) or not x:
        return False
    return all(_is_number_list(v) or _is_number(v) for v in x)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def as_program_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Model arguments with Python lists of numbers turned into NumPy arrays.

    A list is otherwise a pytree of scalars, and ``x.shape`` fails inside the
    model; NumPy arrays are what a NumPyro user passes. Which arguments are
    data and which are static is decided later (``chainmesh.arguments``).
    """

    def to_leaf(x: Any) -> Any:
        return np.asarray(x) if _is_number_list(x) else x

    return jax.tree.map(to_leaf, (tuple(args), dict(kwargs)), is_leaf=_is_number_list)


def _name(path: tuple) -> str:
    """``args[1]`` or ``kwargs['y']`` for a path into ``(args, kwargs)``."""
    where = "args" if path[0].idx == 0 else "kwargs"
    return where + jax.tree_util.keystr(path[1:])


@jax.jit
def _nonfinite_counts(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(~jnp.isfinite(x)) for x in leaves]


def check_finite(args: tuple, kwargs: dict) -> None:
    """Refuse NaN/inf in floating-point model arguments, naming the argument.

    Host values are checked after the cast the program applies (``1e39`` in a
    float64 array is ``inf`` in float32); JAX arrays are checked where they
    live, by a small reduction, so their data never travel to the host.

    Raises:
        ValueError: Some argument holds a non-finite value.
    """
    device: list[tuple[Any, jax.Array]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                device.append((path, leaf))
            continue
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.inexact):
            continue
        with np.errstate(over="ignore"):
            arr = arr.astype(jax.dtypes.canonicalize_dtype(arr.dtype), copy=False)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            _raise_nonfinite(path, bad, leaf)
    if device:
        counts = _nonfinite_counts([x for _, x in device])
        for (path, _), count in zip(device, counts, strict=True):
            if int(count):
                _raise_nonfinite(path, int(count), None)


def _raise_nonfinite(path: tuple, bad: int, leaf: Any) -> None:
    cast = ""
    if leaf is not None and np.all(np.isfinite(np.asarray(leaf))):
        dtype = jax.dtypes.canonicalize_dtype(np.asarray(leaf).dtype)
        cast = f" after the cast to {dtype} (values too large for it)"
    raise ValueError(
        f"model argument {_name(path)} holds {bad} NaN/inf value(s){cast}; remove "
        "or impute them (or mask them in the model and pass check_data=False)"
    )


def check_directory(name: str, path: str | os.PathLike) -> Path:
    """Create ``path`` and prove files can be written there, naming the option.

    Raises:
        ValueError: The directory cannot be created or written.
    """
    directory = Path(path)
    probe = directory / f".write-test-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"chainmesh")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"{name} {str(directory)!r} cannot be written ({err.strerror or err}); "
            f"pass a directory you can write to as {name}="
        ) from None
    return directory
