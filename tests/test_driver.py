"""The host loop: thinning across checkpoints, honest stats after a resume."""

import numpy as np
import pytest
from models import RESUME_CONFIG, linreg, linreg_data

import chainmesh as cm
from chainmesh import checkpoint
from chainmesh import sampler as sampler_module
from chainmesh.driver import schedule
from chainmesh.examples import eight_schools_data

X, Y = linreg_data()
THINNED = {**RESUME_CONFIG, "num_samples": 62, "thinning": 3, "chunk_size": 5}


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint was written."""


def _interrupt_after(monkeypatch, saves: int) -> None:
    original, count = checkpoint.save_checkpoint, [0]

    def save(*args, **kwargs):
        original(*args, **kwargs)
        count[0] += 1
        if count[0] == saves:
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def test_schedule_of_a_thinned_run():
    chunks = list(
        schedule(
            cm.SamplerConfig(
                **{k: v for k, v in THINNED.items() if k not in ("devices",)}
            )
        )
    )
    warmup = [c for c in chunks if c.phase == "warmup"]
    sample = [c for c in chunks if c.phase == "sample"]
    assert sum(c.n_draws for c in warmup) == 60
    assert (sample[0].n_draws, sample[0].per_draw, sample[0].collect) == (2, 1, False)
    assert sum(c.n_draws * c.per_draw for c in sample) == 62
    assert sum(c.n_draws for c in sample if c.collect) == 62 // 3


def test_thinned_run_resumes_bitwise(tmp_path, monkeypatch):
    whole = cm.Sampler(linreg, **THINNED).run(0, X, Y)
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **THINNED)
    _interrupt_after(monkeypatch, saves=8)  # after 3 of 4 sampling chunks
    with pytest.raises(Interrupted):
        sampler.run(0, X, Y)
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path).progress
    assert 0 < saved["filled"] < 62 // 3
    resumed = sampler.run(0, X, Y, resume=True)
    assert resumed.samples["beta"].shape == (4, 20, 3)
    for name in whole.samples:
        np.testing.assert_array_equal(resumed.samples[name], whole.samples[name])
    for name in ("leapfrog_steps", "lockstep_steps", "divergences"):
        assert resumed.stats[name] == whole.stats[name]
    assert resumed.stats["sampling_s"] > saved["seconds"]["sample"] > 0


def test_resuming_a_finished_run_keeps_its_timings(tmp_path):
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    first = sampler.run(0, X, Y)
    again = sampler.run(0, X, Y, resume=True)  # nothing left to run
    for name in ("warmup_s", "sampling_s", "gradients_per_s", "leapfrog_steps"):
        assert again.stats[name] == pytest.approx(first.stats[name], rel=1e-9)
    assert np.isfinite(again.stats["gradients_per_s"])


def test_chunk_never_exceeds_the_run(count_compiles, monkeypatch):
    """A chunk_size larger than the run compiles the program of the default
    chunk (one program, draw buffers of the run's length, not the chunk's)."""
    run = {"num_chains": 8, "num_warmup": 10, "num_samples": 10, "progress_bar": False}
    example = eight_schools_data()
    buffers = []

    def allocate(store, chunk_program, keep, kept):
        buffers.append(chunk_program.out_info.draws["mu"].shape)
        return original(store, chunk_program, keep, kept)

    original = sampler_module.allocate
    monkeypatch.setattr(sampler_module, "allocate", allocate)
    big = cm.Sampler(example.model, chunk_size=10**4, **run)
    assert big.config.chunk == 10
    big.run(0, *example.args)
    with count_compiles() as c:
        cm.Sampler(example.model, **run).run(0, *example.args)
    assert buffers == [(8, 10)] * 2
    assert c.count == 0
