"""NumPyro's NUTS as pure per-chain functions: ``init`` and ``step``.

NumPyro's functional ``hmc(..., algo="NUTS")`` returns ``init_kernel`` and
``sample_kernel``; the latter relies on settings that ``init_kernel`` stores in
their shared closure. ``step`` re-establishes them with an abstract call of
``init_kernel`` (``jax.eval_shape``: no arrays, no compilation), so the two
functions can be traced in any order, in separate programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.infer.hmc import HMCState, hmc
from numpyro.infer.hmc_util import build_adaptation_schedule
from numpyro.infer.util import ParamInfo, find_valid_initial_params

from chainmesh.config import SamplerConfig
from chainmesh.kernels.base import Kernel, named_fields, skip_counter
from chainmesh.model import ModelInfo, potential_fn_gen


def build_nuts(model: Callable, config: SamplerConfig, info: ModelInfo) -> Kernel:
    """Wrap NumPyro NUTS for ``model`` with the adaptation settings of ``config``.

    Args:
        model: NumPyro model (``model.prepared``: enumeration applied).
        config: Sampler configuration (warmup length, target, depth, mass).
        info: The model's sites (for the dense mass block and init shapes).
    """
    enum = bool(info.enumerated)
    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_fn_gen(model, enum))
    # NumPyro's MCMC spells a full dense mass as one block of all sites, sorted.
    dense_mass = [tuple(sorted(info.latent))] if config.dense_mass else []

    def start(param_info: ParamInfo, key: jax.Array, args: tuple, kwargs: dict):
        return init_kernel(
            param_info,
            num_warmup=config.num_warmup,
            dense_mass=dense_mass,
            target_accept_prob=config.target_accept_prob,
            max_tree_depth=config.max_tree_depth,
            model_args=args,
            model_kwargs=kwargs,
            rng_key=key,
        )

    def init(key: jax.Array, strategy: Any, args: tuple, kwargs: dict):
        prototype = {
            k: jnp.zeros(s.shape, s.dtype) for k, s in info.unconstrained.items()
        }
        key_init, key_kernel = jax.random.split(key)
        param_info, is_valid = find_valid_initial_params(
            key_init,
            model,
            init_strategy=strategy,
            enum=enum,
            model_args=args,
            model_kwargs=kwargs,
            prototype_params=prototype,
        )
        return start(ParamInfo(*param_info), key_kernel, args, kwargs), is_valid

    def step(state: HMCState, args: tuple, kwargs: dict) -> HMCState:
        param_info = ParamInfo(state.z, state.potential_energy, state.z_grad)
        jax.eval_shape(start, param_info, state.rng_key, args, kwargs)
        return sample_kernel(state, model_args=args, model_kwargs=kwargs)

    windows = build_adaptation_schedule(config.num_warmup) if config.num_warmup else []
    last_window = max(len(windows) - 1, 0)

    def skip(state: HMCState, to: jax.Array) -> HMCState:
        """Jump to transition ``to`` of the final window (NumPyro's adapter
        reads the window index, its schedule the transition)."""
        a = state.adapt_state
        window = jnp.where(to >= 0, last_window, a.window_idx)
        state = skip_counter(state, to)
        return state._replace(adapt_state=a._replace(window_idx=window))

    return Kernel(init=init, step=step, fields=extra_fields, skip=skip)


def extra_fields(state: HMCState) -> dict[str, jax.Array]:
    """The per-draw diagnostics of a state, named as in ``EXTRA_FIELDS``."""
    return named_fields(state, state.adapt_state.step_size)
