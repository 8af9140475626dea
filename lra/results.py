"""Run records (one JSON file per finished run) and the accuracy tables rendered from them.

Records live in ``results/runs/<protocol>/<task>/<model>/seed<k>_<time>_<id>.json`` and are created with
exclusive mode: a record is never overwritten. ``lra-tables`` (``make tables``) reads every record and
``results/published.csv`` and writes ``results/accuracy.md`` and ``results/accuracy.csv``:

* measured cells: test accuracy (%) of the checkpoint the protocol tests (``protocol.test_checkpoint``: the
  best-validation one; the last one under ``lra``, as LRA did), mean ± sample std over the seeds of one
  experiment (runs whose configs differ in anything but the seed get rows of their own, labelled by the settings
  that differ), with the number of runs; a task trained on generated rather than official data is its own
  column, marked ``[generated]``;
* published cells: the figure and a numbered source, in their own columns; the two never share a cell;
* failed runs (``status: failed`` records: out of memory, non-finite loss, bad config, ...) are counted in their
  cell, and a cell with no finished run shows ``failed`` with the reason instead of staying empty.

A record's ``cell`` is ``cell_key`` of its config: runs with the same key are the same experiment, which is how
a re-run sweep (``resume=true``) recognises and skips the cells it has already finished.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections import defaultdict
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


def _leaves(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def experiment(config: dict | None) -> dict:
    """What a run *was*: the leaves of its resolved config (``{"optim.lr": 1e-4, ...}``) without ``VOLATILE_KEYS``
    and paths (``PATH_LEAVES``), older setting names mapped to today's (``RENAMED``)."""
    kept = {k: v for k, v in (config or {}).items() if k not in VOLATILE_KEYS}
    leaves = {RENAMED.get(k, k): v for k, v in _leaves(kept).items()}
    return {k: v for k, v in leaves.items() if k.rsplit(".", 1)[-1] not in PATH_LEAVES}


