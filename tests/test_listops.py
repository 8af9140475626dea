"""ListOps: the generator against an independent evaluator, LRA tokenisation, caching, bad input."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pytest
import torch

from lra.data import DataError
from lra.data.listops import ROOT_OPERATORS, TOKEN_ID, ListOpsDataModule, read_tsv, root_operator, tokenize
from lra.data.listops_generator import ListOpsSpec, generate


def evaluate_tokens(tokens: list[str]) -> int:
    """Independent evaluator of a tokenised ListOps expression, by a stack (no tree from the generator)."""
    stack: list = []
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "X":
            op, *args = stack.pop()
            value = {
                "[MIN": lambda a: min(a),
                "[MAX": lambda a: max(a),
                "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(statistics.median(a)),
            }[op](args)
            if stack:
                stack[-1].append(value)
            else:
                return value
        else:
            if not stack:
                return int(tok)
            stack[-1].append(int(tok))
    raise AssertionError(f"unbalanced expression {tokens}")


SMALL = ListOpsSpec(num_train=300, num_val=50, num_test=50, max_depth=6, max_args=6, min_length=8, max_length=90,
                    seed=3)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_generator_labels_lengths_splits_and_determinism(tmp_path):
    paths = generate(SMALL, tmp_path / "a", progress=False)
    seen = set()
    for path, size in zip(paths, (300, 50, 50), strict=True):
        data = rows(path)
        assert data[0] == ["Source", "Target"] and len(data) == size + 1
        for source, target in data[1:]:
            tokens = tokenize(source)
            assert SMALL.min_length < len(tokens) < SMALL.max_length
            assert evaluate_tokens(tokens) == int(target)
            assert source not in seen
            seen.add(source)
    again = generate(SMALL, tmp_path / "b", progress=False)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again, strict=True))
    other = generate(ListOpsSpec(**{**SMALL.as_dict(), "seed": 4}), tmp_path / "c", progress=False)
    assert paths[0].read_bytes() != other[0].read_bytes()


def test_tokenisation_of_a_handwritten_release_file(tmp_path):
    path = tmp_path / "basic_test.tsv"
    path.write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n( ( ( ( [SM 4 ) ( ( ( [MIN 7 ) 3 ) ] ) ) 5 ) ] )\t2\n")
    arrays = read_tsv(path, max_len=6)
    ids = [TOKEN_ID[t] for t in ["[MAX", "2", "9", "X"]]
    np.testing.assert_array_equal(arrays["input_ids"][0], ids + [0, 0])
    expected = [TOKEN_ID[t] for t in ["[SM", "4", "[MIN", "7", "3", "X"]]  # cut to max_len=6
    np.testing.assert_array_equal(arrays["input_ids"][1], expected)
    np.testing.assert_array_equal(arrays["label"], [9, 2])
    assert tokenize("( ( [MIN 1 ) ] )") == ["[MIN", "1", "X"]


def outermost_operator(tokens: list[str]) -> str:
    """The operator whose list closes last (the one left when the stack empties), or "none" for a bare digit."""
    stack, last = [], "none"
    for tok in tokens:
        if tok.startswith("["):
            stack.append(tok[1:])
        elif tok == "X":
            last = stack.pop()
    return last


def test_root_operator_of_generated_and_handwritten_rows(tmp_path):
    """``lra-eval``'s ListOps breakdown: the group of each row is its outermost operator."""
    path = generate(SMALL, tmp_path, progress=False)[2]
    handwritten = tmp_path / "basic_val.tsv"
    handwritten.write_text("Source\tTarget\n( ( [MAX 2 ) ( ( [MIN 4 ) 7 ) ] ) ] )\t4\n7\t7\n"
                           "( ( ( [MED 1 ) ( ( [SM 5 ) 8 ) ] ) ) ] )\t2\n")
    for tsv in (path, handwritten):
        ids = torch.from_numpy(read_tsv(tsv, max_len=SMALL.max_length)["input_ids"].astype(np.int64))
        groups = [ROOT_OPERATORS[g] for g in root_operator({"input_ids": ids}).tolist()]
        assert groups == [outermost_operator(tokenize(source)) for source, _ in rows(tsv)[1:]]
    assert groups == ["MAX", "none", "MED"]
    assert all(evaluate_tokens(tokenize(source)) == int(label) for source, label in rows(handwritten)[1:])


