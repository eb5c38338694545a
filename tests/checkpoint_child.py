"""Child process for the resume tests: samples with checkpoints, then hangs.

Usage: python checkpoint_child.py DIR STOP_AT_CHUNK {after|during} [INIT]

It stops (prints KILLME and sleeps, waiting for SIGKILL) right after the
checkpoint that ends chunk STOP_AT_CHUNK is written ("after"), or halfway
through writing it ("during": the temporary file is half written). INIT names
a callable init strategy of ``INITS`` (default: the sampler's default).
"""

import sys
import time

import numpy as np
from numpyro.infer import init_to_feasible, init_to_value

import chainmesh as cm
from chainmesh import checkpoint

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import RESUME_CONFIG, linreg, linreg_data  # noqa: E402

INITS = {
    "default": "init_to_median",
    "feasible": init_to_feasible,
    "value": init_to_value(
        values={"beta": np.array([0.1, -0.2, 0.3], np.float32), "sigma": 0.7}
    ),
}
"""Init strategies a fresh process must rebuild to the same identity."""


def sampler(directory: str | None, init: str = "default") -> cm.Sampler:
    """The sampler of the resume tests, in the child and in the test."""
    return cm.Sampler(
        linreg, checkpoint_dir=directory, init_strategy=INITS[init], **RESUME_CONFIG
    )


def _hang() -> None:
    print("KILLME", flush=True)
    time.sleep(600)


def main(directory: str, stop_at: int, when: str, init: str = "default") -> None:
    original_save = checkpoint.save_checkpoint

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
    sampler(directory, init).run(0, X, y)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
