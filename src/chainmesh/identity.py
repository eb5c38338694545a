"""Stable identities of models and init strategies, for checkpoint manifests.

A checkpoint may only be resumed by the same computation. ``repr`` cannot say
so: it holds memory addresses (another process never matches) and ignores a
function's body (an edited model matches). ``describe`` turns a value into
JSON that is the same in every process for the same code and constants:
functions by qualified name plus a digest of their code, classes by name and
the code of their methods, other objects by class and attributes (``__dict__``
and ``__slots__``; a repr only for objects without either),
``functools.partial`` by function and arguments, arrays by a digest of their
bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import types
from typing import Any

import numpy as np

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN = (bool, int, str, type(None))


def name(value: Any) -> str:
    """``module.qualname`` of a function or class (of its type otherwise)."""
    target = value if hasattr(value, "__qualname__") else type(value)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"


def array_digest(value: Any) -> str:
    """SHA-256 of an array's shape, dtype and bytes."""
    arr = np.asarray(value)
    h = hashlib.sha256(f"{arr.shape}{arr.dtype.str}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def digest(value: Any) -> str:
    """SHA-256 of ``describe(value)``."""
    text = json.dumps(describe(value), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(fn: Any) -> dict[str, str]:
    """A callable's name and the digest of its code, for a manifest."""
    return {"name": name(fn), "digest": digest(fn)}


def describe(value: Any, _seen: frozenset[int] = frozenset()) -> Any:
    """A JSON value equal across processes iff the code and constants are.

    Args:
        value: A function, ``functools.partial``, array, container or object.

    Returns:
        Nested lists, dicts, strings and numbers; no memory addresses.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, float):
        return ["float", repr(value)]  # keeps nan, inf and -0.0 apart
    if id(value) in _seen:
        return ["cycle", name(value)]
    seen = _seen | {id(value)}
    if isinstance(value, bytes):
        return ["bytes", hashlib.sha256(value).hexdigest()]
    if isinstance(value, np.ndarray | np.generic):
        return ["array", array_digest(value)]
    if _is_jax_array(value):
        if not value.is_fully_addressable:  # spans processes: no bytes here
            return ["global array", list(value.shape), str(value.dtype)]
        return ["array", array_digest(value)]
    if isinstance(value, functools.partial):
        return [
            "partial",
            describe(value.func, seen),
            [describe(a, seen) for a in value.args],
            {k: describe(v, seen) for k, v in value.keywords.items()},
        ]
    if isinstance(value, types.FunctionType):
        return ["function", name(value), _function(value, seen)]
    if isinstance(value, types.MethodType):
        return [
            "method",
            describe(value.__func__, seen),
            describe(value.__self__, seen),
        ]
    if isinstance(value, types.CodeType):
        return ["code", _code(value)]
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__]
    if isinstance(value, type) and value.__module__ != "builtins":
        return ["class", name(value), _class(value, seen)]
    if isinstance(value, type | types.BuiltinFunctionType):
        return ["name", name(value)]
    if isinstance(value, list | tuple | set | frozenset):
        items = [describe(x, seen) for x in value]
        if isinstance(value, set | frozenset):
            items = sorted(items, key=json.dumps)
        return [name(value), items]
    if isinstance(value, dict):
        items = [[describe(k, seen), describe(v, seen)] for k, v in value.items()]
        return [name(value), sorted(items, key=json.dumps)]
    state = _state(value)
    if state is not None:  # by content and code, never by a repr
        return ["object", describe(type(value), seen), describe(state, seen)]
    try:
        text = _ADDRESS.sub("", repr(value))
    except Exception:  # a broken __repr__ must not stop a checkpointed run
        text = "?"
    return ["repr", name(value), text]


def tree_digest(tree: Any) -> str:
    """SHA-256 of a pytree's structure (names, None entries) and its leaves."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    structure = _ADDRESS.sub("", str(treedef))
    described = [[jax.tree_util.keystr(p), describe(x)] for p, x in leaves]
    return digest([structure, described])


def _state(value: Any) -> dict[str, Any] | None:
    """An object's attributes (``__dict__`` and ``__slots__``), or None."""
    state = getattr(value, "__dict__", None)
    state = dict(state) if isinstance(state, dict) else None
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                state = state or {}
                state[f"{cls.__qualname__}.{slot}"] = getattr(value, slot)
    return state


def _class(cls: type, seen: frozenset[int]) -> str:
    """Digest of a class's code: its methods and plain constants, and its bases'."""
    parts = []
    for base in cls.__mro__:
        if base.__module__ == "builtins":
            continue
        for key, attr in sorted(vars(base).items()):
            if isinstance(attr, staticmethod | classmethod):
                attr = attr.__func__
            if isinstance(attr, property):
                attr = [attr.fget, attr.fset, attr.fdel]
            elif not isinstance(attr, (types.FunctionType, *_PLAIN, float, tuple)):
                continue
            if key not in ("__module__", "__qualname__", "__doc__"):
                parts.append([name(base), key, describe(attr, seen)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _is_jax_array(value: Any) -> bool:
    import jax

    return isinstance(value, jax.Array)


def _function(fn: types.FunctionType, seen: frozenset[int]) -> str:
    """Digest of a function's code, defaults and closure cell values."""
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(describe(cell.cell_contents, seen))
        except ValueError:  # an empty cell (a name assigned later)
            cells.append(["empty"])
    parts = [
        _code(fn.__code__),
        describe(fn.__defaults__, seen),
        describe(fn.__kwdefaults__, seen),
        cells,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _code(code: types.CodeType) -> str:
    """Digest of bytecode, constants (nested code too) and names; no line numbers."""
    consts = [
        ["code", _code(c)] if isinstance(c, types.CodeType) else describe(c)
        for c in code.co_consts
    ]
    parts = [
        code.co_code.hex(),
        consts,
        list(code.co_names),
        list(code.co_varnames),
        list(code.co_freevars),
        list(code.co_cellvars),
        code.co_argcount,
        code.co_kwonlyargcount,
        code.co_flags,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
