"""Checkpoint, resume after SIGKILL, and streaming draws to disk."""

import functools
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import checkpoint_child
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from helpers import Interrupted, assert_same_draws, interrupt_after
from models import RESUME_CONFIG, Design, design_model, linreg, linreg_data

import chainmesh as cm
from chainmesh import checkpoint, identity
from chainmesh.examples import gaussian

CHILD = Path(__file__).with_name("checkpoint_child.py")
X, Y = linreg_data()


@pytest.fixture(scope="module")
def uninterrupted():
    return cm.Sampler(linreg, **RESUME_CONFIG).run(0, X, Y)


def _kill_child(directory: Path, stop_at: int, when: str, init: str = "default"):
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(stop_at), when, init],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "KILLME", line
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop_at", "when", "resumes_at"),
    [
        (4, "after", 4),  # killed during warmup (chunks 0-5 are warmup)
        (8, "after", 8),  # killed during sampling
        (10, "during", 8),  # killed while writing: the previous checkpoint holds
    ],
)
def test_resume_after_sigkill_is_bitwise_equal(
    tmp_path, uninterrupted, stop_at, when, resumes_at
):
    _kill_child(tmp_path, stop_at, when)
    saved = checkpoint.load(tmp_path)
    assert saved.progress["next_chunk"] == resumes_at
    if when == "during":
        assert (tmp_path / "checkpoint.npz.tmp").exists()
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    resumed = sampler.run(0, X, Y, resume=True)
    assert_same_draws(uninterrupted, resumed)
    assert checkpoint.load(tmp_path).progress["next_chunk"] == 12


def test_resume_refuses_another_run(tmp_path):
    cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    with pytest.raises(ValueError, match="cannot resume.*seed"):
        sampler.run(1, X, Y, resume=True)
    with pytest.raises(ValueError, match="cannot resume.*data"):
        sampler.run(0, X, Y + 1.0, resume=True)
    other = {**RESUME_CONFIG, "target_accept_prob": 0.9}
    with pytest.raises(ValueError, match="cannot resume.*target_accept_prob"):
        cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **other).run(
            0, X, Y, resume=True
        )


def test_resume_without_checkpoint_starts_fresh(tmp_path, uninterrupted):
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    assert_same_draws(uninterrupted, sampler.run(0, X, Y, resume=True))


def test_checkpoint_files_need_no_pickle(tmp_path):
    cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as z:
        assert z["draws.beta"].shape == (4, 60, 3)
    assert (tmp_path / "manifest.json").read_text().startswith("{")


def test_unwritable_checkpoint_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="checkpoint_dir .* is not writable"):
        cm.Sampler(linreg, checkpoint_dir=str(blocker / "sub"), **RESUME_CONFIG)


