"""A drop-in for "CMC backend" objects that loop over devices calling ``MCMC.run``.

Codes such as XPCS pipelines run NUTS through a small backend object:
``backend.run(model, config, rng_key, init_params) -> flat draws``. The usual
multi-device implementation splits chains floor + remainder over devices and
calls NumPyro's ``MCMC.run`` once per device, in turn. ``ShardedBackend``
keeps that interface and runs all chains as one SPMD program (``Sampler``)::

    backend = ShardedBackend()
    flat = backend.run(model, CMCConfig(num_chains=8), 0, model_args=(y,))
    flat["mu"].shape                            # (8000,): chains * samples
    backend.get_samples()["mu"].shape           # (8, 1000): chain axis kept
    backend.get_extra_fields()["diverging"].shape  # (8, 1000)

The old backend's defects and how each is fixed are listed in docs/backends.md.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from chainmesh.cache import CACHE
from chainmesh.config import SamplerConfig
from chainmesh.kernels.base import EXTRA_FIELDS
from chainmesh.mesh import resolve_devices
from chainmesh.result import Result
from chainmesh.sampler import Sampler

BYTES_PER_NUMBER = 8
"""Every number is counted as 8 bytes (float64/int64), an upper bound."""

MAX_SAMPLERS = CACHE.maxsize
"""Samplers a backend keeps, least recently used dropped first."""

NUM_EXTRA_FIELDS = len(EXTRA_FIELDS) + 1
"""Per-draw extra fields stored with the draws, ``tree_depth`` included (7)."""


@dataclasses.dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do.

    Attributes:
        supports_sharding: Chains of one run are spread over several devices.
        supports_parallel_chains: Chains run at the same time, not in turn.
        max_parallel_shards: Devices a run's chains are spread over.
    """

    supports_sharding: bool
    supports_parallel_chains: bool
    max_parallel_shards: int


@dataclasses.dataclass(frozen=True)
class CMCConfig:
    """The sampler settings a backend reads; any object with these attributes works.

    Values are checked like ``chainmesh.SamplerConfig`` (errors name the field).

    Args:
        num_chains: Chains returned.
        num_warmup: Adaptation transitions per chain.
        num_samples: Draws kept per chain.
        target_accept_prob: Step-size adaptation target in (0, 1).
        max_tree_depth: Maximum NUTS tree depth.
        dense_mass: Adapt a dense mass matrix instead of a diagonal one.
        init_strategy: ``"init_to_median"``, ``"init_to_sample"``,
            ``"init_to_value"`` (values from ``init_params``),
            ``"init_to_uniform"`` or a NumPyro init function.
    """

    num_chains: int = 4
    num_warmup: int = 500
    num_samples: int = 1000
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    init_strategy: str | Callable[..., Any] = "init_to_median"

    def __post_init__(self) -> None:
        SamplerConfig(**self.sampler_options())

    def sampler_options(self) -> dict[str, Any]:
        """The settings as ``Sampler`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CMCConfig))
"""Attributes a backend reads from ``config``."""


def as_config(config: Any) -> CMCConfig:
    """Read the settings of a duck-typed ``config`` into a validated ``CMCConfig``.

    Raises:
        TypeError: ``config`` lacks an attribute of ``CONFIG_FIELDS``, or a
            value has the wrong type.
        ValueError: A value is out of range or the init strategy is unknown.
    """
    if isinstance(config, CMCConfig):
        return config
    missing = [name for name in CONFIG_FIELDS if not hasattr(config, name)]
    if missing:
        raise TypeError(
            f"config ({type(config).__name__}) has no attribute(s) {missing}; a "
            f"backend config needs {list(CONFIG_FIELDS)}. Add them, or pass "
            "chainmesh.backends.CMCConfig(...)"
        )
    return CMCConfig(**{name: getattr(config, name) for name in CONFIG_FIELDS})


class CMCBackend(abc.ABC):
    """The interface of a CMC execution backend (one NUTS run per call)."""

    @abc.abstractmethod
    def run(
        self,
        model: Callable,
        config: Any,
        rng_key: int | jax.Array,
        init_params: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Sample ``model``; site name -> flat ``(num_chains * num_samples, ...)``."""

    @abc.abstractmethod
    def get_capabilities(self) -> BackendCapabilities:
        """What this backend can do on the devices it sees."""

    @abc.abstractmethod
    def validate_resources(self) -> None:
        """Raise if the backend cannot run here; warn if it will run poorly."""

    @abc.abstractmethod
    def estimate_memory(self, n_data: int, n_params: int, n_chains: int) -> float:
        """An upper bound, in GB (1e9 bytes), of the memory a run needs."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Release cached state; safe to call any number of times."""


