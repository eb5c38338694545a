"""Consensus Monte Carlo: every data shard and every chain in one SPMD program.

The data are split into K shards of equal shapes. Shard ``k``'s sub-posterior is
``prior^(1/K) x likelihood(shard k)``, so the product of the K sub-posteriors is
the full posterior. All shards x chains run as one ``jit(shard_map)`` call on a
2-D ``("shard", "chain")`` mesh; the sub-posterior draws are then combined on
the host (``chainmesh.combine``).

Example:
    >>> shards = cm.cmc.split(X, y, num_shards=4)        # pads + masks the last
    >>> out = cm.cmc.sample(model, shards, num_chains=4)  # model(X, y, mask)
    >>> out.combined["beta"].shape                        # (4 * 1000, P)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from numpyro.primitives import Messenger

from chainmesh.combine import COMBINERS
from chainmesh.diagnostics import ess_bulk, r_hat
from chainmesh.mesh import ShardPlan
from chainmesh.result import Result
from chainmesh.sampler import Sampler


class temper_prior(Messenger):
    """Raise the prior to a power: scales the log density of latent sites.

    Observed sites and ``numpyro.factor`` terms (observed) keep weight 1.
    """

    def __init__(self, fn: Callable | None = None, power: float = 1.0) -> None:
        self.power = power
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            scale = msg.get("scale")
            msg["scale"] = self.power if scale is None else self.power * scale


@functools.lru_cache(maxsize=64)
def _tempered(model: Callable, power: float) -> Callable:
    """One wrapper object per (model, power), so compiled programs are reused."""
    return temper_prior(model, power=power)


@dataclasses.dataclass
class CMCResult:
    """Per-shard sub-posteriors and their combination.

    Attributes:
        shards: One ``Result`` per shard, draws ``(num_chains, draws, ...)``.
        combined: Latent site -> combined draws ``(num_draws, *site_shape)``.
        weights: One scalar weight per shard (share of the total precision).
        diagnostics: Per shard: ``max_r_hat``, ``min_ess_bulk``, ``divergences``.
        plan: The 2-D mesh plan.
        stats: Compile and sampling times of the single SPMD run.
    """

    shards: list[Result]
    combined: dict[str, np.ndarray]
    weights: np.ndarray
    diagnostics: list[dict[str, float]]
    plan: ShardPlan
    stats: dict[str, Any]


def split(*arrays: Any, num_shards: int) -> list[tuple]:
    """Split data row-wise into shards of equal shapes, padding the last.

    Every array is cut along axis 0 into ``num_shards`` pieces of
    ``ceil(N / num_shards)`` rows; the ragged last piece is padded with copies
    of its first row. Each shard gets a trailing ``mask`` (1.0 on real rows,
    0.0 on padding); the model must apply it to its likelihood, e.g.
    ``with numpyro.handlers.mask(mask=mask > 0): numpyro.sample("y", ...)``.

    Returns:
        ``num_shards`` tuples ``(*arrays_k, mask_k)``.
    """
    if not arrays:
        raise ValueError("split needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("split: every array needs the same number of rows")
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be in 1..{n} (rows), got {num_shards}")
    size = -(-n // num_shards)
    shards = []
    for k in range(num_shards):
        rows = np.arange(k * size, min((k + 1) * size, n))
        if rows.size == 0:
            raise ValueError(
                f"num_shards={num_shards} leaves shard {k} empty for {n} rows; "
                "use fewer shards"
            )
        idx = np.concatenate([rows, np.full(size - rows.size, rows[0])])
        mask = (np.arange(size) < rows.size).astype(np.float32)
        shards.append((*(np.asarray(a)[idx] for a in arrays), mask))
    return shards


def _stack(data_shards: Sequence[Any], total: int) -> tuple[tuple, dict]:
    """Stack K shards' args to leading-axis arrays; pad with copies of shard 0."""
    if not isinstance(data_shards, Sequence) or len(data_shards) < 1:
        raise TypeError("data_shards must be a non-empty list, one entry per shard")
    trees = [(s, {}) if isinstance(s, tuple) else ((), s) for s in data_shards]
    if not all(isinstance(t[1], Mapping) for t in trees):
        raise TypeError("each shard must be a tuple of args or a dict of kwargs")
    first = jax.tree.structure(trees[0])
    shapes0 = [np.shape(x) for x in jax.tree.leaves(trees[0])]
    for k, tree in enumerate(trees):
        shapes = [np.shape(x) for x in jax.tree.leaves(tree)]
        if jax.tree.structure(tree) != first or shapes != shapes0:
            raise ValueError(
                f"shard {k} has shapes {shapes}, shard 0 has {shapes0}; every shard "
                "needs the same shapes: pad the ragged one (chainmesh.cmc.split "
                "pads and adds a mask)"
            )
    trees += [trees[0]] * (total - len(trees))
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _flatten(samples: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    chains, draws = samples[names[0]].shape[:2]
    cols = [samples[n].reshape(chains * draws, -1) for n in names]
    return np.concatenate(cols, axis=1).astype(np.float64)


def _unflatten(flat: np.ndarray, shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=int))
        out[name] = flat[:, start : start + size].reshape(len(flat), *shape)
        start += size
    return out


