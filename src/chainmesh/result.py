"""What a run returns: draws with a chain axis, extra fields, plan and stats."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from chainmesh.diagnostics import format_summary, lockstep_efficiency, summarize
from chainmesh.mesh import ChainPlan
from chainmesh.placement import flatten_chains


@dataclasses.dataclass
class Result:
    """Draws of one run, real chains only (padding chains never appear).

    Attributes:
        samples: Site name -> ``(num_chains, num_draws, *site_shape)``,
            constrained, ``numpyro.deterministic`` sites included.
        extra: ``potential_energy, energy, diverging, accept_prob, num_steps,
            step_size, tree_depth`` -> ``(num_chains, num_draws)``.
        plan: Devices used, chains per device, padding chains.
        stats: Timings, compilations, leapfrog steps, lockstep efficiency,
            divergences.
        state: Final NUTS state (sharded on the devices, padding included).
        model: The sampled model.
        model_args: Its positional arguments (as passed to ``run``).
        model_kwargs: Its keyword arguments.
    """

    samples: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    plan: ChainPlan
    stats: dict[str, Any]
    state: Any = dataclasses.field(default=None, repr=False)
    model: Any = dataclasses.field(default=None, repr=False)
    model_args: tuple = dataclasses.field(default=(), repr=False)
    model_kwargs: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_chains(self) -> int:
        """Chains in the result."""
        return self.plan.num_chains

    @property
    def num_draws(self) -> int:
        """Draws kept per chain."""
        return next(iter(self.extra.values())).shape[1] if self.extra else 0

    def get_samples(self, group_by_chain: bool = False) -> dict[str, np.ndarray]:
        """Draws by site, exactly like NumPyro's ``MCMC.get_samples``.

        Args:
            group_by_chain: Keep the chain axis (``(chains, draws, ...)``), or
                (default, NumPyro's layout) flatten chain-major to
                ``(chains * draws, ...)``, which ``Predictive`` takes as is.
        """
        if group_by_chain:
            return dict(self.samples)
        return {k: flatten_chains(v) for k, v in self.samples.items()}

    def get_extra_fields(self, group_by_chain: bool = False) -> dict[str, np.ndarray]:
        """Extra fields by name, flat like NumPyro's (or with the chain axis)."""
        if group_by_chain:
            return dict(self.extra)
        return {k: flatten_chains(v) for k, v in self.extra.items()}

    def summary(self, prob: float = 0.9, print_: bool = True) -> dict[str, dict]:
        """Mean, sd, quantiles, r_hat and bulk ESS per scalar; printed by default.

        Returns:
            Row label (``"beta[0]"``) -> column -> value.
        """
        rows = summarize(self.samples, prob=prob)
        if print_:
            print(format_summary(rows))
            print(f"divergences: {int(self.extra['diverging'].sum())}")
        return rows

    def to_arviz(self, **kwargs: Any) -> Any:
        """An ArviZ ``InferenceData`` (needs ``pip install chainmesh[arviz]``).

        ``posterior`` (chain, draw and plate-named dims), ``sample_stats`` under
        ArviZ's names, ``observed_data``; keyword arguments
        (``posterior_predictive``, ``log_likelihood``, ``coords``, ``dims``) go
        to ``chainmesh.arviz_io.to_arviz``.

        Example:
            >>> idata = result.to_arviz()
            >>> idata.sample_stats["lp"].shape == result.extra["energy"].shape
            True
        """
        from chainmesh.arviz_io import to_arviz

        return to_arviz(self, **kwargs)


def run_stats(out: Any, compile_s: float, compilations: int, init_s: float) -> dict:
    """The ``Result.stats`` dict of a run (``out`` is the driver's output).

    Counts cover real chains only and every transition (thinned ones too);
    ``lockstep_steps`` is what the devices paid, padding lanes included;
    ``lockstep_bound`` is the efficiency the best schedule of the same work
    could reach (``program.COUNTERS``: the longest chain sets the pace).
    Seconds and counts of a resumed run include the part before the resume.
    """
    sample, warm = out.counters["sample"], out.counters["warmup"]
    return {
        "compile_s": compile_s,
        "compilations": compilations,
        "init_s": init_s,
        "warmup_s": out.warmup_s,
        "sampling_s": out.sampling_s,
        "leapfrog_steps": sample["leapfrog_steps"],
        "lockstep_steps": sample["lockstep_steps"],
        "lockstep_efficiency": lockstep_efficiency(
            sample["leapfrog_steps"], sample["lockstep_steps"]
        ),
        "lockstep_efficiency_warmup": lockstep_efficiency(
            warm["leapfrog_steps"], warm["lockstep_steps"]
        ),
        "lockstep_bound": lockstep_efficiency(
            sample["leapfrog_steps"], sample["bound_steps"]
        ),
        "leapfrog_steps_warmup": warm["leapfrog_steps"],
        "divergences": sample["divergences"],
        "gradients_per_s": (
            sample["leapfrog_steps"] / out.sampling_s if out.sampling_s else math.nan
        ),
    }
