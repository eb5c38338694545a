"""Atomic checkpoints of a run: sampler state, draws so far, and a manifest.

A checkpoint is one ``checkpoint.npz`` (loaded with ``allow_pickle=False``),
written to a temporary file, fsynced and renamed over the previous one, so a
crash at any moment leaves the previous checkpoint intact. ``manifest.json``
beside it repeats the manifest for people.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

FILE = "checkpoint.npz"
FORMAT = 1


class Saved(NamedTuple):
    """A loaded checkpoint."""

    manifest: dict[str, Any]
    progress: dict[str, Any]
    state: list[np.ndarray]
    draws: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]


def data_digest(tree: Any) -> str:
    """SHA-256 of the data's bytes, shapes and dtypes (to refuse other data)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        arr = np.asarray(leaf)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


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

    Raises:
        ValueError: The path cannot hold files, is not writable, or the disk
            has less than twice ``needed_bytes`` free (old + new checkpoint).
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / ".write-test", lambda f: f.write(b"chainmesh"))
        (path / ".write-test").unlink()
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
    if not file.exists():
        return None
    with np.load(file, allow_pickle=False) as z:
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
    """Refuse to resume a checkpoint made by another run.

    Raises:
        ValueError: Listing every manifest field that differs.
    """
    keys = sorted(set(saved) | set(current))
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
    model: Any, config: Any, plan: Any, key: Any, data: Any, init_params: Any
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed."""
    import numpyro

    import chainmesh

    fields = {
        k: v if isinstance(v, int | float | bool | str | None) else repr(v)
        for k, v in vars(config).items()
        if k not in ("progress_bar", "checkpoint_dir", "checkpoint_every", "store")
    }
    return {
        "format": FORMAT,
        "chainmesh": chainmesh.__version__,
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "x64": bool(jax.config.jax_enable_x64),
        "model": f"{getattr(model, '__module__', '?')}."
        f"{getattr(model, '__qualname__', type(model).__name__)}",
        "config": fields,
        "plan": str(plan),
        "seed": np.asarray(key).tolist(),
        "data": data_digest(data),
        "init_params": data_digest(init_params or {}),
    }


def attach(
    directory: str | os.PathLike,
    manifest: dict[str, Any],
    state: Any,
    store: Any,
    lead: int,
    resume: bool,
) -> tuple[Any, Any, Any]:
    """Prepare a run for checkpointing, resuming it first if asked.

    Args:
        directory: The checkpoint directory.
        manifest: This run's manifest (``manifest(...)``).
        state: The fresh initial state (a template for a resumed one).
        store: Where draws go; a ``MemoryStore``'s draws go into checkpoints.
        lead: Leading axes before the draw axis (1, or 2 with data shards).
        resume: Continue from the checkpoint in ``directory``, if any.

    Returns:
        ``(progress, state, save)``: where the driver starts (None: at the
        beginning), the state to start from, and the driver's save callback.
    """
    from chainmesh.driver import Progress
    from chainmesh.layout import to_host
    from chainmesh.store import MemoryStore

    directory = Path(directory)
    in_memory = isinstance(store, MemoryStore)
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    if in_memory:
        groups = ("draws", "extra")
        needed += sum(x.nbytes for g in groups for x in store.read(g).values())
    check_writable(directory, needed)
    progress = None
    saved = load(directory) if resume else None
    if saved is not None:
        check_compatible(saved.manifest, manifest)
        state = restore_state(state, saved.state)
        progress = Progress(**saved.progress)
        for group in ("draws", "extra"):
            for name, values in getattr(saved, group).items():
                store.write(group, name, lead, 0, values)

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
            save_checkpoint(directory, manifest, progress_dict, leaves, **kept)

    return progress, state, save
