"""Model arguments: which are data (traced) and which are part of the program.

Arrays and Python floats are data: arguments of the compiled program, so new
values run the cached executable. Everything else a NumPyro model may take
(Python ints and bools used as sizes or flags, strings, None, tuples of them,
configuration objects) is static: bound into the model, part of the program
cache key, so a new value compiles once. Arrays named in ``static_argnames``
(or found to be needed as values) are static too, keyed by their contents.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from chainmesh import identity


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """Where a static value sits in the data pytree (a leaf-free node)."""

    index: int


def is_data(leaf: Any) -> bool:
    """Arrays and Python floats/complex: traced program arguments."""
    if isinstance(leaf, bool):
        return False
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | float | complex)


def _key(value: Any) -> Any:
    """A hashable stand-in for a static value (contents, not identity)."""
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        return ("array", identity.array_digest(value))
    try:
        hash(value)
    except TypeError:
        return ("digest", identity.digest(value))
    if type(value).__hash__ is object.__hash__:  # identity hash: use contents
        return ("digest", identity.digest(value))
    return (type(value).__qualname__, value)


def canonical(model: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments that can be passed by name go by name.

    ``model(3)`` and ``model(dim=3)`` then look alike to the program cache.
    Positional-only parameters and ``*args`` stay positional (a call with
    ``*args`` values is left as it is).
    """
    try:
        signature = inspect.signature(model)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    params = signature.parameters
    if any(
        params[n].kind is inspect.Parameter.VAR_POSITIONAL and v
        for n, v in bound.arguments.items()
    ):
        return args, kwargs
    positional, named = [], {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return tuple(positional), named


def _positional_names(args: tuple) -> list[str]:
    """The display name of each positional argument left after ``canonical``."""
    return [f"args[{i}]" for i in range(len(args))]


@dataclasses.dataclass(frozen=True)
class Split:
    """Model arguments split into data and static values.

    Attributes:
        args, kwargs: The data pytree; static leaves replaced by ``Static``.
        values: The static values, by ``Static.index``.
        names: Display name of each static value (``dim``, ``args[1]``).
        key: Hashable description of the static values (for cache keys).
    """

    args: tuple
    kwargs: dict
    values: tuple
    names: tuple[str, ...]
    key: tuple


def split(
    model: Callable, args: tuple, kwargs: dict, static_names: Iterable[str] = ()
) -> Split:
    """Separate data from static values.

    Args:
        static_names: Argument names (parameter names, keyword names, or
            ``args[i]``) whose whole value is static, arrays included.
    """
    static_names = set(static_names)
    args, kwargs = canonical(model, args, kwargs)
    positional = _positional_names(args)
    values: list[Any] = []
    names: list[str] = []

    def visit(name: str, value: Any) -> Any:
        whole = name in static_names

        def leaf(path: Any, x: Any) -> Any:
            if whole or not is_data(x):
                values.append(np.asarray(x) if isinstance(x, jax.Array) else x)
                names.append(name + jax.tree_util.keystr(path))
                return Static(len(values) - 1)
            return x

        return jax.tree_util.tree_map_with_path(leaf, value)

    new_args = tuple(visit(n, a) for n, a in zip(positional, args, strict=True))
    new_kwargs = {k: visit(k, v) for k, v in kwargs.items()}
    key = tuple(zip(names, (_key(v) for v in values), strict=True))
    return Split(new_args, new_kwargs, tuple(values), tuple(names), key)


class BoundModel:
    """``model`` with its static values put back in place of ``Static`` markers.

    Equal (and hashing equal) for the same model and static values, so the
    program cache finds its programs again.
    """

    def __init__(self, model: Callable, values: tuple, key: tuple) -> None:
        self.model = model
        self.values = values
        self.key = key
        self.__name__ = getattr(model, "__name__", type(model).__name__)
        self.__qualname__ = getattr(model, "__qualname__", self.__name__)
        self.__module__ = getattr(model, "__module__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def fill(x: Any) -> Any:
            return self.values[x.index] if isinstance(x, Static) else x

        args, kwargs = jax.tree.map(
            fill, (args, kwargs), is_leaf=lambda x: isinstance(x, Static)
        )
        return self.model(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundModel)
            and other.model == self.model
            and other.key == self.key
        )

    def __hash__(self) -> int:
        return hash((self.model, self.key))


NEEDS_VALUE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""JAX's errors for Python code that needs the value of a traced array."""


def candidates(split_: Split) -> list[str]:
    """Names of the arguments that hold data (arrays), in order."""
    positional = _positional_names(split_.args)
    out = [
        n for n, a in zip(positional, split_.args, strict=True) if jax.tree.leaves(a)
    ]
    return out + [k for k, v in split_.kwargs.items() if jax.tree.leaves(v)]


def needs_value_error(model: Callable, err: Exception, tried: list[str]) -> TypeError:
    """The one message for a model that needs the value of a traced argument."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err)
    name = getattr(model, "__name__", "the model")
    which = f" (making {tried} static did not help)" if tried else ""
    return TypeError(
        f"{name} needs the value of a traced argument{which}: {first}. Model "
        "arguments that are arrays are data of the compiled program, their "
        "values unknown while it is built. Fixes: pass the values it needs as "
        "Python ints (sizes, counts) computed outside the model; or "
        "Sampler(..., static_argnames=('name',)) to compile the array's value "
        "into the program (a new value compiles again); or bind it with "
        "functools.partial(model, name=value)"
    )


def describable(tree: Any) -> Any:
    """``tree`` with every static value replaced by its stable description.

    For checkpoint manifests: arrays stay (they are digested by content),
    other values become JSON text without memory addresses.
    """
    return jax.tree.map(
        lambda x: x if is_data(x) else json.dumps(identity.describe(x)), tree
    )
