"""Run records: one JSON file per run, what each says about the run that made it, and experiment identity.

Records live in ``results/runs/<protocol>/<task>/<model>/seed<k>_<time>_<id>.json``. They are created atomically
and exclusively (``create_json``): a record is complete or absent, and never overwritten. Readers skip, and name,
files that are not records of this suite (``load_json_records``). The tables are rendered from them by
``lra.tables`` (``make tables``).

A record's ``cell`` is ``cell_key`` of its config: runs with the same key are the same experiment, which is how
a re-run sweep (``resume=true``) recognises and skips the cells it has already finished. The key covers what the
run *was* (``experiment``): every setting but paths and bookkeeping, and the hardware it really used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

TASK_ORDER = ["listops", "text", "retrieval", "image", "pathfinder", "pathx"]


def git_state(where: Path) -> dict:
    """Commit of the code that ran and whether the work tree had uncommitted changes, outside ``results/`` (what the
    suite itself writes: a benchmark run after another in the same checkout would otherwise count as dirty)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout

    try:
        changes = git("status", "--porcelain", "--", ".", ":(exclude)results")
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changes.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}


VERSIONED = ("torch", "lightning", "hydra-core", "omegaconf", "numpy", "datasets", "lra")


def package_versions() -> dict:
    """Python, CUDA and the packages a record's numbers depend on (None where one is not installed)."""
    import torch

    out = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device) -> str:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


VOLATILE_KEYS = ("paths", "ckpt_path", "record", "resume", "logger", "hydra")  # how a run is kept, not what it is
PATH_LEAVES = ("data_dir", "cache_dir", "lra_release", "num_workers")  # where data is read from, and how fast
RENAMED = {"deterministic": "trainer.deterministic"}  # settings that moved since older records were written
ADDED = {  # settings every config has now, added since older records were written, with what those runs did
    "trainer.float32_matmul_precision": "highest",
    "protocol.test_checkpoint": "best",
}
ADDED_OPTIONS = {  # per attention (``model.attention``): options added since, with what older runs computed
    "proxyformer": {"model.options.landmark_dropout_on": "pinv"},
    "performer": {"model.options.harness_fixes": []},
}


