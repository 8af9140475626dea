"""Retrieval (LRA): do two ACL Anthology papers cite each other? Byte-level, two inputs, 2 classes.

Source: ``<lra_release>/tsv_data/new_aan_pairs.{train,eval,test}.tsv`` from LRA's ``lra_release.gz``
(``eval`` is the validation split). Each line is ``label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`` with no
header and no quoting (LRA: ``make_csv_dataset(column_names=[label, id1, id2, text1, text2],
field_delim='\\t', use_quote_delim=False, header=False)``); the label is read as a float and cast to an
integer (LRA: ``tf.float32`` then ``tf.cast(..., tf.int32)``), so ``1``, ``1.0`` and ``0`` are accepted and
anything that is not 0 or 1 is an error. Lines end at ``\\n`` (a ``\\r`` before it is dropped); blank lines
are skipped.

Each text is encoded as in the Text task (``lra.data.text.byte_ids``, LRA's byte encoder: byte + 1, 0 =
padding) from the field's raw bytes exactly as they are in the file — the release stores each text as a
Python bytes literal (``b'...'`` with its escapes), and LRA encodes those characters as they stand, so does
this. Each document is cut to ``max_len`` bytes (LRA: 4000; the Nyströmformer harness pads to 4096).

Batches: ``input_ids``/``mask`` (first paper) and ``input_ids_2``/``mask_2`` (second), ``label``; the model
encodes both with one encoder and classifies ``[u, v, u*v, u-v]`` (``dual = True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from lra.data.base import RELEASE_URL, DataError, LRADataModule
from lra.data.text import BYTE_VOCAB, byte_ids, subset_indices

FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}


def _label(field: bytes) -> int | None:
    """LRA's label parse (float, then integer); ``None`` unless it is 0 or 1."""
    try:
        value = float(field)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _pad(texts: list[bytes], max_len: int) -> np.ndarray:
    out = np.zeros((len(texts), max_len), dtype=np.int16)
    for row, text in zip(out, texts, strict=True):
        row[: len(text)] = byte_ids(text, max_len)
    return out


def read_pairs_tsv(path: Path, max_len: int, rows: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """``input_ids``/``input_ids_2`` ``[n, max_len]`` (0-padded byte ids) and ``label`` ``[n]`` of one AAN file.

    ``rows``: keep a fixed random subset of that many pairs (seed ``seed``); ``None`` keeps all.
    Raises ``DataError`` naming the file and line of the first malformed row, or an empty file.
    """
    firsts, seconds, labels = [], [], []
    with open(path, "rb") as f:
        for line_no, line in enumerate(tqdm(f, desc=path.name, unit=" pairs", leave=False, disable=None), 1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if not line.strip():
                continue
            fields = line.split(b"\t")

            def bad(why, line_no=line_no):
                return DataError(
                    f"{path}:{line_no}: malformed Retrieval row ({why}). Each line must be "
                    f"'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2' with label 0 or 1, as in LRA's tsv_data/"
                    f"{path.name}; re-extract the file from {RELEASE_URL} (`lra-data download retrieval --force`)."
                )

            if len(fields) != 5:
                raise bad(f"{len(fields)} tab-separated fields, expected 5")
            label = _label(fields[0])
            if label is None:
                raise bad(f"label {fields[0].decode(errors='replace')!r} is not 0 or 1")
            if not fields[3] or not fields[4]:
                raise bad(f"empty text{1 if not fields[3] else 2}")
            firsts.append(fields[3][:max_len])
            seconds.append(fields[4][:max_len])
            labels.append(label)
    if not labels:
        raise DataError(f"{path}: no rows (empty file). Re-extract it from {RELEASE_URL} "
                        f"(`lra-data download retrieval --force`).")
    keep = subset_indices(len(labels), rows, seed)
    if keep is not None:
        firsts, seconds, labels = [firsts[i] for i in keep], [seconds[i] for i in keep], [labels[i] for i in keep]
    return {"input_ids": _pad(firsts, max_len), "input_ids_2": _pad(seconds, max_len),
            "label": np.asarray(labels, dtype=np.int64)}


class RetrievalDataModule(LRADataModule):
    """AAN document matching (see the module docstring).

    Args:
        lra_release: the extracted ``lra_release/`` folder (holding ``tsv_data/``).
        subset: ``{split: size or None}``: a fixed random subset (seed 0) of each split, for quick runs.
    """

    name = "retrieval"
    num_classes = 2
    vocab_size = BYTE_VOCAB
    dual = True

    def __init__(self, lra_release: str, subset: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        unknown = set(subset or {}) - set(FILES)
        if unknown:
            raise DataError(f"task.subset takes the splits train, val, test; got {sorted(unknown)}.")
        self.release = Path(lra_release)
        self.folder = self.release / "tsv_data"
        self.subset = {k: v for k, v in dict(subset or {}).items() if v is not None}

    def source_files(self) -> list[Path]:
        return [self.folder / FILES[split] for split in ("train", "val", "test")]

    def missing_help(self, missing: list[Path]) -> str:
        where = self.missing_release_files(self.release, missing)
        return (
            f"Retrieval data not found ({where}). Download {RELEASE_URL} (`lra-data download retrieval` does it, "
            f"with resume), extract it and point paths.lra_release (or the LRA_RELEASE environment variable) at the "
            f"extracted lra_release/ folder: it must hold tsv_data/new_aan_pairs.{{train,eval,test}}.tsv."
        )

    def describe_source(self) -> dict:
        return {"source": "release", "folder": str(self.folder)}

    def cache_options(self) -> dict:
        return {"tokenizer": "lra-bytes (utf-8 byte + 1), raw fields", "max_len": self.max_len, "subset": self.subset}

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        return read_pairs_tsv(self.folder / FILES[split], self.max_len, self.subset.get(split))
