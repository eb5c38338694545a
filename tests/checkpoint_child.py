"""Child process for the resume tests: samples with checkpoints, then hangs.

Usage: python checkpoint_child.py DIR STOP_AT_CHUNK {after|during}

It stops (prints KILLME and sleeps, waiting for SIGKILL) right after the
checkpoint that ends chunk STOP_AT_CHUNK is written ("after"), or halfway
through writing it ("during": the temporary file is half written).
"""

import sys
import time

import chainmesh as cm
from chainmesh import checkpoint

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import RESUME_CONFIG, linreg, linreg_data  # noqa: E402

directory, stop_at, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
original_save = checkpoint.save_checkpoint


def _hang() -> None:
    print("KILLME", flush=True)
    time.sleep(600)


def save(directory, manifest, progress, *args, **kwargs):
    if when == "during" and progress["next_chunk"] == stop_at:

        def half_write(path, write):
            with open(path.with_name(path.name + ".tmp"), "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
            _hang()

        checkpoint._atomic_write = half_write
    original_save(directory, manifest, progress, *args, **kwargs)
    if when == "after" and progress["next_chunk"] == stop_at:
        _hang()


checkpoint.save_checkpoint = save
X, y = linreg_data()
sampler = cm.Sampler(linreg, checkpoint_dir=directory, **RESUME_CONFIG)
sampler.run(0, X, y)
print("FINISHED", flush=True)