@pytest.mark.parametrize(
    "content,match",
    [
        ("Source\tTarget\n( ( [MIN 1 ) ] )\t1\n( ( [MIN 1 ) ] )\n", r"basic_train.tsv:3: .*1 tab-separated fields"),
        ("Source\tTarget\n( ( [MIN 1 ) ] )\t12\n", r"basic_train.tsv:2: .*label '12'"),
        ("Source\tTarget\n( ( [MIN 1 ) ] )\tseven\n", r"basic_train.tsv:2: .*label 'seven'"),
        ("Source\tTarget\n( ( [FOO 1 ) ] )\t1\n", r"basic_train.tsv:2: .*unknown tokens \['\[FOO'\]"),
        ("Src\tTgt\n", r"basic_train.tsv:1: expected the header"),
        ("Source\tTarget\n", r"basic_train.tsv: no rows"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "basic_train.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_tsv(path, max_len=10)


def _module(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                batch_size=4, seq_len=16, max_len=16)
    return ListOpsDataModule(**{**args, **kw})


def test_missing_release_root_and_missing_split(tmp_path):
    with pytest.raises(DataError, match=r"lra_release does not exist.*task.source=generate"):
        _module(tmp_path).prepare_data()
    folder = tmp_path / "lra_release" / "listops-1000"
    folder.mkdir(parents=True)
    (folder / "basic_train.tsv").write_text("Source\tTarget\n( ( [MIN 1 ) ] )\t1\n")
    with pytest.raises(DataError, match=r"missing: .*basic_val.tsv, .*basic_test.tsv"):
        _module(tmp_path).prepare_data()
    (folder / "basic_val.tsv").mkdir()
    with pytest.raises(DataError, match=r"missing: .*basic_val.tsv \(a folder, not a file\), .*basic_test.tsv"):
        _module(tmp_path).prepare_data()


def test_release_files_prepare_once_into_a_keyed_cache(tmp_path):
    generate(SMALL, tmp_path / "lra_release" / "listops-1000", progress=False)
    dm = _module(tmp_path, max_len=90, seq_len=96)
    dm.prepare_data()
    meta = dm.cache_dir / "meta.json"
    stamp = meta.stat().st_mtime_ns
    dm2 = _module(tmp_path, max_len=90, seq_len=96)
    dm2.prepare_data()
    assert dm2.cache_dir == dm.cache_dir and meta.stat().st_mtime_ns == stamp
    assert _module(tmp_path, max_len=50).cache_dir != dm.cache_dir  # options key the cache
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape == (4, 96) and batch["mask"].dtype.is_floating_point is False
    assert (batch["mask"] == (batch["input_ids"] != 0)).all()
    assert {len(d) for d in dm.datasets.values()} == {300, 50}
    assert dm.describe_source()["source"] == "release"


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, monkeypatch):
    generate(SMALL, tmp_path / "lra_release" / "listops-1000", progress=False)
    dm = _module(tmp_path)
    real = dm.read_split

    def crash_on_test(split):
        if split == "test":
            raise KeyboardInterrupt
        return real(split)

    monkeypatch.setattr(dm, "read_split", crash_on_test)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert not dm.cache_dir.exists()
    monkeypatch.undo()
    dm.prepare_data()
    assert (dm.cache_dir / "meta.json").is_file()


def test_generate_source_is_announced_and_labelled(tmp_path, capsys):
    dm = _module(tmp_path, source="generate", generator=SMALL.as_dict(), max_len=90, seq_len=96)
    dm.prepare_data()
    assert "generating ListOps" in capsys.readouterr().out
    assert dm.describe_source()["source"] == "generated"
    with pytest.raises(DataError, match="task.source must be"):
        _module(tmp_path, source="download")


# ---- robustness: bytes and labels the reader must refuse or skip ----
@pytest.mark.parametrize("content,match", [
    (b"Source\tTarget\n( ( [MIN 1 ) ] )\t1\n( ( [MAX \xff 2 ) ] )\t2\n",
     r"basic_train.tsv:3: malformed ListOps row \(not UTF-8 text: byte 0xff at column 10\).*download listops --force"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t\u00b2\n".encode(), r"basic_train.tsv:2: .*label '\u00b2'"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t\u0663\n".encode(), r"basic_train.tsv:2: .*label '\u0663'"),
    ("Source\tTarget\n( ( [MIN 1 ) ] )\t\uff11\n".encode(), r"basic_train.tsv:2: .*label '\uff11'"),
    (b"", r"basic_train.tsv: empty file"),
])
def test_listops_reader_names_file_and_line_of_bad_bytes_and_labels(tmp_path, content, match):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_tsv(path, max_len=10)


def test_a_damaged_file_s_fix_is_the_one_for_its_source(tmp_path):
    """A malformed release file points at re-extracting the release, never at deleting it; a malformed generated
    file at deleting its generated folder and generating again."""
    release = tmp_path / "lra_release" / "listops-1000"
    generate(SMALL, release, progress=False)
    generated = _module(tmp_path, source="generate", generator=SMALL.as_dict())
    generated.prepare_data()
    for folder, dm in ((release, _module(tmp_path, cache_dir=tmp_path / "c1")),
                       (generated.folder, _module(tmp_path, source="generate", generator=SMALL.as_dict(),
                                                  cache_dir=tmp_path / "c2"))):
        with open(folder / "basic_val.tsv", "a") as f:
            f.write("( ( [MIN 1 ) ] )\tseven\n")
        with pytest.raises(DataError) as err:
            dm.prepare_data()
        message = str(err.value)
        assert "basic_val.tsv" in message and "label 'seven'" in message
        if folder == release:
            assert "lra-data download listops --force" in message and "delete" not in message
        else:
            assert f"delete {folder} and run `lra-data generate listops`" in message and "download" not in message


def test_listops_reader_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes("\ufeffSource\tTarget\n( ( [MIN 1 ) ] )\t1\n".encode())
    assert read_tsv(path, max_len=4)["label"].tolist() == [1]


def test_listops_reader_skips_blank_lines(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(b"Source\tTarget\r\n( ( [MIN 1 ) ] )\t1\r\n\r\n( ( [MAX 3 ) ] )\t3\n\n")
    assert read_tsv(path, max_len=4)["label"].tolist() == [1, 3]