def _shard_diagnostics(result: Result) -> dict[str, float]:
    scalars = [
        x.reshape(*x.shape[:2], -1)[..., j]
        for x in result.samples.values()
        for j in range(int(np.prod(x.shape[2:], dtype=int)))
    ]
    return {
        "max_r_hat": float(np.nanmax([r_hat(x) for x in scalars])),
        "min_ess_bulk": float(np.nanmin([ess_bulk(x) for x in scalars])),
        "divergences": int(result.extra["diverging"].sum()),
    }


def sample(
    model: Callable,
    data_shards: Sequence[tuple | Mapping[str, Any]],
    *,
    seed: int | jax.Array = 0,
    prior_power: float | None = None,
    combiner: str | Callable = "consensus",
    devices: Any = None,
    init_params: Mapping[str, Any] | None = None,
    **config: Any,
) -> CMCResult:
    """Sample every shard's sub-posterior in one SPMD call and combine them.

    Args:
        model: NumPyro model taking one shard's data.
        data_shards: K shards, each a tuple of positional args or a dict of
            keyword args, all of the same shapes (see ``split``).
        seed: Shard ``k``, chain ``i`` uses ``fold_in(fold_in(key, k), i)``.
        prior_power: Exponent of the prior in each sub-posterior; default
            ``1 / K``.
        combiner: ``"consensus"``, ``"robust"``, ``"concat"`` or a callable
            ``(list of (draws, dim) arrays) -> (combined, weights)``.
        devices: As for ``Sampler``; shards take mesh rows, chains columns.
        init_params: As for ``Sampler.run`` (shared by all shards).
        **config: ``Sampler`` options (num_chains, num_warmup, ...).
    """
    k = len(data_shards) if isinstance(data_shards, Sequence) else 0
    power = 1.0 / max(k, 1) if prior_power is None else float(prior_power)
    if not power > 0:
        raise ValueError(f"prior_power must be > 0, got {prior_power}")
    if isinstance(combiner, str) and combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {sorted(COMBINERS)} or a callable")
    combine = COMBINERS[combiner] if isinstance(combiner, str) else combiner
    if not callable(model):
        raise TypeError(f"model must be a callable, got {type(model).__name__}")
    sampler = Sampler._for_shards(
        _tempered(model, power), max(k, 1), devices=devices, **config
    )
    args, kwargs = _stack(data_shards, sampler.shards.total_shards)
    out, extra, stats = sampler._sample(seed, args, kwargs, init_params)
    shards = [
        Result(
            {n: v[j] for n, v in out.draws.items()},
            {n: v[j] for n, v in extra.items()},
            sampler.plan,
            stats,
        )
        for j in range(k)
    ]
    latent = {n: tuple(sampler.info.latent[n]) for n in sorted(sampler.info.latent)}
    names = list(latent)
    flat, weights = combine([_flatten(r.samples, names) for r in shards])
    return CMCResult(
        shards=shards,
        combined=_unflatten(flat, latent),
        weights=np.asarray(weights),
        diagnostics=[_shard_diagnostics(r) for r in shards],
        plan=sampler.shards,
        stats=stats,
    )
