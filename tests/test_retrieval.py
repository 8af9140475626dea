"""Retrieval: the release TSV format, byte ids of both papers, pairs in batches, caching, bad input, a smoke run."""

from __future__ import annotations

import numpy as np
import pytest

import lra.train
from lra.data import DataError
from lra.data.retrieval import RetrievalDataModule, read_pairs_tsv

# Rows as in LRA's tsv_data/new_aan_pairs.*.tsv: label, two paper ids, two texts stored as bytes literals.
ROWS = [
    ("1", "P01-1001", "W05-0102", "b'Parsing with CCG.'", "b'We parse \\xc3\\xa9.'"),
    ("0.0", "P02-1002", "J93-2004", "b'Tagging'", "b'Statistical alignment'"),
    ("1.0", "N03-1003", "P97-1005", "b'Machine translation'", "b'Phrase tables'"),
    ("0", "D04-1004", "C96-2001", "b'Coreference'", "b'Discourse'"),
]


def write_release(root, rows=ROWS, splits=("train", "eval", "test")):
    """Write the three AAN files under ``root/tsv_data`` (the extracted lra_release/ layout)."""
    folder = root / "tsv_data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"new_aan_pairs.{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return root


def ids_of(text: str, max_len: int) -> list[int]:
    ids = [b + 1 for b in text.encode("utf-8")][:max_len]  # LRA's byte encoder: byte + 1, 0 = padding
    return ids + [0] * (max_len - len(ids))


def module(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", cache_dir=tmp_path / "cache", batch_size=2, seq_len=24,
                max_len=20)
    return RetrievalDataModule(**{**args, **kw})


def test_both_papers_byte_encoded_from_the_raw_fields(tmp_path):
    write_release(tmp_path)
    arrays = read_pairs_tsv(tmp_path / "tsv_data" / "new_aan_pairs.train.tsv", max_len=20)
    np.testing.assert_array_equal(arrays["input_ids"], [ids_of(r[3], 20) for r in ROWS])
    np.testing.assert_array_equal(arrays["input_ids_2"], [ids_of(r[4], 20) for r in ROWS])
    np.testing.assert_array_equal(arrays["label"], [1, 0, 1, 0])
    assert arrays["input_ids"][0, :3].tolist() == [ord("b") + 1, ord("'") + 1, ord("P") + 1]  # b'...' kept as is
    assert arrays["input_ids_2"][0, 11:13].tolist() == [ord("\\") + 1, ord("x") + 1]  # escapes stay literal
    assert len(ROWS[0][4]) == 21 and arrays["input_ids_2"][0, -1] == ord(".") + 1  # cut to 20 bytes


def test_line_endings_and_blank_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"1\ta\tb\tx y\tz\r\n\n0\tc\td\tu\tv w\n")
    arrays = read_pairs_tsv(path, max_len=4)
    np.testing.assert_array_equal(arrays["input_ids"], [ids_of("x y", 4), ids_of("u", 4)])
    np.testing.assert_array_equal(arrays["input_ids_2"], [ids_of("z", 4), ids_of("v w", 4)])