def cell_key(config: dict) -> str:
    """A short hash of ``experiment(config)``: equal keys = the same experiment (seed included)."""
    return hashlib.sha256(json.dumps(experiment(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


def finished_record(results_dir: str | Path, protocol: str, task: str, model: str, cell: str) -> dict | None:
    """The first ``ok`` record of ``cell`` (see ``cell_key``), or None."""
    folder = Path(results_dir) / "runs" / protocol / task / model
    return next((r for r in load_json_records(folder) if r.get("cell") == cell and r.get("status", "ok") == "ok"),
                None)


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Write ``record`` to a new file under ``results_dir/runs``; never replaces an existing file."""
    folder = Path(results_dir) / "runs" / record["protocol"] / record["task"] / record["model"]
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.get("finished", time.time())))
    failed = "_failed" if record.get("status") == "failed" else ""
    path = folder / f"seed{record['seed']}_{stamp}_{secrets.token_hex(3)}{failed}.json"
    with open(path, "x") as f:
        json.dump(record, f, indent=1, default=str)
    return path


def load_json_records(folder: str | Path) -> list[dict]:
    """Every ``*.json`` record under ``folder``, in path order, each with its ``_path``."""
    records = []
    for path in sorted(Path(folder).rglob("*.json")):
        record = json.loads(path.read_text())
        record["_path"] = str(path)
        records.append(record)
    return records


def load_records(results_dir: str | Path) -> list[dict]:
    """The run records under ``results_dir/runs``."""
    return load_json_records(Path(results_dir) / "runs")


def task_label(record: dict) -> str:
    return record["task"] + (" [generated]" if record.get("data", {}).get("source") == "generated" else "")


def variant_labels(records: list[dict]) -> dict[str, str]:
    """Row label of each record: its model name, or, where one (protocol, model, task) holds runs of different
    configs, the model name with the settings that tell them apart (e.g. ``proxyformer (trainer.max_steps=300)``),
    so that runs of different experiments are never averaged into one cell."""
    by_cell = defaultdict(list)
    for r in records:
        by_cell[(r["protocol"], r["model"], task_label(r))].append(r)
    labels = {}
    for (_, model, _), runs in by_cell.items():
        experiments = {id(r): {k: v for k, v in experiment(r.get("config")).items() if k != "seed"} for r in runs}
        keys = set().union(*experiments.values())
        differing = sorted(k for k in keys if len({json.dumps(e.get(k, "unset"), default=str)
                                                   for e in experiments.values()}) > 1)
        for r in runs:
            shown = [f"{k}={experiments[id(r)].get(k, 'unset')}" for k in differing[:3]]
            more = ", …" if len(differing) > 3 else ""
            labels[r["_path"]] = f"{model} ({', '.join(shown)}{more})" if differing else model
    return labels


def measured_cells(records: list[dict]) -> dict[tuple, dict]:
    """``(protocol, row label, task_label) -> {mean, std, n, seeds, records, failed, reasons}``: test accuracy in
    percent over the ``ok`` runs (``mean`` None when every run failed), and the failed runs' count and reasons. The
    row label is the model, split by config where runs differ (``variant_labels``)."""
    labels = variant_labels(records)
    groups = defaultdict(lambda: {"ok": [], "failed": []})
    for r in records:
        key = (r["protocol"], labels[r["_path"]], task_label(r))
        if r.get("status", "ok") == "ok" and r.get("test_acc") is not None:
            groups[key]["ok"].append(r)
        elif r.get("status") == "failed":
            groups[key]["failed"].append(r)
    cells = {}
    for key, runs in groups.items():
        accs = [100 * r["test_acc"] for r in runs["ok"]]
        cells[key] = {
            "mean": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "n": len(accs),
            "seeds": sorted(r["seed"] for r in runs["ok"]),
            "records": [r["_path"] for r in runs["ok"] + runs["failed"]],
            "failed": len(runs["failed"]),
            "reasons": sorted({r.get("reason", "unknown") for r in runs["failed"]}),
        }
    return cells


def cell_text(c: dict) -> str:
    """``71.20 ± 0.40 (n=3)``, ``… (n=2; 1 failed)`` or ``failed: <reason> (1 run)``."""
    if c["mean"] is None:
        runs = "run" if c["failed"] == 1 else "runs"
        return f"failed: {'; '.join(c['reasons'])} ({c['failed']} {runs})"
    failed = f"; {c['failed']} failed: {'; '.join(c['reasons'])}" if c["failed"] else ""
    return f"{c['mean']:.2f} ± {c['std']:.2f} (n={c['n']}{failed})"


def load_published(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"protocol", "model", "task", "accuracy", "source"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns must include {sorted(need)}, found {sorted(rows[0])}")
    return rows


def _task_sort(label: str):
    base = label.split(" ")[0]
    return (TASK_ORDER.index(base) if base in TASK_ORDER else len(TASK_ORDER), label)


def render(results_dir: str | Path, published_csv: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``accuracy.md`` and ``accuracy.csv`` into ``results_dir``; returns their paths."""
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    cells = measured_cells(records)
    published = load_published(published_csv or results_dir / "published.csv")
    sources = list(dict.fromkeys(row["source"] for row in published))
    pub = {(r["protocol"], r["model"], r["task"]): r for r in published}

    lines = [
        "# LRA accuracy",
        "",
        "Test accuracy (%) of the checkpoint the protocol tests (the best-validation one; under `lra` the last",
        "one, as LRA did). **Measured** cells come from this suite's run",
        "records (`results/runs/`, each with its config, seed, git commit and device): mean ± std over seeds,",
        "n = number of runs. **Published** cells are figures from papers, with the source numbered below.",
        "A measured and a published figure never share a cell; `failed` cells name why their runs failed",
        "(their failure records are under `results/runs/`). Regenerate with `make tables`.",
        "",
    ]
    for protocol in sorted({k[0] for k in cells} | {k[0] for k in pub}):
        tasks = sorted({k[2] for k in cells if k[0] == protocol} | {k[2] for k in pub if k[0] == protocol},
                       key=_task_sort)
        models = sorted({k[1] for k in cells if k[0] == protocol} | {k[1] for k in pub if k[0] == protocol})
        lines += [f"## Protocol `{protocol}`", ""]
        header = ["model"]
        for t in tasks:  # published figures are on official data: no such column for generated tasks
            header += [f"{t} measured"] if t.endswith("[generated]") else [f"{t} measured", f"{t} published"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for m in models:
            row = [m]
            for t in tasks:
                c = cells.get((protocol, m, t))
                row.append(cell_text(c) if c else "–")
                if not t.endswith("[generated]"):
                    p = pub.get((protocol, m, t))
                    row.append(f"{p['accuracy']} [{sources.index(p['source']) + 1}]" if p else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if sources:
        lines += ["## Sources of published figures", ""]
        lines += [f"{i}. {s}" for i, s in enumerate(sources, 1)]
        lines.append("")
    md = results_dir / "accuracy.md"
    md.write_text("\n".join(lines))

    out = results_dir / "accuracy.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "protocol", "model", "task", "accuracy_mean", "accuracy_std", "n", "seeds", "failed",
                    "failure_reasons", "source"])
        for (protocol, m, t), c in sorted(cells.items()):
            kind, mean = ("measured", f"{c['mean']:.4f}") if c["mean"] is not None else ("failed", "")
            w.writerow([kind, protocol, m, t, mean, f"{c['std']:.4f}" if mean else "", c["n"],
                        " ".join(map(str, c["seeds"])), c["failed"], "; ".join(c["reasons"]),
                        "; ".join(c["records"])])
        for r in published:
            w.writerow(["published", r["protocol"], r["model"], r["task"], r["accuracy"], "", "", "", "", "",
                        r["source"]])
    return md, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lra-tables", description="Render results/accuracy.{md,csv}.")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--published", default=None,
                        help="published figures CSV (default: <results-dir>/published.csv)")
    args = parser.parse_args(argv)
    for path in render(args.results_dir, args.published):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
