"""Assertions and interruptions shared by the tests."""

import numpy as np

from chainmesh import checkpoint


def assert_same_draws(a, b) -> None:
    """Two results hold the same sites and fields, bit for bit."""
    for group in ("samples", "extra"):
        x, y = getattr(a, group), getattr(b, group)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{group}.{k}")


class Interrupted(Exception):
    """Raised after a checkpoint by ``interrupt_after``: the run stops there."""


def interrupt_after(monkeypatch, chunk: int) -> None:
    """Stop a run right after the checkpoint whose next chunk is ``chunk``."""
    original = checkpoint.save_checkpoint

    def save(directory, manifest, progress, *args, **kwargs):
        original(directory, manifest, progress, *args, **kwargs)
        if progress["next_chunk"] == chunk:
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
