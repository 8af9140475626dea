"""The data layer under fault injection: concurrent first use, killed prepares, edits that keep size and date,
deleted sources. Each test is one finding of a fault-injection review; the files are tiny and written here in the
official formats. (Malformed files: tests/test_<task>.py; damaged downloads: tests/test_data_cli.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
import types

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from lra.data import DataError
from lra.data.listops import ListOpsDataModule
from lra.data.pathfinder import PathfinderDataModule
from lra.data.pathfinder_generator import encode_png
from lra.data.retrieval import RetrievalDataModule
from lra.data.text import TextDataModule
from tests.test_pathfinder import _release
from tests.test_retrieval import write_release

TINY_LISTOPS = dict(num_train=40, num_val=8, num_test=8, max_depth=4, max_args=4, min_length=4, max_length=40, seed=1)
LISTOPS_ROWS = "Source\tTarget\n( ( [MAX 2 ) 9 ) ] )\t9\n( ( [MIN 4 ) 7 ) ] )\t4\n( ( [SM 3 ) 5 ) ] )\t8\n"


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


def listops_release(tmp_path, text=LISTOPS_ROWS):
    folder = tmp_path / "lra_release" / "listops-1000"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text(text)
    return folder


def retrieval(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", cache_dir=tmp_path / "cache", batch_size=2, seq_len=24,
                max_len=20)
    return RetrievalDataModule(**{**args, **kw})


def pathfinder(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                difficulty="easy", batch_size=2, seq_len=1024, max_len=1024, decode_workers=1)
    return PathfinderDataModule(**{**args, **kw})


def text(tmp_path, **kw):
    args = dict(data_dir=tmp_path / "data", hub_path=None, cache_dir=tmp_path / "cache", batch_size=2, seq_len=8,
                max_len=6)
    return TextDataModule(**{**args, **kw})


def edit_keeping_size_and_mtime(path, old: bytes, new: bytes) -> None:
    """Rewrite ``path`` with ``old`` replaced by ``new`` (same length) and put its mtime back (as ``tar``,
    ``rsync -t`` or ``cp -p`` would leave it)."""
    assert len(old) == len(new)
    before = path.stat()
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


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


# ---- 3. the cache is keyed by content ----------------------------------------------------------------------------
def test_same_size_edit_with_the_old_mtime_is_not_trusted(tmp_path):
    folder = listops_release(tmp_path)
    dm = listops(tmp_path)
    dm.setup()
    assert dm.datasets["test"].arrays["label"].tolist() == [9, 4, 8]
    edit_keeping_size_and_mtime(folder / "basic_test.tsv", b"] )\t9\n", b"] )\t7\n")
    again = listops(tmp_path)
    assert again.cache_dir != dm.cache_dir
    again.setup()
    assert again.datasets["test"].arrays["label"].tolist() == [7, 4, 8]


def test_unchanged_sources_are_only_stated_and_ctime_changes_rehash(tmp_path, monkeypatch):
    from lra.data import store

    monkeypatch.setattr(store, "RACY_WINDOW_NS", 0)  # files written just now may be remembered at once
    folder = listops_release(tmp_path)
    key = listops(tmp_path).cache_dir
    index = json.loads((key.parent / "fingerprints.json").read_text())["files"]
    assert sorted(index[str(folder)]) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    hashed = []
    real = store.hash_file
    monkeypatch.setattr(store, "hash_file", lambda path: (hashed.append(path), real(path))[1])
    assert listops(tmp_path).cache_dir == key and hashed == []  # a stat per file, no read
    os.chmod(folder / "basic_val.tsv", 0o600)  # changes ctime only: hashed again, same content, same key
    assert listops(tmp_path).cache_dir == key and [p.name for p in hashed] == ["basic_val.tsv"]


def test_pathfinder_key_covers_the_images(tmp_path):
    root = _release(tmp_path, num_images=20)
    dm = pathfinder(tmp_path)
    dm.setup()
    image = root / "imgs" / "0" / "sample_3.png"
    other = np.full((32, 32), 77, np.uint8)
    before = image.stat()
    image.write_bytes(encode_png(other))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = pathfinder(tmp_path)
    assert again.cache_dir != dm.cache_dir  # before: only the metadata files' sizes and dates keyed it
    again.setup()
    rows = [str(again.index()[i][0]) for s in ("train", "val", "test") for i in again.split_rows(s)]
    stored = np.concatenate([np.asarray(again.datasets[s].arrays["input_ids"]) for s in ("train", "val", "test")])
    assert (stored[rows.index(str(image))] == 77).all()


def test_hub_key_includes_the_datasets_fingerprint(tmp_path, monkeypatch):
    import datasets

    def hub(train_texts):
        return DatasetDict(train=Dataset.from_dict({"text": train_texts, "label": [0, 1]}),
                           test=Dataset.from_dict({"text": ["t1", "t2"], "label": [1, 0]}))

    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub(["good", "bad"]))
    first = text(tmp_path)
    first.setup()
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub(["good", "BAD"]))  # the hub copy changed
    second = text(tmp_path)
    assert second.cache_dir != first.cache_dir
    second.setup()
    assert second.datasets["train"].arrays["input_ids"][1].tolist()[:3] == [ord(c) + 1 for c in "BAD"]
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub(["good", "bad"]))
    assert text(tmp_path).cache_dir == first.cache_dir


def test_tfds_key_includes_the_prepared_files(tmp_path, monkeypatch):
    prepared = tmp_path / "tfds" / "imdb_reviews" / "plain_text" / "1.0.0"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text('{"name": "imdb_reviews"}')
    shard = prepared / "imdb_reviews-train.tfrecord-00000-of-00001"
    shard.write_bytes(b"records: good bad")
    fake = types.SimpleNamespace(
        builder=lambda name, data_dir: types.SimpleNamespace(data_dir=str(prepared), version="1.0.0"),
        load=lambda *a, **k: pytest.fail("not loaded to key the cache"), as_numpy=lambda x: x)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    key = text(tmp_path, source="tfds", tfds_dir=str(tmp_path / "tfds")).cache_dir
    edit_keeping_size_and_mtime(shard, b"bad", b"BAD")
    assert text(tmp_path, source="tfds", tfds_dir=str(tmp_path / "tfds")).cache_dir != key


# ---- 4. deleted sources ------------------------------------------------------------------------------------------
def test_setup_on_a_cache_whose_sources_were_deleted_names_them(tmp_path):
    folder = listops_release(tmp_path)
    listops(tmp_path).prepare_data()
    (folder / "basic_val.tsv").unlink()
    with pytest.raises(DataError, match=r"missing: \S*basic_val.tsv\).*lra_release.gz.*task.source=generate"):
        listops(tmp_path).setup()


def test_setup_regenerates_deleted_generated_sources_and_names_a_damaged_cache(tmp_path):
    dm = listops(tmp_path, source="generate", generator=TINY_LISTOPS)
    dm.prepare_data()
    (dm.folder / "basic_val.tsv").unlink()
    again = listops(tmp_path, source="generate", generator=TINY_LISTOPS)
    again.setup()  # generated again (same seed, same content): the same cache serves
    assert again.cache_dir == dm.cache_dir and (dm.folder / "basic_val.tsv").is_file()
    (dm.cache_dir / "test.label.npy").unlink()
    with pytest.raises(DataError, match=r"the prepared test arrays are missing. Delete that folder and run again"):
        listops(tmp_path, source="generate", generator=TINY_LISTOPS).setup()
