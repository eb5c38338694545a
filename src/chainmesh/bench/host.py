"""The machine a benchmark runs on: versions, CPU, and how busy it is."""

from __future__ import annotations

import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else "unknown"


def environment() -> dict:
    """Versions, CPU and the flags the results depend on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": cores or os.cpu_count(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "numpyro": _version("numpyro"),
        "chainmesh": _version("chainmesh"),
        "dtype": "float64" if os.environ.get("JAX_ENABLE_X64") else "float32",
        "xla_flags_inherited": os.environ.get("XLA_FLAGS", ""),
        "load_average_start": list(os.getloadavg()),
    }


def busy_tasks(samples: int = 10, interval: float = 0.2) -> float | None:
    """Mean number of other runnable tasks on the machine (None off Linux).

    Read from the ``running/total`` field of ``/proc/loadavg`` over
    ``samples x interval`` seconds, minus this reading process itself.
    """
    counts = []
    for _ in range(samples):
        try:
            field = Path("/proc/loadavg").read_text().split()[3]
        except (OSError, IndexError):
            return None
        counts.append(int(field.split("/")[0]) - 1)
        time.sleep(interval)
    return sum(counts) / len(counts)


def wait_for_quiet(max_busy: float, timeout: float) -> tuple[float, float | None]:
    """Wait until at most ``max_busy`` other tasks run, or ``timeout`` passes.

    Returns:
        Seconds waited and the last ``busy_tasks`` reading.
    """
    t0 = time.perf_counter()
    while True:
        busy = busy_tasks()
        if busy is None or busy <= max_busy or time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, busy
        time.sleep(3.0)
