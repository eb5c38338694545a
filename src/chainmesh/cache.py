"""The process-wide cache of compiled programs and the keys it is looked up by."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
from jax._src import config as jax_config


def signature(tree: Any) -> tuple:
    """Hashable (structure, shapes, dtypes, weak types) of a pytree of arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    avals = tuple(
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
        for x in leaves
    )
    return treedef, avals


def program_key(
    model: Callable, config: Any, mesh: Any, plan: Any, data_signature: tuple
) -> tuple:
    """Everything a sampler's compiled programs depend on.

    The model, the config fields that enter the programs, the data's
    signature, the mesh (devices named by platform and id: ``cuda:0`` and
    ``cpu:0`` differ), the chain layout and every JAX setting that changes
    tracing (``trace_context``).
    """
    c = config
    static = (
        c.num_warmup,
        c.target_accept_prob,
        c.max_tree_depth,
        c.dense_mass,
        c.init_strategy,
        c.chunk,
        c.inner,
        c.lanes,
        c.kernel,
        c.adapt,
        c.metric,
    )
    devices = tuple((d.platform, d.id) for d in mesh.devices.flat)
    layout = (mesh.axis_names, mesh.devices.shape, devices)
    chains = (plan.total_chains, plan.chains_per_device)
    return (model, static, data_signature, layout, chains, trace_context())


def trace_context() -> tuple:
    """The JAX settings that change how a function traces (x64, PRNG, ...).

    JAX's own key for its jit caches where JAX exposes it, so a flag added to
    JAX is in the key too; otherwise the settings known to change tracing.
    """
    context = getattr(jax_config, "trace_context", None)
    if context is not None:
        return ("jax", context())
    names = (
        "jax_enable_x64",
        "jax_threefry_partitionable",
        "jax_default_matmul_precision",
        "jax_numpy_rank_promotion",
        "jax_numpy_dtype_promotion",
        "jax_default_prng_impl",
        "jax_softmax_custom_jvp",
        "jax_dynamic_shapes",
    )
    return ("flags", tuple(getattr(jax.config, n, None) for n in names))


class ProgramCache:
    """A small LRU of compiled programs, keyed by everything they depend on.

    Safe to use from several threads: its own lock guards the entries only
    (never a compile), so a warm lookup never waits for ``COMPILE_LOCK``.
    """

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The programs for ``key``, marked as recently used, or None."""
        with self._lock:
            programs = self._entries.get(key)
            if programs is not None:
                self._entries.move_to_end(key)
            return programs

    def put(self, key: Any, programs: Any) -> None:
        """Store ``programs``; drop the least recently used beyond ``maxsize``."""
        with self._lock:
            self._entries[key] = programs
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self, model: Callable | None = None) -> None:
        """Drop every entry, or only those of ``model``."""

        def model_of(key: Any) -> Any:  # a BoundModel wraps the user's model
            return getattr(key[0], "model", key[0])

        with self._lock:
            if model is None:
                self._entries.clear()
            for key in [k for k in self._entries if model_of(k) == model]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


CACHE = ProgramCache()
"""Process-wide cache shared by all samplers (so ``cm.sample`` is warm too)."""

COMPILE_LOCK = threading.RLock()
"""Held while a model is traced or a program compiled.

NumPyro's effect handlers live on one global stack, so two threads tracing
models at once corrupt each other's traces. Tracing and compilation hold this
lock (two threads asking for the same program compile it once); looking a
program up and running it do not, so warm calls from many threads run
concurrently, also while another thread compiles.
"""