def _leaves(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def device_type(record: dict) -> str | None:
    """``cpu`` or ``gpu`` for a record that names its device, else None."""
    device = record.get("device")
    return None if not device else "cpu" if str(device).startswith("cpu") else "gpu"


def experiment(config: dict | None, record: dict | None = None) -> dict:
    """What a run *was*: the leaves of its resolved config (``{"optim.lr": 1e-4, ...}``) without ``VOLATILE_KEYS`` and
    paths (``PATH_LEAVES``), older setting names mapped to today's (``RENAMED``), settings added since filled with
    the value older runs used (``ADDED``, and ``ADDED_OPTIONS`` for their attention). With its ``record``, the
    hardware is what the run really used (``trainer.accelerator`` cpu|gpu and the effective ``trainer.precision``;
    records written before these were resolved in the config say ``auto`` and the configured precision there)."""
    kept = {k: v for k, v in (config or {}).items() if k not in VOLATILE_KEYS}
    leaves = {RENAMED.get(k, k): v for k, v in _leaves(kept).items()}
    leaves = {k: v for k, v in leaves.items() if k.rsplit(".", 1)[-1] not in PATH_LEAVES}
    if leaves:
        leaves = {**ADDED, **ADDED_OPTIONS.get(leaves.get("model.attention"), {}), **leaves}
    if record is not None and device_type(record) and record.get("precision"):
        leaves.update({"trainer.accelerator": device_type(record), "trainer.precision": record["precision"]})
    return leaves


def cell_key(config: dict, record: dict | None = None) -> str:
    """A short hash of ``experiment(config, record)``: equal keys = the same experiment (seed included)."""
    blob = json.dumps(experiment(config, record), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def finished_record(results_dir: str | Path, protocol: str, task: str, model: str, cell: str) -> dict | None:
    """The first ``ok`` record of experiment ``cell`` (``cell_key``), or None. A record counts if its stored key or its
    key recomputed with today's normalisation (``experiment``) matches, so runs recorded before a setting was added
    or the hardware was resolved are still recognised."""
    folder = Path(results_dir) / "runs" / protocol / task / model
    return next((r for r in load_json_records(folder, RUN_KEYS) if r.get("status", "ok") == "ok"
                 and cell in (r.get("cell"), cell_key(r.get("config"), r))), None)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` all at once: a reader sees the old file or the new one, never half of one (a
    temporary file in the same folder, flushed to disk, renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_json(path: str | Path, obj) -> Path:
    """Create ``path`` holding ``obj`` as JSON, complete or not at all, and never over an existing file (the data is
    written to a temporary file first, then hard-linked to ``path``, which fails if ``path`` exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive creation, written in one go
            with open(path, "x") as f:
                f.write(tmp.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Write ``record`` to a new file under ``results_dir/runs``, atomically; never replaces an existing file."""
    folder = Path(results_dir) / "runs" / record["protocol"] / record["task"] / record["model"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.get("finished", time.time())))
    failed = "_failed" if record.get("status") == "failed" else ""
    return create_json(folder / f"seed{record['seed']}_{stamp}_{secrets.token_hex(3)}{failed}.json", record)


SKIPPED: dict[str, str] = {}  # path -> why, for every JSON file the loaders could not use (tables list them)


def load_json_records(folder: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every ``*.json`` record under ``folder``, in path order, each with its ``_path``.

    A file that cannot be read as a JSON object (torn by a kill, foreign, not UTF-8) or lacks a ``required`` key is
    skipped with a warning naming it (and noted in ``SKIPPED``): one bad file never hides the others.
    """
    records = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
            missing = [] if isinstance(record, dict) else ["(not a JSON object)"]
            missing = missing or [k for k in required if k not in record]
            if missing:
                raise ValueError(f"not a record of this suite: missing {', '.join(missing)}")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            why = f"{type(err).__name__}: {err}"
            if SKIPPED.get(str(path)) != why:
                print(f"[lra] warning: skipping {path}: {why}", file=sys.stderr)
            SKIPPED[str(path)] = why
            continue
        record["_path"] = str(path)
        records.append(record)
    return records


RUN_KEYS = ("protocol", "task", "model", "seed")


def load_records(results_dir: str | Path) -> list[dict]:
    """The run records under ``results_dir/runs`` (unreadable or foreign files skipped, see ``load_json_records``)."""
    return load_json_records(Path(results_dir) / "runs", RUN_KEYS)


def pooled(by: dict[str, dict]) -> tuple[int, int]:
    """``(correct, rows)`` over every group of a record's ``*_by`` counts."""
    return sum(c["correct"] for c in by.values()), sum(c["rows"] for c in by.values())


def floor_spread(prior_by: dict) -> str | None:
    """How far an evaluation record's validation and test floors (``prior_by``, see ``group_prior``) sit from the
    floor on the training split, in binomial standard errors of their size: ``sqrt(p (1 - p) / n)`` with ``p`` the
    training split's floor and ``n`` the split's rows. None for records without the training split's floor."""
    if "train" not in prior_by:
        return None
    correct, rows = pooled(prior_by["train"])
    p = correct / rows
    parts = []
    for split, name in (("val", "validation"), ("test", "test")):
        c, n = pooled(prior_by[split])
        se = (p * (1 - p) / n) ** 0.5
        parts.append(f"{name} {100 * c / n:.2f} is {(c / n - p) / se:+.1f} standard errors ({100 * se:.2f} at {n} "
                     f"rows) from it" if se else f"{name} {100 * c / n:.2f} (no spread about a floor of 0 or 100)")
    return (f"the floor on the training split ({rows} rows) is {100 * p:.2f}; drawn the same way, a split's floor "
            f"differs from it by sampling error alone: {', '.join(parts)}")


def by_group(counts: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """``{group: {"acc", "correct", "rows"}}`` (a record's ``*_by``) from ``{group: (correct, rows)}``."""
    return {name: {"acc": c / n, "correct": c, "rows": n} for name, (c, n) in counts.items()}


def floors_by_group(prior: dict) -> dict:
    """A record's ``prior_by`` from ``datamodule.group_prior()``: each group's answer and its floor on every split."""
    return {"label": prior["label"], **{split: by_group(prior[split]) for split in ("train", "val", "test")}}


def breakdown_lines(record: dict, names: tuple[str, ...], splits: tuple[str, ...]) -> list[str]:
    """The console report of a record's accuracy by group (``by``, ``<split>_by`` for each of ``splits``) beside
    each group's floor (``prior_by``), then how typical the splits' floors are (``floor_spread``)."""
    by, floors = record["by"], record["prior_by"]
    lines = [f"[lra] accuracy by {by}, {' / '.join(splits)} (rows); beside it, the floor of always answering the "
             f"training split's most common label of that {by}:"]
    for name in names:
        counts = [record[f"{split}_by"].get(name) for split in splits]
        if any(counts):
            floor = " / ".join(f"{100 * floors[split][name]['acc']:6.2f}%" if name in floors[split] else "     –"
                               for split in splits)
            lines.append(f"  {name:>8}  " + " / ".join(f"{100 * c['acc']:6.2f}% ({c['rows']})" if c else "     – (0)"
                                                         for c in counts)
                         + f"   floor (label {floors['label'].get(name, '–')}): {floor}")
    if spread := floor_spread(floors):
        lines.append(f"[lra] {spread}")
    return lines
