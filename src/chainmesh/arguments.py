"""A call's model arguments, canonicalized once where ``Sampler.run`` gets them.

Arrays and Python floats are data: arguments of the compiled program, so new
values run the cached executable. Everything else a NumPyro model may take
(Python ints and bools used as sizes or flags, strings, None, configuration
objects) is static: bound into the model and part of the program's key, so a
new value compiles once. Static values follow ``jax.jit``'s rule for static
arguments: they must be hashable, and they are compared by type and value
(``1``, ``1.0`` and ``True`` are different keys, and so are ``0.0`` and
``-0.0``). Arrays named in ``static_argnames`` (or found to be needed as
values) are copied and keyed by their whole content.

``record`` turns one call into a ``Call``: the model with its static values
bound, the traced leaves, the static part and its key, the arguments' names,
and (on demand) a digest of everything for checkpoints. The rest of the run
reads the record; nothing splits or digests the arguments again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Hashable, Iterable
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


def static_key(value: Any) -> Hashable:
    """The key of a static value: its type and value, arrays by content.

    Floats by their bits (``-0.0`` and ``0.0`` apart, ``nan`` equal to
    itself); the members of tuples and frozensets by type too, so
    ``frozenset({1})`` and ``frozenset({1.0})`` differ.

    Raises:
        TypeError: ``value`` is neither an array nor hashable.
    """
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        return ("array", identity.array_digest(value))
    if isinstance(value, float):
        return (type(value), value.hex())
    if isinstance(value, complex):
        return (type(value), value.real.hex(), value.imag.hex())
    if isinstance(value, tuple):
        return (type(value), tuple(static_key(x) for x in value))
    if isinstance(value, frozenset):
        return (type(value), frozenset(static_key(x) for x in value))
    hash(value)
    return (type(value), value)


def _kept(value: Any) -> Any:
    """A static value as the programs keep it: arrays copied, read-only."""
    if isinstance(value, jax.Array):
        return np.asarray(value)
    if isinstance(value, np.ndarray):
        copy = np.array(value, copy=True)
        copy.flags.writeable = False
        return copy
    return value


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


class BoundModel:
    """``model`` with its static values put back in place of ``Static`` markers.

    Equal (and hashing equal) for the same model and static key, so the
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


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One call's model arguments, canonicalized once.

    Attributes:
        model: The user's model with the static values bound: what is traced,
            and the model part of the program key.
        args, kwargs: The traced part: data leaves, with ``Static`` markers
            where static values sit.
        values: The static values (arrays copied), by ``Static.index``.
        names: Display name of each static value (``dim``, ``args[1]``).
        key: Hashable ``(name, static_key)`` of each static value.
        arguments: Name of every argument, in order (``y``, ``args[0]``).
        passed: ``(args, kwargs)`` as ``run`` received them.
        static_argnames: Arguments made static whole, arrays included.
    """

    model: BoundModel
    args: tuple
    kwargs: dict
    values: tuple
    names: tuple[str, ...]
    key: tuple
    arguments: tuple[str, ...]
    passed: tuple[tuple, dict]
    static_argnames: tuple[str, ...]

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the arguments' names, structure and contents.

        Static and traced values alike, so it does not depend on which are
        static: ``a=50`` and ``b=50`` differ, and so do ``mask=None`` and no
        ``mask``; a call by position and one by name agree.
        """
        return identity.tree_digest(canonical(self.model.model, *self.passed))

    def data_arguments(self) -> list[str]:
        """Names of the arguments that hold traced leaves, in order."""
        values = (*self.args, *self.kwargs.values())
        named = dict(zip(self.arguments, values, strict=True))
        return [n for n, v in named.items() if jax.tree.leaves(v)]

    def with_static(self, names: Iterable[str]) -> Call:
        """The same call with the arguments ``names`` static as well."""
        return record(self.model.model, *self.passed, (*self.static_argnames, *names))

    def dataset(self, k: int) -> Call:
        """The call for data set ``k`` of arguments stacked on a leading axis."""
        one = jax.tree.map(
            lambda x: x[k] if is_data(x) and np.ndim(x) else x, self.passed
        )
        return record(self.model.model, *one, self.static_argnames)


