"""``BatchSampler``: one model fitted to many data sets of one shape, in one program.

Data sets stack on a leading axis. All data sets x chains run as one
``jit(shard_map)`` call on a 2-D ``("shard", "chain")`` mesh: data sets take
the mesh rows, chains the columns, each device vectorizes its data sets x
chains. This is the engine of consensus Monte Carlo (``chainmesh.cmc``) and of
simulation-based calibration, and what a user fitting one model per pixel,
shard or experiment calls directly.

Example:
    >>> sampler = cm.BatchSampler(model, num_datasets=200, num_chains=2)
    >>> out = sampler.run(0, ys)               # ys: (200, N), data set k = ys[k]
    >>> out.samples["mu"].shape                # (200, 2, 1000)
    >>> out.results[7].summary()               # data set 7 as a plain Result
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import numpy as np

from chainmesh.arguments import is_data
from chainmesh.mesh import ShardPlan, plan_shards, resolve_devices, shard_mesh
from chainmesh.result import Result
from chainmesh.sampler import Sampler, check_lanes
from chainmesh.validation import as_program_args


@dataclasses.dataclass
class BatchResult:
    """Draws of every data set, and one ``Result`` per data set.

    Attributes:
        samples: Site name -> ``(num_datasets, num_chains, draws, *shape)``.
        extra: Field name -> ``(num_datasets, num_chains, draws)``.
        results: One ``Result`` per data set (views of the arrays above).
        plan: The 2-D mesh plan (data sets x chains, padding of both).
        stats: Timings and counters of the single SPMD run (real data sets
            and chains only).
    """

    samples: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    results: list[Result]
    plan: ShardPlan
    stats: dict[str, Any]

    @property
    def num_datasets(self) -> int:
        """Data sets in the result."""
        return self.plan.num_shards


def _dataset(x: Any, k: int) -> Any:
    """Data set ``k`` of an argument (static values are shared)."""
    return x[k] if is_data(x) and np.ndim(x) else x


class BatchSampler(Sampler):
    """``Sampler`` over a batch of data sets: every data set x chain in one call.

    Data set ``k``, chain ``i`` uses the key ``fold_in(fold_in(key, k), i)``.
    Padding data sets (copies of data set 0, to fill the mesh rows) and padding
    chains run and are dropped; neither enters ``stats``.

    Args:
        model: A NumPyro model taking ONE data set's arguments.
        num_datasets: Data sets per call (the leading axis of every argument).
        devices: As for ``Sampler``.
        **options: Every other ``Sampler`` option (``num_chains``, ...).

    Raises:
        ValueError, TypeError: Any bad argument, before anything compiles.
    """

    _batched = True

    def __init__(
        self, model: Callable, num_datasets: int, *, devices: Any = None, **options: Any
    ) -> None:
        if isinstance(num_datasets, bool) or not isinstance(num_datasets, int):
            raise TypeError(
                f"num_datasets must be an int, got {type(num_datasets).__name__}"
            )
        if num_datasets < 1:
            raise ValueError(f"num_datasets must be >= 1, got {num_datasets}")
        super().__init__(model, devices=devices, **options)
        self.shards: ShardPlan = plan_shards(
            num_datasets, self.config.num_chains, resolve_devices(devices)
        )
        self.plan = self.shards.chains
        self.mesh = shard_mesh(self.shards)
        check_lanes(self.config.lanes, self.plan.chains_per_device)

    def _keep(self) -> tuple[int, ...]:
        return (self.shards.num_shards, self.config.num_chains)

    def _lanes(self) -> np.ndarray:
        datasets = np.arange(self.shards.total_shards) < self.shards.num_shards
        chains = np.arange(self.plan.total_chains) < self.plan.num_chains
        return datasets[:, None] & chains[None, :]

    def run(
        self,
        seed: int | jax.Array = 0,
        *args: Any,
        init_params: Mapping[str, Any] | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> BatchResult:
        """Sample every data set.

        Args:
            seed: An int or a JAX PRNG key.
            *args: Positional model arguments, each with a leading axis of
                ``num_datasets`` (data set ``k`` is ``arg[k]``).
            init_params: As for ``Sampler.run`` (shared by all data sets).
            resume: Continue from the checkpoint in ``checkpoint_dir``.
            **kwargs: Keyword model arguments, stacked like ``args``.

        Raises:
            ValueError: An argument without the leading data-set axis.
        """
        args, kwargs = self._stacked(as_program_args(args, kwargs))
        call = self._record(args, kwargs)
        out, extra, stats = self._sample(seed, call, init_params, resume)
        results = [
            Result(
                {n: v[k] for n, v in out.draws.items()},
                {n: v[k] for n, v in extra.items()},
                self.plan,
                stats,
                model=self.model,
                model_args=jax.tree.map(partial(_dataset, k=k), args),
                model_kwargs=jax.tree.map(partial(_dataset, k=k), kwargs),
            )
            for k in range(self.shards.num_shards if out.draws else 0)
        ]
        return BatchResult(out.draws, extra, results, self.shards, stats)

    def _stacked(self, data: tuple) -> tuple:
        """Check the data-set axis and append padding data sets (copies of 0)."""
        k, total = self.shards.num_shards, self.shards.total_shards
        paths = jax.tree_util.tree_flatten_with_path(data)[0]
        if not paths:
            raise ValueError("BatchSampler.run needs data: one array per argument")
        for path, leaf in paths:
            if not is_data(leaf):
                continue  # static values (ints, strings, ...) are shared
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != k:
                where = ("args" if path[0].idx == 0 else "kwargs") + (
                    jax.tree_util.keystr(path[1:])
                )
                raise ValueError(
                    f"model argument {where} has shape {np.shape(leaf)}; every "
                    f"argument of BatchSampler.run needs a leading axis of "
                    f"num_datasets={k} (data set k is arg[k]). Stack the data "
                    "sets (np.stack), or bind shared values with functools.partial"
                )

        def pad(x: Any) -> Any:
            if total == k or not is_data(x):
                return x
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[:1], total - k, axis=0)])

        return jax.tree.map(pad, data)