@pytest.mark.parametrize(
    "content,match",
    [
        ("1\ta\tb\tx\ty\n0\ta\tb\tx\n", r"pairs.tsv:2: .*4 tab-separated fields, expected 5"),
        ("2\ta\tb\tx\ty\n", r"pairs.tsv:1: .*label '2' is not 0 or 1"),
        ("0.5\ta\tb\tx\ty\n", r"pairs.tsv:1: .*label '0.5' is not 0 or 1"),
        ("label\tid1\tid2\ttext1\ttext2\n", r"pairs.tsv:1: .*label 'label' is not 0 or 1"),
        ("1\ta\tb\tx\ty\n1\ta\tb\t\ty\n", r"pairs.tsv:2: .*empty text1"),
        ("", r"pairs.tsv: no rows \(empty file\)"),
        ("\n\n", r"pairs.tsv: no rows \(empty file\)"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "pairs.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_pairs_tsv(path, max_len=8)


def test_missing_release_root_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"lra_release does not exist.*lra-data download retrieval"):
        module(tmp_path).prepare_data()
    write_release(tmp_path / "lra_release", splits=("train",))
    with pytest.raises(DataError, match=r"missing: \S*new_aan_pairs.eval.tsv, \S*new_aan_pairs.test.tsv\)"):
        module(tmp_path).prepare_data()


def test_batches_carry_both_papers_and_validation_is_the_eval_file(tmp_path):
    root = write_release(tmp_path / "lra_release")
    (root / "tsv_data" / "new_aan_pairs.eval.tsv").write_text("1\ta\tb\tfirst\tsecond paper\n")
    dm = module(tmp_path)
    assert dm.dual and dm.vocab_size == 257
    dm.prepare_data()
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 4, "val": 1, "test": 4}
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "mask", "input_ids_2", "mask_2", "label"}
    assert batch["input_ids"].tolist() == [ids_of("first", 24)] and batch["input_ids_2"].tolist() == [
        ids_of("second paper", 24)]
    assert batch["mask"].sum() == 5 and batch["mask_2"].sum() == 12 and batch["label"].tolist() == [1]


def test_prepares_once_subsets_and_keys_the_cache(tmp_path):
    write_release(tmp_path / "lra_release")
    dm = module(tmp_path)
    dm.prepare_data()
    stamp = (dm.cache_dir / "meta.json").stat().st_mtime_ns
    module(tmp_path).prepare_data()
    assert (dm.cache_dir / "meta.json").stat().st_mtime_ns == stamp
    small = module(tmp_path, subset={"train": 2})
    assert small.cache_dir != dm.cache_dir and module(tmp_path, max_len=10).cache_dir != dm.cache_dir
    train = small.read_split("train")
    assert len(train["label"]) == 2
    np.testing.assert_array_equal(train["input_ids"], module(tmp_path, subset={"train": 2}).read_split("train")[
        "input_ids"])
    with pytest.raises(DataError, match="task.subset takes the splits"):
        module(tmp_path, subset={"eval": 2})


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, monkeypatch):
    write_release(tmp_path / "lra_release")
    dm = module(tmp_path)
    real = dm.read_split

    def crash_on_test(split):
        if split == "test":
            raise OSError("disk full")
        return real(split)

    monkeypatch.setattr(dm, "read_split", crash_on_test)
    with pytest.raises(OSError):
        dm.prepare_data()
    assert not dm.cache_dir.exists()
    monkeypatch.undo()
    dm.setup()  # prepares, as nothing was trusted
    assert (dm.cache_dir / "meta.json").is_file() and len(dm.datasets["test"]) == 4


def test_fast_dev_run_trains_the_dual_encoder(make_cfg, tmp_path):
    write_release(tmp_path / "lra_release")
    cfg = make_cfg("task=retrieval", f"paths.lra_release={tmp_path / 'lra_release'}", "protocol=quick",
                   "task.max_len=16", "data.seq_len=16", "data.batch_size=2", "trainer.fast_dev_run=true")
    record = lra.train.run(cfg)
    assert record["task"] == "retrieval" and 0 <= record["test_acc"] <= 1
    assert record["data"]["source"] == "release" and record["data"]["sizes"] == {"train": 4, "val": 4, "test": 4}


@pytest.mark.parametrize("content,match", [
    (b"\xff\ta\tb\tx\ty\n", r"pairs.tsv:1: .*label '\ufffd' is not 0 or 1"),
    ("\u0661\ta\tb\tx\ty\n".encode(), r"pairs.tsv:1: .*label '\u0661' is not 0 or 1"),
])
def test_retrieval_reader_refuses_non_ascii_labels(tmp_path, content, match):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_pairs_tsv(path, max_len=8)


def test_retrieval_reader_keeps_raw_bytes_and_skips_blank_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"1\ta\tb\tx\xff\ty\n\n\n")  # texts are bytes, as LRA encodes them: not UTF-8 is fine
    arrays = read_pairs_tsv(path, max_len=3)
    assert arrays["input_ids"].tolist() == [[ord("x") + 1, 256, 0]] and arrays["label"].tolist() == [1]