def test_full_disk_fails_before_sampling(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    sampler = cm.Sampler(linreg, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    with pytest.raises(ValueError, match="GB free but checkpoints need"):
        sampler.run(0, X, Y)


def test_store_streams_draws_to_npy(tmp_path, uninterrupted):
    result = cm.Sampler(linreg, store=str(tmp_path), **RESUME_CONFIG).run(0, X, Y)
    assert isinstance(result.samples["beta"], np.memmap)
    assert_same_draws(uninterrupted, result)
    on_disk = np.load(tmp_path / "draws" / "beta.npy", allow_pickle=False)
    np.testing.assert_array_equal(on_disk, uninterrupted.samples["beta"])
    assert os.path.getsize(tmp_path / "extra" / "diverging.npy") > 4 * 60


@pytest.mark.slow  # 47 s: RSS over a long stored run
def test_streaming_keeps_host_memory_flat(tmp_path):
    """With store=, the host holds about a chunk of draws, not the whole run.

    Memory is the peak of ``tracemalloc``'s traced bytes, which include every
    NumPy buffer (NumPy reports its allocations to tracemalloc): a count of
    bytes held that machine load cannot move, unlike peak RSS. The programs
    compile before the measured runs.
    """
    scales = np.ones(100, np.float32)
    config = {
        "num_chains": 8,
        "devices": 2,
        "num_warmup": 50,
        "num_samples": 2000,
        "chunk_size": 100,
        "progress_bar": False,
    }
    cm.Sampler(gaussian, **config).run(0, scales)
    peaks, kept = {}, {}
    for mode, store in (("in-memory", None), ("streamed", str(tmp_path))):
        tracemalloc.start()
        try:
            result = cm.Sampler(gaussian, store=store, **config).run(1, scales)
            peaks[mode] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        groups = (result.samples, result.extra)
        kept[mode] = sum(v.nbytes for g in groups for v in g.values())
    assert isinstance(result.samples["x"], np.memmap)
    draws = kept["streamed"]
    assert draws == kept["in-memory"] > 8 * 2000 * 100 * 4  # 6.4 MB of x alone
    assert peaks["in-memory"] > draws  # the measure sees draws held in memory
    chunk = draws * config["chunk_size"] // config["num_samples"]
    assert peaks["streamed"] < 4 * chunk, (peaks, chunk)


def _record_starts(monkeypatch) -> list[int]:
    """The chunk each later run starts from (0: the beginning)."""
    starts, original = [], checkpoint.attach

    def attach(*args, **kwargs):
        progress, state, save = original(*args, **kwargs)
        starts.append(0 if progress is None else progress.next_chunk)
        return progress, state, save

    monkeypatch.setattr(checkpoint, "attach", attach)
    return starts


def test_resume_refuses_a_store_without_the_draws(tmp_path, monkeypatch, uninterrupted):
    ckpt, store = str(tmp_path / "ckpt"), str(tmp_path / "store")

    def run(store_dir, resume):
        config = {**RESUME_CONFIG, "checkpoint_dir": ckpt, "store": store_dir}
        return cm.Sampler(linreg, **config).run(0, X, Y, resume=resume)

    with monkeypatch.context() as m:
        interrupt_after(m, 8)
        with pytest.raises(Interrupted):
            run(store, False)
    assert checkpoint.load(ckpt).progress["filled"] == 20
    with pytest.raises(ValueError, match="draws kept so far are not in the check"):
        run(None, True)  # the old code resumed with draws [0, 20) all zeros
    with pytest.raises(ValueError, match=f"pass store='{tmp_path}.*store'"):
        run(str(tmp_path / "other"), True)
    starts = _record_starts(monkeypatch)
    assert_same_draws(uninterrupted, run(store, True))
    assert starts == [8]


def test_draws_of_a_checkpoint_move_into_a_new_store(
    tmp_path, monkeypatch, uninterrupted
):
    ckpt = str(tmp_path / "ckpt")
    with monkeypatch.context() as m:
        interrupt_after(m, 8)
        with pytest.raises(Interrupted):
            cm.Sampler(linreg, checkpoint_dir=ckpt, **RESUME_CONFIG).run(0, X, Y)
    store = str(tmp_path / "store")
    sampler = cm.Sampler(linreg, checkpoint_dir=ckpt, store=store, **RESUME_CONFIG)
    resumed = sampler.run(0, X, Y, resume=True)
    assert isinstance(resumed.samples["beta"], np.memmap)
    assert_same_draws(uninterrupted, resumed)
    assert "draws.beta" not in np.load(Path(ckpt) / "checkpoint.npz").files


@pytest.mark.parametrize("init", ["feasible", "value"])
def test_callable_init_strategy_resumes_in_a_fresh_process(tmp_path, monkeypatch, init):
    _kill_child(tmp_path, 8, "after", init)
    starts = _record_starts(monkeypatch)
    resumed = checkpoint_child.sampler(str(tmp_path), init).run(0, X, Y, resume=True)
    assert starts == [8]
    assert_same_draws(checkpoint_child.sampler(None, init).run(0, X, Y), resumed)


def _edited(X, y=None):
    """``models.linreg`` with another prior scale, under the same name."""
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1)
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.deterministic("beta_sum", beta.sum())
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


_edited.__module__, _edited.__qualname__ = linreg.__module__, linreg.__qualname__


def _scaled(scale):
    def model(X, y=None):
        beta = numpyro.sample(
            "beta", dist.Normal(0.0, scale).expand([X.shape[1]]).to_event(1)
        )
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)

    return model


def test_resume_refuses_an_edited_model(tmp_path):
    config = {**RESUME_CONFIG, "checkpoint_dir": str(tmp_path)}
    cm.Sampler(linreg, **config).run(0, X, Y)
    with pytest.raises(ValueError, match="cannot resume.*model: checkpoint"):
        cm.Sampler(_edited, **config).run(0, X, Y, resume=True)


def test_resume_refuses_a_closure_over_other_constants(tmp_path, monkeypatch):
    config = {**RESUME_CONFIG, "checkpoint_dir": str(tmp_path)}
    cm.Sampler(_scaled(1.0), **config).run(0, X, Y)
    with pytest.raises(ValueError, match="cannot resume.*model: checkpoint"):
        cm.Sampler(_scaled(2.0), **config).run(0, X, Y, resume=True)
    starts = _record_starts(monkeypatch)
    cm.Sampler(_scaled(1.0), **config).run(0, X, Y, resume=True)  # same code
    assert starts == [12]


