"""ListOps (LRA): nested list operations over digits, 10 classes, up to 2000 tokens.

Sources (``source`` option):

* ``release``: ``<lra_release>/listops-1000/basic_{train,val,test}.tsv`` from LRA's ``lra_release.gz``;
* ``generate``: the same files made by the built-in LRA generator (``lra.data.listops_generator``) under
  ``<data_dir>/generated/listops-<hash of the generator options>/``, generated on first use (announced,
  with a progress bar; one job generates, concurrent ones wait for it) and reused afterwards.

Tokenisation follows LRA's input pipeline after its bracket fix: ``]`` becomes ``X``, ``(`` and ``)`` are
removed, the rest is split on whitespace; inputs are cut to ``max_len`` (2000). LRA builds its vocabulary
from the data with an arbitrary order; here it is fixed: id 0 = padding, then ``VOCAB`` in order (the
four drawn operators, the two upstream-defined ones, ``X`` and the digits). The vocabulary is closed, so
an unknown token is reported as a malformed row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lra.data import store
from lra.data.base import RELEASE_URL, DataError, LRADataModule
from lra.data.listops_generator import ListOpsSpec, generate

VOCAB = ("[MIN", "[MAX", "[MED", "[SM", "[FIRST", "[LAST", "X", *map(str, range(10)))
TOKEN_ID = {token: i + 1 for i, token in enumerate(VOCAB)}
ROOT_OPERATORS = (*(op[1:] for op in VOCAB[:6]), "none")  # "none": a row without an operator (a bare digit)


def root_operator(batch: dict) -> torch.Tensor:
    """Index into ``ROOT_OPERATORS`` of each row's root operator, ``[B]``: its first token, as brackets are removed
    and the expression is written prefix (``( ( ( [MAX 2 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )`` -> MAX)."""
    first, operators = batch["input_ids"][:, 0], len(ROOT_OPERATORS) - 1
    return torch.where((first >= 1) & (first <= operators), first - 1, operators)


def generated_folder(data_dir: str | Path, spec: ListOpsSpec) -> Path:
    """Where ``source=generate`` keeps the files made for ``spec`` (one folder per distinct spec)."""
    key = hashlib.sha1(json.dumps(spec.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / "generated" / f"listops-{key}"


def tokenize(source: str) -> list[str]:
    """LRA's ListOps tokenisation (after the upstream fix for dropped closing brackets)."""
    return source.replace("]", "X").replace("(", "").replace(")", "").split()


RELEASE_FIX = "Fix the file, or get it again: `lra-data download listops --force` re-extracts the release."


def generated_fix(folder: Path) -> str:
    """How to remake a damaged file of generated ListOps in ``folder``."""
    return (f"Fix the file, or make the data again: delete {folder} and run `lra-data generate listops` (or train: "
            f"it regenerates).")


def read_tsv(path: Path, max_len: int, fix: str = RELEASE_FIX) -> dict[str, np.ndarray]:
    """Token ids ``[n, max_len]`` (0-padded) and labels ``[n]`` of one ListOps TSV file.

    The file is UTF-8 text (a leading byte-order mark is allowed): a ``Source<TAB>Target`` header, then
    ``<expression><TAB><label>`` rows (no quoting; ``\\r\\n`` line ends are accepted), the label one ASCII digit
    0-9. Blank lines are skipped. Raises ``DataError`` naming the file and line of the first malformed row, ending
    with ``fix`` (how to get the file again: the release's by default).
    """
    ids, labels, header = [], [], False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):

            def bad(why, line_no=line_no):
                return DataError(f"{path}:{line_no}: malformed ListOps row ({why}). Each row must be "
                                 f"'<expression><TAB><label 0-9>' after the 'Source<TAB>Target' header. {fix}")

            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as err:
                raise bad(f"not UTF-8 text: byte {raw[err.start]:#04x} at column {err.start + 1}") from None
            row = line.split("\t")
            if line_no == 1:
                if row != ["Source", "Target"]:
                    raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', found {line[:60]!r}. {fix}")
                header = True
                continue
            if not line.strip():
                continue
            if len(row) != 2:
                raise bad(f"{len(row)} tab-separated fields")
            source, target = row
            label = target.strip()
            if not (label.isascii() and label.isdigit() and int(label) <= 9):  # str.isdigit alone takes '²', '٣'
                raise bad(f"label {target!r} is not an integer 0-9 in ASCII digits")
            tokens = tokenize(source)
            unknown = sorted({t for t in tokens if t not in TOKEN_ID})
            if unknown or not tokens:
                raise bad(f"unknown tokens {unknown[:5]}" if unknown else "empty expression")
            ids.append([TOKEN_ID[t] for t in tokens[:max_len]])
            labels.append(int(label))
    if not labels:
        raise DataError(f"{path}: {'no rows after the header' if header else 'empty file'}. {fix}")
    out = np.zeros((len(ids), max_len), dtype=np.uint8)
    for row, seq in zip(out, ids, strict=True):
        row[: len(seq)] = seq
    return {"input_ids": out, "label": np.asarray(labels, dtype=np.int64)}


class ListOpsDataModule(LRADataModule):
    """ListOps datamodule. ``generator`` holds ``ListOpsSpec`` fields for ``source=generate``."""

    name = "listops"
    num_classes = 10
    vocab_size = len(VOCAB) + 1

    def __init__(
        self,
        lra_release: str,
        data_dir: str,
        source: str = "release",
        generator: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if source not in ("release", "generate"):
            raise DataError(f"task.source must be 'release' or 'generate', got {source!r}.")
        self.source, self.release = source, Path(lra_release)
        self.spec = ListOpsSpec(**(generator or {}))
        self.folder = self.release / "listops-1000" if source == "release" else generated_folder(data_dir, self.spec)

    def source_files(self) -> list[Path]:
        return [self.folder / f"basic_{split}.tsv" for split in ("train", "val", "test")]

    def missing_help(self, missing: list[Path]) -> str:
        where = self.missing_release_files(self.release, missing)
        return (
            f"ListOps data not found ({where}). Either download {RELEASE_URL}, extract it and point "
            f"paths.lra_release at the extracted lra_release/ folder (it must hold listops-1000/basic_"
            f"{{train,val,test}}.tsv), or train on ListOps made by the built-in LRA generator with "
            f"`task.source=generate` (it generates a full-size set on first use; `lra-data generate listops` "
            f"does it ahead of time). Runs on generated data are labelled so in the records and tables."
        )

    def ensure_sources(self) -> None:
        """``source=generate``: generate the files once, under the folder's inter-process lock (a concurrent
        job waits, then reuses them)."""
        if self.source == "generate":

            def make():
                print(f"[lra] generating ListOps with the LRA algorithm into {self.folder} ({self.spec})")
                generate(self.spec, self.folder)

            store.make_once(self.folder, lambda: all(p.is_file() for p in self.source_files()), make,
                            f"generating ListOps into {self.folder}")
        super().ensure_sources()

    def describe_source(self) -> dict:
        if self.source == "release":
            return {"source": "release", "folder": str(self.folder)}
        return {"source": "generated", "folder": str(self.folder), "generator": self.spec.as_dict()}

    def cache_options(self) -> dict:
        return {"tokenizer": "lra-listops-bracket-fix", "vocab": VOCAB, "max_len": self.max_len}

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        fix = RELEASE_FIX if self.source == "release" else generated_fix(self.folder)
        return read_tsv(self.folder / f"basic_{split}.tsv", self.max_len, fix)

    def breakdown(self):
        return "root operator", ROOT_OPERATORS, root_operator
