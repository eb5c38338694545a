"""``Sampler``: configuration, chain plan and mesh; one run = init + chunks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from chainmesh import arguments, checkpoint, persistent
from chainmesh.cache import program_key
from chainmesh.config import SamplerConfig
from chainmesh.driver import RunOutput, allocate, drive
from chainmesh.keys import root_key
from chainmesh.mesh import chain_mesh, plan_chains, resolve_devices
from chainmesh.model import ModelInfo
from chainmesh.result import Result, run_stats
from chainmesh.startup import start
from chainmesh.store import FileStore, MemoryStore, NullStore
from chainmesh.validation import as_program_args, check_directory


class Sampler:
    """MCMC on many chains over a device mesh, compiled once per data shape.

    Example:
        >>> import chainmesh as cm, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
        ...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> sampler = cm.Sampler(model, num_chains=4, num_warmup=200,
        ...                      num_samples=200, progress_bar=False)
        >>> result = sampler.run(0, np.ones(10))
        >>> result.samples["mu"].shape
        (4, 200)

    Args:
        model: A NumPyro model; its data arrive as ``run`` arguments.
        num_chains: Chains returned.
        num_warmup: Adaptation transitions per chain, or ``"auto"``: warmup
            ends at a window boundary once the adaptation has settled (the
            chains agree and the scales stop moving, ``chainmesh.stopping``),
            after at most ``max_warmup`` transitions.
        num_samples: Transitions after warmup; ``num_samples // thinning``
            draws are kept per chain. None: 1000 (leave it out with targets).
        thinning: Keep every ``thinning``-th transition.
        devices: None (all ``jax.devices()``), an int ``n`` (the first ``n``)
            or a list of devices.
        init_strategy: ``"init_to_median"``, ``"init_to_sample"``,
            ``"init_to_uniform"``, ``"init_to_value"`` or a NumPyro init fn.
        target_accept_prob: Step-size adaptation target in (0, 1); None:
            0.8 for NUTS, 0.651 for ChEES, 0.9 for MAMS.
        max_tree_depth: Maximum NUTS tree depth (ChEES and MAMS: at most
            ``2**max_tree_depth - 1`` gradients per transition).
        dense_mass: Adapt a dense mass matrix instead of a diagonal one (an
            alias for ``metric="dense"``).
        chunk_size: Transitions (warmup) or draws (sampling) per compiled
            call; None picks ``min(100, max(num_warmup, num_samples))``.
        inner: ``"vmap"`` (vectorized NUTS on a device's chains, lockstep) or
            ``"map"`` (``lax.map``: chains one after another, no lockstep,
            smaller compile) or ``"async"`` (lanes of one vectorized loop:
            each chain's NUTS tree advances one leapfrog step per iteration
            and a chain never waits for another's tree; ``docs/design.md``).
        lanes: With ``inner="async"``, lanes per device; None: one per chain.
            Fewer lanes than chains per device: a lane that finishes a
            transition takes the next chain that is ready, so the device
            stays busy until the work runs out. Draws do not depend on it.
        kernel: ``"nuts"`` (NumPyro's NUTS), ``"chees"`` (ChEES-HMC) or
            ``"mams"`` (Metropolis-adjusted microcanonical HMC): with the last
            two every chain runs the same trajectory length, adapted from
            statistics pooled over all chains of the mesh (``docs/kernels.md``).
        adapt: NUTS adaptation: ``"chain"`` (each chain alone, as NumPyro)
            or ``"ensemble"`` (one step size and mass matrix from statistics
            pooled over all chains of the mesh).
        metric: The adapted inverse mass matrix: ``"diag"`` (Stan's windowed
            variance), ``"dense"``, ``"fisher"`` (the diagonal
            ``sqrt(var(x) / var(grad log p))``) or ``"lowrank"`` (nutpie's
            low-rank-modified Fisher diagonal); ``docs/kernels.md`` says which
            kernel and ``adapt`` adapt which. None (default): ``"lowrank"``
            for NUTS with ``adapt="chain"`` and ``inner="vmap"`` (median 12x
            NumPyro's effective draws per gradient over the posteriordb
            scoreboard), ``"diag"`` otherwise; ``"diag"`` is NumPyro's
            adaptation.
        progress_bar: One tqdm bar for the whole run, updated per chunk.
        checkpoint_dir: Write an atomic checkpoint there every
            ``checkpoint_every`` chunks; ``run(..., resume=True)`` continues
            from it with bitwise-identical draws.
        checkpoint_every: Chunks between checkpoints.
        store: Stream kept draws into ``.npy`` files in this directory (host
            memory stays flat); ``Result`` arrays are then read-only memmaps.
        check_data: Raise on NaN/inf in floating-point model arguments.
        gather: In a multi-process run, ``"all"`` processes keep the full
            draws, or only the ``"main"`` one (process 0; the others return a
            ``Result`` with empty ``samples`` and ``extra``).
        cache_dir: Directory where compiled programs persist, so a new process
            loads instead of compiling; None: ``$CHAINMESH_CACHE_DIR`` or
            ``~/.cache/chainmesh/xla``; False: no disk cache.
        static_argnames: Model arguments compiled into the program by value
            (arrays a model needs as values, e.g. for ``np.unique``); Python
            ints, bools, strings and other non-arrays are static anyway.
        max_warmup: The longest ``num_warmup="auto"`` warmup (default 1000).
        target_ess: Sample until every coordinate of every site has bulk and
            tail ESS >= this (and R-hat <= ``max_rhat``), checked after each
            chunk; ``stats["stop"]`` says where and why the run stopped.
        max_rhat: Largest rank-normalized split R-hat a stop accepts; None:
            1.01 with ``target_ess`` (unless ``max_nested_rhat`` is given).
        max_nested_rhat: Largest nested R-hat a stop accepts (superchains of
            4 consecutive chains; >= 16 chains, a multiple of 4).
        max_samples: With targets, the most sampling transitions per chain
            (default 5000); reaching it warns with the numbers reached.
        var_names: Sites the targets look at (None: every site, deterministic
            sites included).

    Raises:
        ValueError, TypeError: Any bad argument, before anything compiles.
    """

    def __init__(
        self,
        model: Callable,
        *,
        num_chains: int = 4,
        num_warmup: int | str = 500,
        num_samples: int | None = None,
        thinning: int = 1,
        devices: Any = None,
        init_strategy: str | Callable = "init_to_median",
        target_accept_prob: float | None = None,
        max_tree_depth: int = 10,
        dense_mass: bool = False,
        chunk_size: int | None = None,
        inner: str = "vmap",
        lanes: int | None = None,
        kernel: str = "nuts",
        adapt: str = "chain",
        metric: str | None = None,
        progress_bar: bool = True,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 10,
        store: str | None = None,
        check_data: bool = True,
        gather: str = "all",
        cache_dir: str | bool | None = None,
        static_argnames: tuple[str, ...] = (),
        max_warmup: int | None = None,
        target_ess: float | None = None,
        max_rhat: float | None = None,
        max_nested_rhat: float | None = None,
        max_samples: int | None = None,
        var_names: tuple[str, ...] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable, got {type(model).__name__}")
        self.model = model
        self.config = SamplerConfig(
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            thinning=thinning,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            dense_mass=dense_mass,
            init_strategy=init_strategy,
            chunk_size=chunk_size,
            inner=inner,
            lanes=lanes,
            kernel=kernel,
            adapt=adapt,
            metric=metric,
            progress_bar=progress_bar,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            store=store,
            check_data=check_data,
            gather=gather,
            cache_dir=cache_dir,
            static_argnames=static_argnames,
            max_warmup=max_warmup,
            target_ess=target_ess,
            max_rhat=max_rhat,
            max_nested_rhat=max_nested_rhat,
            max_samples=max_samples,
            var_names=var_names,
        )
        if checkpoint_dir is not None:
            checkpoint.check_writable(checkpoint_dir, 0)
        if store is not None:
            check_directory("store", store)
        self.info: ModelInfo | None = None  # the model's sites, after a run
        self.plan = plan_chains(num_chains, resolve_devices(devices))
        self.mesh = chain_mesh(self.plan)
        if not self._batched:  # BatchSampler checks against its own plan
            check_lanes(lanes, self.plan.chains_per_device)

    # Data sets on a leading axis (``BatchSampler``) set these three.
    _batched = False
    _auto_static: tuple[str, ...] = ()  # arguments found to be needed as values

    def _keep(self) -> tuple[int, ...]:
        """Leading axes of what the user gets: ``(num_chains,)``."""
        return (self.config.num_chains,)

    def _lanes(self) -> np.ndarray:
        """Bool per lane that runs (padding included): True for real ones."""
        return np.arange(self.plan.total_chains) < self.plan.num_chains

    def _cache_key(self, data_signature: tuple, model: Any = None) -> tuple:
        model = self.model if model is None else model
        return program_key(model, self.config, self.mesh, self.plan, data_signature)

    def _record(self, args: tuple, kwargs: dict) -> arguments.Call:
        """The call's arguments canonicalized once: static part, data, digest."""
        args, kwargs = as_program_args(args, kwargs)
        static = (*self.config.static_argnames, *self._auto_static)
        return arguments.record(self.model, args, kwargs, static)

    def run(
        self,
        seed: int | jax.Array = 0,
        *args: Any,
        init_params: Mapping[str, Any] | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> Result:
        """Sample the model given data ``*args, **kwargs``.

        Args:
            seed: An int or a JAX PRNG key; chain ``i`` uses
                ``fold_in(key, i)``, whatever the number of chains or devices.
            *args: Positional model arguments (arrays or numbers).
            init_params: Constrained initial values, site name -> value shaped
                like the site (all chains) or ``(num_chains, *site_shape)``.
            resume: Continue from the checkpoint in ``checkpoint_dir`` (if there
                is one) instead of starting over.
            **kwargs: Keyword model arguments.

        Returns:
            The draws of ``num_chains`` chains with extra fields and stats.
        """
        call = self._record(args, kwargs)
        out, extra, stats = self._sample(seed, call, init_params, resume)
        args, kwargs = call.passed
        return Result(
            out.draws,
            extra,
            self.plan,
            stats,
            state=out.state,
            model=self.model,
            model_args=args,
            model_kwargs=kwargs,
        )

    def init(
        self,
        seed: int | jax.Array = 0,
        *args: Any,
        init_params: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The initial kernel state of every chain, sharded on the mesh.

        For NUTS it is NumPyro's ``HMCState``, batched over chains.

        Same arguments as ``run``. The leading axis holds all chains that run,
        padding chains last; ``state.z`` is in unconstrained space.
        """
        return start(self, seed, self._record(args, kwargs), init_params).state

    def _sample(
        self, seed: Any, call: arguments.Call, init_params: Any, resume: bool
    ) -> tuple[RunOutput, dict, dict]:
        """Init, then every chunk: the whole run on converted arguments."""
        loaded = persistent.hits()
        started = start(self, seed, call, init_params)
        programs, data, state = started.programs, started.data, started.state
        config, mesh = self.config, self.mesh
        compile_s, compilations = started.compile_s, started.compilations
        keep = self._keep()
        kept = config.num_samples // config.thinning
        store = FileStore(config.store, resume) if config.store else MemoryStore()
        if config.gather == "main" and jax.process_index() != 0:
            store = NullStore()
        allocate(store, programs.chunk, keep, kept)
        progress, save = None, None
        if config.checkpoint_dir is not None:
            manifest = checkpoint.manifest(
                self.model,
                config,
                self.plan,
                root_key(seed),
                call.digest,
                init_params,
            )
            progress, state, save = checkpoint.attach(
                config.checkpoint_dir, manifest, state, store, len(keep), resume
            )
        try:
            out = drive(
                programs.chunk,
                state,
                started.real,
                *data,
                config,
                mesh,
                keep,
                store,
                progress,
                save,
                config.checkpoint_every,
                tuple(programs.info.latent),
            )
        finally:
            if isinstance(store, FileStore):
                store.close()
        loaded = persistent.hits() - loaded
        stats = run_stats(out, compile_s, compilations - loaded, started.init_s)
        stats["programs_from_disk"] = loaded
        stats["static_args"] = list(started.static)
        stats["stop"] = out.stop
        stats.update({f"compile_{k}": v for k, v in started.stages.items()})
        extra = dict(out.extra)
        if extra and config.kernel == "nuts":
            extra["tree_depth"] = np.log2(extra["num_steps"]).astype(np.int64) + 1
        return out, extra, stats

    def _one_dataset(self, data: tuple) -> tuple:
        """Data as the model sees them: without the data-set axis, if any."""
        if not self._batched:
            return data
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), data)


def check_lanes(lanes: int | None, chains_per_device: int) -> None:
    """Refuse more async lanes than a device has chains."""
    if lanes is not None and lanes > chains_per_device:
        raise ValueError(
            f"lanes={lanes} is more than the {chains_per_device} chain(s) per "
            "device; pass lanes <= chains per device, or None for one lane per "
            "chain"
        )


def sample(
    model: Callable,
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int | jax.Array = 0,
    init_params: Mapping[str, Any] | None = None,
    **config: Any,
) -> Result:
    """One-shot ``Sampler(model, **config).run(seed, *args, **model_kwargs)``.

    Compiled programs are cached process-wide, so repeated calls with data of
    the same shapes do not recompile.
    """
    sampler = Sampler(model, **config)
    return sampler.run(seed, *args, init_params=init_params, **(model_kwargs or {}))