def record(
    model: Callable, args: tuple, kwargs: dict, static_argnames: Iterable[str] = ()
) -> Call:
    """Canonicalize ``model(*args, **kwargs)``: split data from static values.

    Args:
        static_argnames: Argument names (parameter names, keyword names, or
            ``args[i]``) whose whole value is static, arrays included.

    Raises:
        TypeError: A static value is neither an array nor hashable.
    """
    static_argnames = tuple(static_argnames)
    whole_static = set(static_argnames)
    positional, named = canonical(model, args, kwargs)
    arguments = (*(f"args[{i}]" for i in range(len(positional))), *named)
    values: list[Any] = []
    names: list[str] = []
    keys: list[Hashable] = []

    def visit(name: str, value: Any) -> Any:
        whole = name in whole_static

        def leaf(path: Any, x: Any) -> Any:
            if not whole and is_data(x):
                return x
            where = name + jax.tree_util.keystr(path)
            try:
                keys.append(static_key(x))
            except TypeError:
                raise unhashable_error(model, where, x) from None
            values.append(_kept(x))
            names.append(where)
            return Static(len(values) - 1)

        return jax.tree_util.tree_map_with_path(leaf, value)

    given = (*positional, *named.values())
    data = [visit(n, v) for n, v in zip(arguments, given, strict=True)]
    key = tuple(zip(names, keys, strict=True))
    return Call(
        model=BoundModel(model, tuple(values), key),
        args=tuple(data[: len(positional)]),
        kwargs=dict(zip(named, data[len(positional) :], strict=True)),
        values=tuple(values),
        names=tuple(names),
        key=key,
        arguments=arguments,
        passed=(tuple(args), dict(kwargs)),
        static_argnames=static_argnames,
    )


def unhashable_error(model: Callable, where: str, value: Any) -> TypeError:
    """The error for a static value that cannot be a program's key."""
    name = getattr(model, "__name__", "the model")
    argument = where.split("[", 1)[0] if not where.startswith("args[") else "name"
    return TypeError(
        f"model argument {where} of {name} is a {type(value).__name__}, which is "
        "neither an array nor hashable. Values that are not arrays or Python "
        "floats are static: compiled into the program and compared by value, "
        "which needs a hash (as jax.jit's static_argnames). Pass its numbers as "
        "arrays (a dict or NamedTuple of arrays is data), make it hashable (e.g. "
        "a frozen dataclass of Python values), or bind it to the model with "
        f"functools.partial(model, {argument}=value)"
    )


NEEDS_VALUE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""JAX's errors for Python code that needs the value of a traced array."""


def find_static(call: Call, err: Exception, batched: bool) -> list[str]:
    """The fewest data arguments whose values make the model traceable.

    Call while handling ``err`` (one of ``NEEDS_VALUE``), raised by tracing
    ``call.model``. The model is traced again with candidate arguments
    static; it counts as helped when the retry fails no more in the same way.

    Raises:
        ``err`` itself, with its traceback and a note, when no argument helps
        (the value is one the model samples or computes); ``TypeError``
        naming the fixes when arguments help but the call is batched (data
        sets differ, so their values cannot be compiled in).
    """
    from chainmesh.model import inspect_model

    trial = call.dataset(0) if batched else call
    todo = trial.data_arguments()

    def helps(names: list[str]) -> bool:
        static = trial.with_static(names)
        try:
            inspect_model(static.model, static.args, static.kwargs)
        except NEEDS_VALUE:
            return False
        except Exception:  # past the value it needed: another error, seen later
            return True
        return True

    found = next(([n] for n in todo if helps([n])), None)
    if found is None and len(todo) > 1 and helps(todo):
        found = list(todo)
        for name in todo:
            if helps([n for n in found if n != name]):
                found.remove(name)
    if found is None:
        tried = (
            f"making the data arguments {todo} static did not help: " if todo else ""
        )
        err.add_note(
            f"chainmesh: {tried}the model needs the value of something it samples "
            "or computes from sampled values while it is traced (e.g. Python `if` "
            "on a sampled value); use jnp.where or jax.lax.cond there"
        )
        raise err
    if batched:
        raise batched_values_error(call.model, err, found) from err
    return found


def batched_values_error(
    model: Callable, err: Exception, names: list[str]
) -> TypeError:
    """The error for a batched model that needs the values of data sets."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err)
    name = getattr(model, "__name__", "the model")
    return TypeError(
        f"{name} needs the values of {names} while it is traced: {first}. Every "
        "data set runs in one program, so their values cannot be compiled in. "
        "Compute what the model needs from them (e.g. a size, as a Python int) "
        "outside the model and pass that instead, or bind a value shared by "
        "every data set with functools.partial(model, name=value)"
    )
