"""Atomic checkpoints of a run: sampler state, draws so far, and a manifest.

A checkpoint is one ``checkpoint.npz`` (loaded with ``allow_pickle=False``),
written to a temporary file, fsynced and renamed over the previous one, so a
crash at any moment leaves the previous checkpoint intact. ``manifest.json``
beside it repeats the manifest for people.

The manifest says where the draws kept so far are: in the checkpoint (an
in-memory store) or in a ``FileStore`` directory, recognised by its run token.
In a multi-process run only process 0 reads and writes checkpoints: it decides
whether to resume and sends the checkpoint to the other processes, so all of
them continue from the same chunk whatever their own directories hold.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from chainmesh import identity
from chainmesh.placement import from_main
from chainmesh.store import FileStore, MemoryStore, NullStore

FILE = "checkpoint.npz"
FORMAT = 5


class Saved(NamedTuple):
    """A loaded checkpoint."""

    manifest: dict[str, Any]
    progress: dict[str, Any]
    state: list[np.ndarray]
    draws: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(directory: str | os.PathLike, needed_bytes: int) -> Path:
    """Create ``directory`` and prove a checkpoint fits, before any sampling.

    Each process probes with a file of its own name: processes sharing the
    directory (a shared file system) do not race on one file.

    Raises:
        ValueError: The path cannot hold files, is not writable, or the disk
            has less than twice ``needed_bytes`` free (old + new checkpoint).
    """
    path = Path(directory)
    probe = path / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(probe, lambda f: f.write(b"chainmesh"))
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"checkpoint_dir {str(path)!r} is not writable ({err}); pass a "
            "directory you can write to"
        ) from None
    free = shutil.disk_usage(path).free
    if free < 2 * needed_bytes:
        raise ValueError(
            f"checkpoint_dir {str(path)!r} has {free / 1e9:.2f} GB free but "
            f"checkpoints need about {2 * needed_bytes / 1e9:.2f} GB (previous + "
            "new); free space, choose another directory, or pass store= to keep "
            "draws out of checkpoints"
        )
    return path


def save_checkpoint(
    directory: Path,
    manifest: dict[str, Any],
    progress: dict[str, Any],
    state: list[np.ndarray],
    draws: dict[str, np.ndarray],
    extra: dict[str, np.ndarray],
) -> None:
    """Write one checkpoint atomically (see the module docstring)."""
    arrays = {f"state.{i}": np.asarray(x) for i, x in enumerate(state)}
    arrays.update({f"draws.{k}": v for k, v in draws.items()})
    arrays.update({f"extra.{k}": v for k, v in extra.items()})
    arrays["manifest"] = np.array(json.dumps(manifest, sort_keys=True))
    arrays["progress"] = np.array(json.dumps(progress, sort_keys=True))
    _atomic_write(directory / FILE, lambda f: np.savez(f, **arrays))
    text = json.dumps({**manifest, "progress": progress}, indent=1, sort_keys=True)
    _atomic_write(directory / "manifest.json", lambda f: f.write(text.encode()))


def load(directory: str | os.PathLike) -> Saved | None:
    """The checkpoint in ``directory``, or None if there is none."""
    file = Path(directory) / FILE
    return _parse(file.read_bytes()) if file.exists() else None


def _parse(blob: bytes) -> Saved:
    """A checkpoint from the bytes of its file."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        groups: dict[str, dict[str, np.ndarray]] = {"state": {}, "draws": {}}
        groups["extra"] = {}
        for key in z.files:
            if "." in key:
                group, name = key.split(".", 1)
                groups[group][name] = z[key]
        manifest = json.loads(str(z["manifest"]))
        progress = json.loads(str(z["progress"]))
    state = [groups["state"][str(i)] for i in range(len(groups["state"]))]
    return Saved(manifest, progress, state, groups["draws"], groups["extra"])


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made by another run (the store aside).

    Raises:
        ValueError: Listing every manifest field that differs.
    """
    keys = sorted((set(saved) | set(current)) - {"store"})
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs
        )
        raise ValueError(
            f"cannot resume: the checkpoint was made by a different run ({detail}). "
            "Run with the same model, data, seed, config and versions, or start "
            "fresh with resume=False (or another checkpoint_dir)"
        )


def check_store(record: dict[str, Any], store: Any) -> None:
    """Refuse a store that does not hold the draws a checkpoint relies on.

    Args:
        record: The checkpoint's ``store`` entry (``Store.record()``).
        store: This run's store.

    Raises:
        ValueError: The checkpoint's draws are in a store directory and
            ``store`` is not that directory (by its run token).
    """
    if record.get("kind") != "files" or isinstance(store, NullStore):
        return
    where = record["path"]
    if not isinstance(store, FileStore):
        raise ValueError(
            f"cannot resume: the draws kept so far are not in the checkpoint but "
            f"in store {where!r}; pass store={where!r} to resume (or resume=False "
            "to start over)"
        )
    if store.found_token() != record["token"]:
        raise ValueError(
            f"cannot resume: store {str(store.path)!r} does not hold the draws "
            f"kept so far, which are in store {where!r} (run token "
            f"{record['token']}); pass store={where!r} to resume (or resume=False "
            "to start over)"
        )


def restore_state(template: Any, leaves: list[np.ndarray]) -> Any:
    """Saved state leaves placed like ``template`` (a fresh initial state)."""
    flat, treedef = jax.tree.flatten(template)
    if len(flat) != len(leaves) or any(
        a.shape != b.shape or a.dtype != b.dtype
        for a, b in zip(flat, leaves, strict=False)
    ):
        raise ValueError(
            "cannot resume: the checkpointed sampler state does not match this "
            "model's state (shapes or dtypes differ); start fresh with resume=False"
        )
    placed = [
        jax.make_array_from_callback(a.shape, a.sharding, lambda i, b=b: b[i])
        for a, b in zip(flat, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, placed)


def manifest(
    model: Any, config: Any, plan: Any, key: Any, data: str, init_params: Any
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (JSON values only).

    The model and a callable ``init_strategy`` are identified by qualified name
    and a digest of their code and constants (``identity``), never by
    ``repr``, which holds memory addresses.

    Args:
        data: The digest of the model arguments (``arguments.Call.digest``):
            their names and structure as well as their values.
    """
    import numpyro

    from chainmesh._version import __version__

    fields = {
        k: v
        if isinstance(v, int | float | bool | str | None)
        else identity.fingerprint(v)
        for k, v in vars(config).items()
        if k not in ("progress_bar", "checkpoint_dir", "checkpoint_every", "store")
    }
    current = {
        "format": FORMAT,
        "chainmesh": __version__,
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "python": "{}.{}".format(*sys.version_info[:2]),  # bytecode changes
        "x64": bool(jax.config.jax_enable_x64),
        "model": identity.fingerprint(model),
        "config": fields,
        "plan": str(plan),
        "seed": np.asarray(key).tolist(),
        "data": data,
        "init_params": identity.tree_digest(init_params or {}),
    }
    return json.loads(json.dumps(current))  # as it reads back from a file