def test_identity_sees_code_constants_and_closures():
    def outer(k):
        def f(x):
            def g(y):
                return y + 1.5

            return g(x) * k

        return f

    same = identity.digest(outer(np.ones(3)))
    assert identity.digest(outer(np.ones(3))) == same  # equal content
    assert identity.digest(outer(np.zeros(3))) != same  # array content
    assert identity.digest(outer(outer)) != identity.digest(outer(linreg))
    assert identity.digest(_scaled(1.0)) != identity.digest(_scaled(1))
    assert identity.digest(_edited) != identity.digest(linreg)
    text = str(identity.describe(checkpoint_child.INITS["value"]))
    assert "0x" not in text and "init_to_value" in text


def test_concurrent_write_probes_do_not_collide(tmp_path, monkeypatch):
    original, nested = checkpoint._atomic_write, []

    def atomic_write(path, write):
        def write_then_interleave(f):
            write(f)
            if not nested:  # another process probes the same directory now
                nested.append(path.name)
                checkpoint.check_writable(tmp_path, 0)

        original(path, write_then_interleave)

    monkeypatch.setattr(checkpoint, "_atomic_write", atomic_write)
    checkpoint.check_writable(tmp_path, 0)
    assert nested and list(tmp_path.iterdir()) == []


def shifted(a=0, b=0, mask=None):
    """Static ints under two names: ``a=50`` and ``b=50`` are other posteriors."""
    mu = numpyro.sample("mu", dist.Normal(a - b, 1.0))
    with numpyro.handlers.mask(mask=True if mask is None else mask):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=0.0)


@pytest.mark.slow  # 15-17 s; the quick run keeps the other refusals
def test_resume_refuses_arguments_under_other_names(tmp_path, monkeypatch):
    sampler = cm.Sampler(shifted, checkpoint_dir=str(tmp_path), **RESUME_CONFIG)
    sampler.run(0, a=50)
    with pytest.raises(ValueError, match="cannot resume.*data"):
        sampler.run(0, b=50, resume=True)
    with pytest.raises(ValueError, match="cannot resume.*data"):
        sampler.run(0, a=50, mask=None, resume=True)
    starts = _record_starts(monkeypatch)
    sampler.run(0, 50, resume=True)  # by position: the same call
    assert starts == [12]


class Scale:
    """A static object without ``__dict__`` (its repr is the same for all)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def scaled_linreg(X, y, scale):
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, scale.value).expand([X.shape[1]]).to_event(1)
    )
    numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


@pytest.mark.slow  # 27 s
def test_resume_refuses_other_static_contents(tmp_path):
    config = {**RESUME_CONFIG, "checkpoint_dir": str(tmp_path)}
    cm.Sampler(scaled_linreg, **config).run(0, X, Y, Scale(1.0))
    with pytest.raises(ValueError, match="cannot resume.*data"):
        cm.Sampler(scaled_linreg, **config).run(0, X, Y, Scale(2.0), resume=True)
    one = np.linspace(0.0, 1.0, 2000, dtype=np.float32)
    other = one.copy()
    other[1000] += 1.0  # elided from the repr
    cm.Sampler(functools.partial(design_model, design=Design(one)), **config).run(0)
    model = functools.partial(design_model, design=Design(other))
    with pytest.raises(ValueError, match="cannot resume.*model"):
        cm.Sampler(model, **config).run(0, resume=True)


class CallableLinreg:
    """A model as a callable object."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, X, y=None):
        beta = numpyro.sample(
            "beta", dist.Normal(0.0, self.scale).expand([X.shape[1]]).to_event(1)
        )
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


class _EditedCallable:
    """``CallableLinreg`` with another ``__call__``, under the same name."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, X, y=None):
        beta = numpyro.sample(
            "beta", dist.Normal(0.0, 2 * self.scale).expand([X.shape[1]]).to_event(1)
        )
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


_EditedCallable.__qualname__ = _EditedCallable.__name__ = CallableLinreg.__name__


@pytest.mark.slow  # 15-17 s; the quick run keeps the other refusals
def test_resume_refuses_a_callable_object_with_edited_code(tmp_path, monkeypatch):
    config = {**RESUME_CONFIG, "checkpoint_dir": str(tmp_path)}
    assert identity.digest(CallableLinreg(1.0)) == identity.digest(CallableLinreg(1.0))
    assert identity.digest(_EditedCallable(1.0)) != identity.digest(CallableLinreg(1.0))
    cm.Sampler(CallableLinreg(1.0), **config).run(0, X, Y)
    with pytest.raises(ValueError, match="cannot resume.*model: checkpoint"):
        cm.Sampler(_EditedCallable(1.0), **config).run(0, X, Y, resume=True)
    starts = _record_starts(monkeypatch)
    cm.Sampler(CallableLinreg(1.0), **config).run(0, X, Y, resume=True)
    assert starts == [12]
