"""The LRA ListOps generator (Nangia & Bowman 2018, as extended by Tay et al. for LRA).

Algorithm of ``lra_benchmarks/data/listops.py``, re-implemented with a seeded ``random.Random``:

* a node at depth ``d < max_depth`` is an operator with probability ``VALUE_P = 0.25``, else a digit
  0-9 (at ``max_depth`` always a digit);
* an operator node draws one of ``[MIN [MAX [MED [SM`` and ``2..max_args`` children; its token length is
  2 (operator and ``]``) plus its children's;
* a tree is kept when ``min_length < length < max_length`` and it is not a duplicate; the first
  ``num_train`` distinct trees form train, the next ``num_val`` val, the rest test;
* label rule: MIN/MAX of the arguments, MED = ``int(median)`` (mean of the two middle values for an
  even count, truncated), SM = sum mod 10 (FIRST/LAST are defined upstream but not drawn);
* text: LRA's nested-parenthesis form, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``, written as
  ``basic_{train,val,test}.tsv`` with a ``Source<TAB>Target`` header.

Deviation, for determinism: upstream collects trees in a Python ``set`` and splits in set iteration order,
which changes with the process's hash seed; here trees keep their generation order, so the same seed gives
the same files.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lra.data.store import partial_name, remove_stale_partials

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25


@dataclass(frozen=True)
class ListOpsSpec:
    """Generation options; LRA's defaults make the release's ``basic`` set (96k/2k/2k, 500-2000 tokens)."""

    num_train: int = 96000
    num_val: int = 2000
    num_test: int = 2000
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """A random expression as nested lists ``[op, arg, ...]`` (digits are ints) and its token length."""
    if depth < max_depth and rng.random() <= VALUE_P:
        children, length = [], 2
        for _ in range(rng.randint(2, max_args)):
            child, child_len = generate_tree(rng, depth + 1, max_depth, max_args)
            children.append(child)
            length += child_len
        return [rng.choice(OPERATORS), *children], length
    return rng.choice(range(10)), 1


def to_string(tree) -> str:
    """LRA's text form: left-nested pairs in parentheses, ``( ( ( [OP a ) b ) ] )``."""
    if isinstance(tree, int):
        return str(tree)
    text = tree[0]
    for arg in [*tree[1:], END]:
        text = f"( {text} {arg if isinstance(arg, str) else to_string(arg)} )"
    return text


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree[0], [evaluate(a) for a in tree[1:]]
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s, m = sorted(args), len(args) // 2
        return s[m] if len(args) % 2 else int((s[m - 1] + s[m]) / 2)
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def generate(spec: ListOpsSpec, out_dir: str | Path, progress: bool = True) -> list[Path]:
    """Write ``basic_{train,val,test}.tsv`` for ``spec`` into ``out_dir``; returns the three paths.

    Each file is written under a name unique to this process (``<file>.partial-<host>-<pid>``) and renamed into
    place; temporaries left by killed runs are removed. (``ListOpsDataModule`` also holds the folder's lock, so
    that one of several concurrent jobs generates.)"""
    rng = random.Random(spec.seed)
    total = spec.num_train + spec.num_val + spec.num_test
    seen: dict[str, int] = {}
    with tqdm(total=total, desc="generating ListOps", unit="seq", disable=not progress) as bar:
        while len(seen) < total:
            tree, length = generate_tree(rng, 1, spec.max_depth, spec.max_args)
            if spec.min_length < length < spec.max_length:
                text = to_string(tree)
                if text not in seen:
                    seen[text] = evaluate(tree)
                    bar.update(1)
    rows = list(seen.items())
    splits = {
        "train": rows[: spec.num_train],
        "val": rows[spec.num_train : spec.num_train + spec.num_val],
        "test": rows[spec.num_train + spec.num_val :],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    paths = []
    for split, data in splits.items():
        path = out / f"basic_{split}.tsv"
        tmp = partial_name(path)  # unique to this process: concurrent writers never share a temporary
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                writer.writerow(["Source", "Target"])
                writer.writerows(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths
