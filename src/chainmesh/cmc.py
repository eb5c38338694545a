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
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.primitives import Messenger

from chainmesh import arguments
from chainmesh.arguments import is_data
from chainmesh.batch import BatchSampler
from chainmesh.cache import COMPILE_LOCK
from chainmesh.combine import COMBINERS
from chainmesh.diagnostics import ess_bulk, r_hat
from chainmesh.mesh import ShardPlan
from chainmesh.result import Result


class temper_prior(Messenger):
    """Raise the prior of the shared latent sites to a power.

    Scales the log density of every latent sample site except those named in
    ``local``: a local latent (one value per data row of a shard) belongs to
    one shard only, so its prior is not split between shards. Observed sites
    and ``numpyro.factor`` terms (observed) keep weight 1.
    """

    def __init__(
        self,
        fn: Callable | None = None,
        power: float = 1.0,
        local: frozenset[str] = frozenset(),
    ) -> None:
        self.power = power
        self.local = frozenset(local)
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["name"] in self.local:
            return
        scale = msg.get("scale")
        msg["scale"] = self.power if scale is None else self.power * scale


@functools.lru_cache(maxsize=64)
def _tempered(model: Callable, power: float, local: frozenset[str]) -> Callable:
    """One wrapper object per (model, power, local), so programs are reused."""
    return temper_prior(model, power=power, local=local)


def local_sites(model: Callable, args: tuple, kwargs: dict) -> frozenset[str]:
    """Latent sites inside a plate as long as the shard's data rows.

    Such a site holds one value per data row (a local latent): it lives in one
    shard only. The rows are the leading axis of the first array argument.
    """
    call = arguments.record(model, args, kwargs)
    leaves = [x for x in jax.tree.leaves((call.args, call.kwargs)) if np.ndim(x)]
    if not leaves:
        return frozenset()
    rows = np.shape(leaves[0])[0]
    found: set[str] = set()
    bound = call.model

    def record(a: tuple, k: dict) -> None:
        traced = substitute(seed(bound, rng_seed=0), substitute_fn=init_to_uniform)
        for name, site in trace(traced).get_trace(*a, **k).items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if any(f.size == rows for f in site["cond_indep_stack"]):
                found.add(name)

    specs = jax.tree.map(_spec, (call.args, call.kwargs))
    with COMPILE_LOCK:
        jax.eval_shape(record, *specs)
    return frozenset(found)


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    dtype = jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


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
    """Stack K shards' args to leading-axis arrays (``total`` of them)."""
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

    def stack(*xs: Any) -> Any:
        if is_data(xs[0]):
            return np.stack([np.asarray(x) for x in xs])
        if any(x != xs[0] for x in xs):  # static values are shared by every shard
            raise ValueError(
                f"the static model argument {xs[0]!r} differs between shards; "
                "static arguments (ints, strings, ...) must be the same in every "
                "shard: pass per-shard values as arrays"
            )
        return xs[0]

    return jax.tree.map(stack, *trees)


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
    local: Sequence[str] | None = None,
    resume: bool = False,
    **config: Any,
) -> CMCResult:
    """Sample every shard's sub-posterior in one SPMD call and combine them.

    Args:
        model: NumPyro model taking one shard's data.
        data_shards: K shards, each a tuple of positional args or a dict of
            keyword args, all of the same shapes (see ``split``).
        seed: Shard ``k``, chain ``i`` uses ``fold_in(fold_in(key, k), i)``.
        prior_power: Exponent of the shared sites' prior in each
            sub-posterior; default ``1 / K``.
        combiner: ``"consensus"``, ``"robust"``, ``"concat"`` or a callable
            ``(list of (draws, dim) arrays) -> (combined, weights)``.
        devices: As for ``Sampler``; shards take mesh rows, chains columns.
        init_params: As for ``Sampler.run`` (shared by all shards).
        local: Latent sites that belong to one shard (neither tempered nor
            combined); None finds them: sites inside a plate as long as the
            shard's data rows (``local_sites``).
        resume: Continue from the checkpoint in ``checkpoint_dir``.
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
    args, kwargs = _stack(data_shards, k)
    if local is None:
        one = jax.tree.map(lambda x: x[0] if is_data(x) else x, (args, kwargs))
        local = local_sites(model, *one)
    tempered = _tempered(model, power, frozenset(local))
    sampler = BatchSampler(tempered, max(k, 1), devices=devices, **config)
    out = sampler.run(seed, *args, init_params=init_params, resume=resume, **kwargs)
    info = sampler.info.latent
    shared = {n: tuple(info[n]) for n in sorted(info) if n not in tempered.local}
    names = list(shared)
    draws = [_flatten(r.samples, names) for r in out.results]
    flat, weights = combine(draws) if names else (np.empty((0, 0)), np.ones(k) / k)
    return CMCResult(
        shards=out.results,
        combined=_unflatten(flat, shared) if names else {},
        weights=np.asarray(weights),
        diagnostics=[_shard_diagnostics(r) for r in out.results],
        plan=sampler.shards,
        stats=out.stats,
    )
