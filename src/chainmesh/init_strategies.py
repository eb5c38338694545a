"""NumPyro init strategies by name, checked before anything compiles."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from numpyro.infer import init_to_median, init_to_sample, init_to_uniform

INIT_STRATEGIES: dict[str, Callable[..., Any]] = {
    "init_to_median": init_to_median,
    "init_to_sample": init_to_sample,
    "init_to_uniform": init_to_uniform,
    "init_to_value": init_to_uniform,  # fallback for sites without a value
}


def resolve_init_strategy(strategy: str | Callable[..., Any]) -> partial:
    """Return the NumPyro init strategy as a ``functools.partial``.

    Args:
        strategy: A name from ``INIT_STRATEGIES`` or a NumPyro init function
            such as ``init_to_feasible`` or ``init_to_value(values=...)``.

    Raises:
        ValueError: The name is unknown.
        TypeError: The strategy is neither a name nor a callable.
    """
    if isinstance(strategy, str):
        if strategy not in INIT_STRATEGIES:
            raise ValueError(
                f"init_strategy {strategy!r} is unknown; use one of "
                f"{sorted(INIT_STRATEGIES)} or pass a NumPyro init function"
            )
        return INIT_STRATEGIES[strategy]()
    if not callable(strategy):
        raise TypeError(
            "init_strategy must be a strategy name or a NumPyro init function, "
            f"got {type(strategy).__name__}"
        )
    resolved = strategy if isinstance(strategy, partial) else strategy()
    if not isinstance(resolved, partial):
        raise TypeError(
            "init_strategy must behave like NumPyro's init functions: calling it "
            "with no site returns a functools.partial"
        )
    return resolved