def _decide(
    directory: Path, manifest: dict[str, Any], store: Any, resume: bool
) -> tuple[dict[str, Any], bytes | None]:
    """Process 0's decision: resume or not (or why not), and the checkpoint."""
    decision = {"error": None, "resume": False, "token": secrets.token_hex(16)}
    file = directory / FILE
    if jax.process_index() != 0 or not resume or not file.exists():
        return decision, None
    try:
        blob = file.read_bytes()
        saved = _parse(blob)
    except Exception as err:  # whatever it is, every process must hear of it
        decision["error"] = (
            f"cannot resume: {file} cannot be read ({err}); remove it or start "
            "fresh with resume=False"
        )
        return decision, None
    try:
        check_compatible(saved.manifest, manifest)
        check_store(saved.manifest["store"], store)
    except ValueError as err:
        decision["error"] = str(err)
        return decision, None
    decision["resume"] = True
    decision["token"] = saved.manifest["store"].get("token") or decision["token"]
    return decision, blob


def _agree(error: str | None) -> None:
    """Raise on every process if any process failed, so none waits alone."""
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import process_allgather

        failed = np.ravel(process_allgather(np.array([error is not None], np.int32)))
        if error is None and failed.any():
            first = int(np.argmax(failed))
            error = (
                f"process {first} cannot checkpoint or resume this run (see its "
                "error); every process stops"
            )
    if error is not None:
        raise ValueError(error)


def attach(
    directory: str | os.PathLike,
    manifest: dict[str, Any],
    state: Any,
    store: Any,
    lead: int,
    resume: bool,
) -> tuple[Any, Any, Any]:
    """Prepare a run for checkpointing, resuming it first if asked.

    Call on every process: process 0 decides and broadcasts (a collective).

    Args:
        directory: The checkpoint directory (only process 0's is read).
        manifest: This run's manifest (``manifest(...)``).
        state: The fresh initial state (a template for a resumed one).
        store: Where draws go; a ``MemoryStore``'s draws go into checkpoints,
            a ``FileStore`` is opened here (new files, or reopened on resume).
        lead: Leading axes before the draw axis (1, or 2 with data shards).
        resume: Continue from the checkpoint in ``directory``, if any.

    Returns:
        ``(progress, state, save)``: where the driver starts (None: at the
        beginning), the state to start from, and the driver's save callback.

    Raises:
        ValueError: On every process, if the checkpoint cannot be resumed.
    """
    from chainmesh.driver import Progress
    from chainmesh.placement import to_host

    directory = Path(directory)
    in_memory = isinstance(store, MemoryStore)
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    if in_memory:
        groups = ("draws", "extra")
        needed += sum(x.nbytes for g in groups for x in store.read(g).values())
    error = None
    try:
        check_writable(directory, needed)
    except ValueError as err:
        error = str(err)
    _agree(error)  # a process whose disk is full must not leave the others waiting
    decision, blob = _decide(directory, manifest, store, resume)
    decision = json.loads(from_main(json.dumps(decision).encode()))
    if decision["error"] is not None:
        raise ValueError(decision["error"])
    saved = _parse(from_main(blob)) if decision["resume"] else None
    record = saved.manifest["store"] if saved is not None else {}
    error = None
    try:
        check_store(record, store)
        if isinstance(store, FileStore):
            store.open(decision["token"], reuse=record.get("kind") == "files")
        if saved is not None:
            state = restore_state(state, saved.state)
    except ValueError as err:
        error = str(err)
    _agree(error)
    progress = None
    if saved is not None:
        progress = Progress(**saved.progress)
        for group in ("draws", "extra"):
            for name, values in getattr(saved, group).items():
                store.write(group, name, lead, 0, values)
    full = {**manifest, "store": store.record()}

    def save(progress: Progress, state: Any) -> None:
        leaves = [to_host(x) for x in jax.tree.leaves(state)]
        kept: dict[str, dict[str, np.ndarray]] = {"draws": {}, "extra": {}}
        if in_memory:
            filled = (slice(None),) * lead + (slice(0, progress.filled),)
            for group in kept:
                for name, x in store.read(group).items():
                    kept[group][name] = x[filled]
        else:
            store.flush()
        if jax.process_index() == 0:
            progress_dict = dataclasses.asdict(progress)
            save_checkpoint(directory, full, progress_dict, leaves, **kept)

    return progress, state, save
