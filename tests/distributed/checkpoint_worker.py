"""One process of the multi-process resume test (started by ``chainmesh launch``).

Usage: checkpoint_worker.py DIR STOP_AT_CHUNK [store]

Every process checkpoints into its own directory ``DIR/ckpt-<process>`` (like
node-local disks: only process 0's ever holds a checkpoint); with ``store``,
each process also streams its draws into ``DIR/store-<process>``. The first run
stops on every process right after the checkpoint that ends chunk
STOP_AT_CHUNK; the second resumes it; the third (another seed) must be refused
on every process; the last runs uninterrupted. Each process writes
``DIR/out-<process>.npz``: the chunk each run started from, the refusal, and
the draws of the resumed and the uninterrupted run.
"""

import sys
from pathlib import Path

import chainmesh as cm
from chainmesh import checkpoint, distributed

distributed.initialize()
sys.path.insert(0, __file__.rsplit("/", 2)[0])
import jax  # noqa: E402
import numpy as np  # noqa: E402
from models import linreg, linreg_data  # noqa: E402

directory, stop_at = Path(sys.argv[1]), int(sys.argv[2])
process = jax.process_index()
store = str(directory / f"store-{process}") if sys.argv[3:] == ["store"] else None
CONFIG = {
    "num_chains": 8,
    "num_warmup": 40,
    "num_samples": 40,
    "chunk_size": 10,
    "checkpoint_every": 1,
    "progress_bar": False,
}


class Interrupted(Exception):
    """Stops a run on every process at the same chunk."""


starts: list[int] = []
interrupt = [True]
original_attach = checkpoint.attach


def attach(*args, **kwargs):
    """``checkpoint.attach`` that records the start and may stop the run."""
    progress, state, save = original_attach(*args, **kwargs)
    starts.append(0 if progress is None else progress.next_chunk)

    def save_then_stop(progress, state):
        save(progress, state)
        if interrupt[0] and progress.next_chunk == stop_at:
            raise Interrupted

    return progress, state, save_then_stop


checkpoint.attach = attach
X, y = linreg_data()
ckpt = str(directory / f"ckpt-{process}")
try:
    cm.Sampler(linreg, checkpoint_dir=ckpt, store=store, **CONFIG).run(0, X, y)
    raise SystemExit("the first run was not interrupted")
except Interrupted:
    pass
interrupt[0] = False
resumed = cm.Sampler(linreg, checkpoint_dir=ckpt, store=store, **CONFIG).run(
    0, X, y, resume=True
)
try:  # another seed: process 0 refuses, and every process raises its error
    cm.Sampler(linreg, checkpoint_dir=ckpt, store=store, **CONFIG).run(
        1, X, y, resume=True
    )
    refused = ""
except ValueError as err:
    refused = str(err)
whole = cm.Sampler(linreg, **CONFIG).run(0, X, y)
np.savez(
    directory / f"out-{process}.npz",
    starts=np.array(starts),
    refused=np.array(refused),
    **{f"resumed.{k}": v for k, v in {**resumed.samples, **resumed.extra}.items()},
    **{f"whole.{k}": v for k, v in {**whole.samples, **whole.extra}.items()},
)
