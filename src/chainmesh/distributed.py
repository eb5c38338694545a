"""One mesh over several processes, with JAX's multi-controller runtime.

Every process runs the same program; ``initialize`` joins them through
``jax.distributed`` (CPU collectives via gloo), after which ``jax.devices()``
lists the devices of all processes and a ``Sampler`` spans them. Each process
builds only its own shards of the chain-axis arrays
(``jax.make_array_from_callback``) and every process receives the full draws
(``multihost_utils.process_allgather``).

``chainmesh launch --processes P --devices-per-process D -- python script.py``
starts P local processes for testing or single-node use; on a cluster, start
one process per host yourself (SLURM and Open MPI environments are detected by
``jax.distributed.initialize`` when no address is given).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax

from chainmesh.mesh import set_host_device_count

ENV_COORDINATOR = "CHAINMESH_COORDINATOR"
ENV_NUM_PROCESSES = "CHAINMESH_NUM_PROCESSES"
ENV_PROCESS_ID = "CHAINMESH_PROCESS_ID"
ENV_LOCAL_DEVICES = "CHAINMESH_LOCAL_DEVICES"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    heartbeat_timeout_seconds: int = 30,
) -> None:
    """Join this process to a multi-process JAX runtime.

    Arguments left as None come from the variables ``chainmesh launch`` sets
    (``CHAINMESH_COORDINATOR``, ``CHAINMESH_NUM_PROCESSES``,
    ``CHAINMESH_PROCESS_ID``, ``CHAINMESH_LOCAL_DEVICES``), else from JAX's
    cluster detection (SLURM, Open MPI).

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: Number of processes.
        process_id: This process's index.
        local_device_count: Split this host's CPU into that many devices.
        heartbeat_timeout_seconds: A process silent that long is declared
            dead and the others fail instead of hanging.

    Raises:
        RuntimeError: JAX already started its backends in this process.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    local_device_count = local_device_count or _env_int(ENV_LOCAL_DEVICES)
    if local_device_count:
        set_host_device_count(local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def is_main_process() -> bool:
    """True in process 0 (the one that should write files and print)."""
    return jax.process_index() == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    command: Sequence[str],
    processes: int,
    devices_per_process: int,
    grace_seconds: float = 5.0,
) -> int:
    """Run ``command`` as ``processes`` local processes joined on 127.0.0.1.

    If one process fails, the others are terminated (then killed after
    ``grace_seconds``) instead of waiting for it forever.

    Returns:
        0 if every process succeeded, else a failed process's exit code (the
        lowest process index among those seen failed first).
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError("processes and devices_per_process must be >= 1")
    if not command:
        raise ValueError("launch needs a command to run, after --")
    port = _free_port()
    children = []
    for pid in range(processes):
        env = dict(os.environ)
        env.update(
            {
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(processes),
                ENV_PROCESS_ID: str(pid),
                ENV_LOCAL_DEVICES: str(devices_per_process),
            }
        )
        children.append(subprocess.Popen(list(command), env=env))
    failure = 0
    try:
        while any(c.poll() is None for c in children):
            failed = [(i, c.returncode) for i, c in enumerate(children) if c.returncode]
            if failed:
                break
            time.sleep(0.05)
        failed = [(i, c.returncode) for i, c in enumerate(children) if c.returncode]
        for i, code in failed:
            print(
                f"chainmesh launch: process {i} exited with code {code}",
                file=sys.stderr,
            )
        failure = failed[0][1] if failed else 0
    finally:
        _stop(children, grace_seconds)
    return failure


def _stop(children: list[subprocess.Popen], grace_seconds: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: Sequence[str]) -> int:
    """``chainmesh launch`` (argv after the subcommand)."""
    import argparse

    parser = argparse.ArgumentParser(prog="chainmesh launch")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(command, args.processes, args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
