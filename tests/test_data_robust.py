"""The data layer under fault injection: concurrent first use, killed prepares. Each test is one finding of a
fault-injection review; the files are tiny and written here in the official formats. (Malformed files:
tests/test_<task>.py; damaged downloads: tests/test_data_cli.py.)"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import time
import traceback

from lra.data.listops import ListOpsDataModule
from lra.data.pathfinder import PathfinderDataModule
from lra.data.retrieval import RetrievalDataModule
from tests.test_retrieval import write_release

TINY_LISTOPS = dict(num_train=40, num_val=8, num_test=8, max_depth=4, max_args=4, min_length=4, max_length=40, seed=1)


# ---- helpers ---------------------------------------------------------------------------------------------------
def together(tmp_path, job, n: int = 2) -> list[str | None]:
    """Run ``job(i)`` in ``n`` real (forked) processes released at the same instant by a barrier; returns each
    one's traceback, or None when it succeeded."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)

    def child(i):
        try:
            barrier.wait(30)
            job(i)
        except BaseException:  # noqa: BLE001 - reported to the parent
            (tmp_path / f"error-{i}.txt").write_text(traceback.format_exc())
            os._exit(1)
        os._exit(0)

    processes = [ctx.Process(target=child, args=(i,)) for i in range(n)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(240)
        if p.exitcode is None:
            p.kill()
            p.join()
    return [None if p.exitcode == 0 else (tmp_path / f"error-{i}.txt").read_text() if
            (tmp_path / f"error-{i}.txt").exists() else f"exit code {p.exitcode}" for i, p in enumerate(processes)]


def slow_renames(delay: float = 0.25) -> None:
    """In a child process: every rename waits first, so that concurrent jobs overlap where they would race."""
    real = os.replace

    def slow(src, dst, *args, **kwargs):
        time.sleep(delay)
        return real(src, dst, *args, **kwargs)

    os.replace = slow


def note(log, word: str) -> None:
    with open(log, "a") as f:
        f.write(word + "\n")


def count(log, word: str) -> int:
    return log.read_text().split().count(word) if log.exists() else 0


def partials(folder) -> list:
    return [p for p in folder.rglob("*") if ".partial" in p.name or ".extracting" in p.name]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def listops(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                batch_size=2, seq_len=40, max_len=40)
    return ListOpsDataModule(**{**args, **kw})


def retrieval(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", cache_dir=tmp_path / "cache", batch_size=2, seq_len=24,
                max_len=20)
    return RetrievalDataModule(**{**args, **kw})


def pathfinder(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                difficulty="easy", batch_size=2, seq_len=1024, max_len=1024, decode_workers=1)
    return PathfinderDataModule(**{**args, **kw})


# ---- 1. concurrent first use --------------------------------------------------------------------------------------
def test_concurrent_first_use_of_generated_listops_generates_and_prepares_once(tmp_path):
    log = tmp_path / "calls.log"

    def job(i):
        import lra.data.listops as module

        slow_renames()
        real_generate, real_read = module.generate, module.read_tsv
        module.generate = lambda *a, **k: (note(log, "generate"), real_generate(*a, **k))[1]
        module.read_tsv = lambda *a, **k: (note(log, "read"), real_read(*a, **k))[1]
        dm = listops(tmp_path, source="generate", generator=TINY_LISTOPS)
        dm.prepare_data()
        dm.setup()
        assert len(dm.datasets["train"]) == 40

    assert together(tmp_path, job) == [None, None]
    assert count(log, "generate") == 1 and count(log, "read") == 3  # the loser waited and reused both
    dm = listops(tmp_path, source="generate", generator=TINY_LISTOPS)
    assert sorted(p.name for p in dm.folder.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    assert [p.name for p in dm.cache_dir.parent.iterdir() if p.is_dir()] == [dm.cache_dir.name]
    assert not partials(tmp_path)


def test_concurrent_prepare_of_the_same_release_renames_once(tmp_path):
    write_release(tmp_path / "lra_release")
    log = tmp_path / "calls.log"

    def job(i):
        import lra.data.retrieval as module

        slow_renames()
        real = module.read_pairs_tsv
        module.read_pairs_tsv = lambda *a, **k: (note(log, "read"), real(*a, **k))[1]
        dm = retrieval(tmp_path)
        dm.prepare_data()  # before: both checked, both renamed, and the second rename failed (ENOTEMPTY)
        dm.setup()
        assert len(dm.datasets["test"]) == 4

    assert together(tmp_path, job) == [None, None]
    assert count(log, "read") == 3
    assert not partials(tmp_path)


def test_concurrent_first_use_of_generated_pathfinder_generates_once(tmp_path):
    log = tmp_path / "calls.log"
    spec = {"num_images": 8, "images_per_file": 4, "seed": 3}

    def job(i):
        import lra.data.pathfinder as module

        slow_renames(0.2)
        real_generate, real_read = module.generate, module.PathfinderDataModule.read_split
        module.generate = lambda *a, **k: (note(log, "generate"), real_generate(*a, **k))[1]
        module.PathfinderDataModule.read_split = lambda self, s: (note(log, "read"), real_read(self, s))[1]
        dm = pathfinder(tmp_path, source="generate", generator=spec)
        dm.prepare_data()
        dm.setup()
        assert sum(len(d) for d in dm.datasets.values()) == 8

    assert together(tmp_path, job) == [None, None]
    assert count(log, "generate") == 1 and count(log, "read") == 3
    assert not partials(tmp_path)


# ---- 2. temporaries of killed processes ------------------------------------------------------------------------
def test_temporaries_of_killed_prepares_and_generators_are_removed(tmp_path):
    write_release(tmp_path / "lra_release")
    dm = retrieval(tmp_path)
    folder = dm.cache_dir.parent
    host, dead = socket.gethostname(), dead_pid()
    stale = [folder / f"0123456789abcdef.partial-{dead}", folder / f"fedcba9876543210.partial-{host}-{dead}"]
    kept = [folder / f"aaaa.partial-{host}-{os.getppid()}",  # its process is alive
            folder / f"bbbb.partial-elsewhere.example-{dead}"]  # another host's (a shared file system): not ours
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "train.label.npy").write_bytes(b"half")
    dm.prepare_data()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)

    generated = listops(tmp_path, source="generate", generator=TINY_LISTOPS).folder
    generated.mkdir(parents=True)
    leftover = generated / f"basic_train.tsv.partial-{host}-{dead}"
    leftover.write_text("Source\tTarget\n( ( [MIN")
    listops(tmp_path, source="generate", generator=TINY_LISTOPS).prepare_data()
    assert not leftover.exists()