class ShardedBackend(CMCBackend):
    """``CMCBackend`` on a ``Sampler``: all chains in one SPMD program.

    Chain ``i`` gets ``fold_in(rng_key, i)``, so draws do not depend on how
    many devices there are (bitwise, for the same chains per device). One
    ``Sampler`` is kept per ``(model, config)``; compiled programs are cached
    by model, data shapes and config, so repeated runs do not recompile.

    Args:
        devices: None (all ``jax.devices()``), an int ``n`` (the first ``n``) or
            a list of devices. Resolved when used, so a backend can be built
            before ``validate_resources`` says whether it can run.
        progress_bar: Show ``Sampler``'s progress bar during ``run``.
    """

    def __init__(self, devices: Any = None, *, progress_bar: bool = False) -> None:
        self._devices = devices
        self._progress_bar = progress_bar
        self._samplers: dict[tuple[Callable, CMCConfig], Sampler] = {}
        self._last: tuple[CMCConfig, Result] | None = None
        # Models run here, for cleanup; weak, so dropped models are not kept alive.
        self._models: weakref.WeakSet[Callable] = weakref.WeakSet()

    @property
    def devices(self) -> list[jax.Device]:
        """The devices runs use.

        Raises:
            RuntimeError: No device is available.
        """
        if isinstance(self._devices, list | tuple) and not self._devices:
            raise RuntimeError("ShardedBackend was given an empty devices list")
        try:
            devices = resolve_devices(self._devices)
        except RuntimeError as err:  # JAX found no backend at all
            raise RuntimeError(f"no JAX devices available: {err}") from err
        if not devices:
            raise RuntimeError(
                "no JAX devices available; install a jaxlib for your accelerator "
                "or check that JAX can see the CPU"
            )
        return devices

    def sampler(self, model: Callable, config: Any) -> Sampler:
        """The ``Sampler`` this backend uses for ``(model, config)`` (kept)."""
        settings = as_config(config)
        key = (model, settings)
        sampler = self._samplers.pop(key, None)
        if sampler is None:
            try:
                self._models.add(model)
            except TypeError:  # no weak references: cleanup still finds it if kept
                pass
            sampler = Sampler(
                model,
                devices=self.devices,
                progress_bar=self._progress_bar,
                **settings.sampler_options(),
            )
        self._samplers[key] = sampler  # most recently used last
        while len(self._samplers) > MAX_SAMPLERS:  # e.g. a new closure per data set
            del self._samplers[next(iter(self._samplers))]
        return sampler

    def run(
        self,
        model: Callable,
        config: Any,
        rng_key: int | jax.Array,
        init_params: Mapping[str, Any] | None = None,
        *,
        model_args: tuple = (),
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Sample ``model`` with the settings of ``config``.

        Args:
            model: A NumPyro model; its data come in ``model_args`` /
                ``model_kwargs`` (or its closure, as with the old backend,
                at the cost of a compile per new closure).
            config: An object with the attributes ``CONFIG_FIELDS``.
            rng_key: An int or a JAX PRNG key; chain ``i`` uses
                ``fold_in(rng_key, i)`` whatever the number of devices.
            init_params: Constrained initial values, site name -> value shaped
                ``(num_chains, *site_shape)`` (one per chain) or like the site
                or ``(1, *site_shape)`` (all chains). Used as the values of
                ``init_to_value``; other strategies fill sites not given.
            model_args: Positional model arguments (arrays or numbers).
            model_kwargs: Keyword model arguments.

        Returns:
            Site name -> draws ``(num_chains * num_samples, *site_shape)``,
            chain-major, like NumPyro's ``MCMC.get_samples()``.

        Raises:
            ValueError: ``init_to_value`` without ``init_params``, or bad values.
            TypeError: A bad config or argument.
        """
        settings = as_config(config)
        if not isinstance(model_args, tuple):
            raise TypeError(
                f"model_args must be a tuple, got {type(model_args).__name__}; "
                "wrap a single argument as (x,)"
            )
        result = self.sampler(model, settings).run(
            rng_key, *model_args, init_params=init_params, **dict(model_kwargs or {})
        )
        self._last = (settings, result)
        return result.get_samples(group_by_chain=False)

    @property
    def last_result(self) -> Result:
        """The full ``Result`` of the last ``run`` (plan, stats, final state).

        Raises:
            RuntimeError: Nothing has run since construction or ``cleanup``.
        """
        if self._last is None:
            raise RuntimeError("no run yet: call run(model, config, rng_key) first")
        return self._last[1]

    def get_samples(self, group_by_chain: bool = True) -> dict[str, np.ndarray]:
        """The last run's draws, ``(num_chains, num_samples, ...)`` by default."""
        return self.last_result.get_samples(group_by_chain)

    def get_extra_fields(self, group_by_chain: bool = True) -> dict[str, np.ndarray]:
        """The last run's ``energy, diverging, accept_prob, num_steps,
        potential_energy, step_size, tree_depth``, ``(num_chains, num_samples)``
        by default."""
        return self.last_result.get_extra_fields(group_by_chain)

    def get_capabilities(self) -> BackendCapabilities:
        """Sharded, parallel chains over every device this backend uses."""
        return BackendCapabilities(
            supports_sharding=True,
            supports_parallel_chains=True,
            max_parallel_shards=len(self.devices),
        )

    def validate_resources(self) -> None:
        """Check there is a device to run on.

        Raises:
            RuntimeError: No device is available.

        Warns:
            UserWarning: Only one device: chains run vectorized on it, with no
                device parallelism.
        """
        devices = self.devices
        if len(devices) == 1:
            warnings.warn(
                f"ShardedBackend has a single {devices[0].platform} device, so its "
                "chains share it (vectorized) and nothing runs across devices. On "
                "CPU, call chainmesh.set_host_device_count(n) before JAX starts to "
                "split it into n devices",
                UserWarning,
                stacklevel=2,
            )

    def estimate_memory(
        self,
        n_data: int,
        n_params: int,
        n_chains: int,
        *,
        config: Any = None,
    ) -> float:
        """An upper bound, in GB, of one device's peak plus the host's draws.

        With ``P = n_params``, ``M = P * P`` (dense mass) or ``P``, ``K =
        max_tree_depth``, ``S = num_samples``, ``D`` devices, ``c = ceil(
        n_chains / D)`` chains per device and 8 bytes per number::

            device = 8 * (n_data * (P + 1)                    # replicated data
                          + c * ((4 * P + 4 * M + 32)         # state, mass matrix
                                 + (2 * K + 12) * P + 4 * n_data  # gradient work
                                 + S * (P + 7)))              # draw buffers
            host   = 8 * n_chains * S * (P + 7)               # returned draws
            GB     = (device + host) / 1e9

        The 7 are the extra fields kept per draw. ``n_params`` counts scalars,
        ``numpyro.deterministic`` sites included (they are stored too); the data
        term assumes up to ``P + 1`` numbers per data point and the model's
        temporaries up to 4 numbers per data point. Compiled code is not
        counted.

        Args:
            n_data: Data points.
            n_params: Scalar parameters per draw.
            n_chains: Chains.
            config: Settings for ``S``, ``K`` and the mass matrix; None uses the
                last run's config, or ``CMCConfig()`` before any run.
        """
        for name, value in (("n_data", n_data), ("n_params", n_params)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if isinstance(n_chains, bool) or not isinstance(n_chains, numbers.Integral):
            raise TypeError(f"n_chains must be an int, got {type(n_chains).__name__}")
        if n_chains < 1:
            raise ValueError(f"n_chains must be >= 1, got {n_chains}")
        if config is None:
            settings = self._last[0] if self._last is not None else CMCConfig()
        else:
            settings = as_config(config)
        p, samples = n_params, settings.num_samples
        mass = p * p if settings.dense_mass else p
        per_device = math.ceil(n_chains / len(self.devices))
        state = 4 * p + 4 * mass + 32
        work = (2 * settings.max_tree_depth + 12) * p + 4 * n_data
        draws = samples * (p + NUM_EXTRA_FIELDS)
        device = n_data * (p + 1) + per_device * (state + work + draws)
        host = n_chains * draws
        return BYTES_PER_NUMBER * (device + host) / 1e9

    def cleanup(self) -> None:
        """Drop kept samplers, the last result and the models' compiled programs."""
        for model in {*self._models, *(model for model, _ in self._samplers)}:
            CACHE.clear(model)
        self._models.clear()
        self._samplers.clear()
        self._last = None


__all__ = [
    "BackendCapabilities",
    "CMCBackend",
    "CMCConfig",
    "ShardedBackend",
    "as_config",
]
