"""Accuracy tables and accuracy plots from the run records (``lra-tables``, ``make tables``).

Reads every record under ``results/runs/`` and the published figures in ``results/published.csv`` (a results folder
elsewhere without its own copy of the hand-kept files, ``published.csv``, ``known_deviations.csv`` and
``not_run.csv``, uses the repository's; ``lra-tables`` prints which) and writes

* ``results/accuracy.md``: one section per protocol, one row per experiment: model (with the settings that tell it
  apart from other runs of that model, and ``[bugs fixed]`` for ``protocol.quirks=fixed``), where it ran (device
  and precision), and per task the **measured** test accuracy of the tested checkpoint, mean ± sample std over
  distinct seeds with their number ``n`` (a seed trained twice counts once, its latest run; repeats are shown), and
  the **published** figure with its numbered source. The two never share a cell, and a published figure is set only
  beside the experiment that runs its recipe (not beside variants). An average column, over the five tasks (Path-X
  excluded, as the LRA paper's average), is filled where a row has all five, measured and published separately.
  Measured cells that miss their published figure by more than a point are listed under the table with the
  difference and the known reasons (those that every listed cell of a task shares said once, before its cells).
  Failed runs are counted in their cell; a cell with no finished run shows why.
* ``results/accuracy.csv``: the same cells, one line each, with the record files behind every measured cell.
* ``results/accuracy.tex``: the tables for a paper (booktabs): measured ± std with n, published in their own
  columns with their source numbers.
* in ``accuracy.md``, after each protocol's table, the checkpoint evaluations (``lra-eval`` records under
  ``results/evals/``) that break accuracy down by group (ListOps: the root operator), one table per task and data:
  validation / test accuracy per group of each evaluated checkpoint, beside the floor of always answering the
  training split's most common label of the group (the records' ``prior_by``).
* ``results/plots/``: validation accuracy over training steps per protocol × task (from the records'
  ``val_history``), and accuracy against training speed per protocol × device, each task's accuracy paired with
  the benchmark of that protocol's encoder at that task's length (``lra-bench`` records), with the majority-class
  rate drawn as the floor.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from lra.config import CONFIGS
from lra.results import (
    ADDED_OPTIONS,
    SKIPPED,
    TASK_ORDER,
    device_type,
    experiment,
    floor_spread,
    load_json_records,
    load_records,
    pooled,
    write_text_atomic,
)

AVERAGED = ("listops", "text", "retrieval", "image", "pathfinder")  # the LRA average: Path-X excluded
PRECISIONS = {"32-true": "fp32", "32": "fp32", "64-true": "fp64", "16-mixed": "fp16 mixed", "16": "fp16 mixed",
              "bf16-mixed": "bf16 mixed", "bf16": "bf16 mixed", "16-true": "fp16", "bf16-true": "bf16"}
HARDWARE_KEYS = ("trainer.accelerator", "trainer.precision")  # shown in the "run on" column, not in labels
PROTOCOLS = {  # section titles; published-only blocks say so
    "nystrom": "the Nyströmformer PyTorch harness (mlpen/Nystromformer LRA/code): 2 layers of 64, mean pooling",
    "lra": "the original LRA code (google-research/long-range-arena)",
    "quick": "the CPU demo profile: short generated data, comparable with nothing published",
    "skyformer": "Skyformer's own recipe (published figures only: this suite has no `skyformer` protocol)",
    "tost-paper": "as published by ToST's authors (their harness is not stated; published figures only)",
    "cosformer-paper": "as published by cosFormer's authors (published figures only)",
}
NOT_ATTENTION = {"ssm-papers": "Not attention: state-space models, as published (for scale: where attention stands; "
                              "their papers' averages include Path-X)"}
UNSOURCED = ("proxyformer", "cast")  # no published LRA figures could be sourced (no public code either)
# results/known_deviations.csv: protocol, model, task, hardware, reason (* = any)
KNOWN_REASONS = "known_deviations.csv"
NOT_RUN = "not_run.csv"  # results/not_run.csv: protocol, model, task, why: cells deliberately left to other hardware
PUBLISHED = "published.csv"
REFERENCE = Path(__file__).resolve().parent.parent / "results"  # the repository's results/: the hand-kept files


def reference_file(results_dir: Path, name: str) -> Path:
    """The hand-kept file ``name`` (published figures, known reasons, cells not run) that goes with the records in
    ``results_dir``: its own copy where it has one, else the repository's ``results/<name>``, so the tables of a
    results folder elsewhere (``RESULTS_DIR=...``) still set published figures and reasons beside its cells."""
    own = Path(results_dir) / name
    return own if own.is_file() else REFERENCE / name


# ---- rows: which records form one experiment, and how it is labelled ------------------------------------------
def task_label(record: dict) -> str:
    return record["task"] + (" [generated]" if record.get("data", {}).get("source") == "generated" else "")


def base_task(label: str) -> str:
    return label.split(" ")[0]


def hardware(record: dict) -> str:
    """``CPU · fp32``, ``NVIDIA H100 80GB HBM3 · fp16 mixed``: where the run ran, at which precision."""
    config = record.get("config") or {}
    kind = device_type(record) or (config.get("trainer") or {}).get("accelerator")
    device = "CPU" if kind == "cpu" else str(record.get("device") or kind or "?")
    precision = record.get("precision") or (config.get("trainer") or {}).get("precision")
    return f"{device} · {PRECISIONS.get(str(precision), precision)}"


def _quirks_fixed(record: dict) -> bool:
    return ((record.get("config") or {}).get("protocol") or {}).get("quirks") == "fixed"


@functools.cache
def _model_options(model: str) -> dict:
    """``model.options.*`` as today's ``configs/model/<model>.yaml`` sets them (empty where there is no such file)."""
    path = CONFIGS / "model" / f"{model}.yaml"
    options = (OmegaConf.to_container(OmegaConf.load(path)).get("options") or {}) if path.is_file() else {}
    return {f"model.options.{name}": value for name, value in options.items()}


def _added_default(key: str, leaves: dict, model: str) -> bool:
    """``key`` is an attention option added since older records were written (``ADDED_OPTIONS``), at the value those
    runs used, which is also today's default for ``model``: such a run is the recipe as it is today."""
    def same(a, b):
        return json.dumps(a, default=str) == json.dumps(b, default=str)

    older, today = ADDED_OPTIONS.get(leaves.get("model.attention"), {}), _model_options(model)
    return key in older and key in today and same(older[key], leaves[key]) and same(today[key], leaves[key])


def variant_labels(records: list[dict]) -> dict[str, str]:
    """Row label of each record: its model name, ``[bugs fixed]`` when it ran with ``protocol.quirks=fixed``, and,
    where one (protocol, model, task, hardware) holds runs of different configs, the settings that tell them
    apart (e.g. ``proxyformer (trainer.max_steps=300)``), so runs of different experiments are never averaged. A
    setting added since older records were written counts as unset where it has the value those runs used and that
    value is today's default (``_added_default``): such runs keep the plain label, and the published figure."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["protocol"], r["model"], task_label(r), hardware(r), _quirks_fixed(r))].append(r)
    labels = {}
    for (_, model, _, _, fixed), runs in groups.items():
        experiments = {id(r): {k: v for k, v in experiment(r.get("config"), r).items()
                               if k != "seed" and k not in HARDWARE_KEYS} for r in runs}
        keys = set().union(*experiments.values())
        differing = sorted(k for k in keys if len({json.dumps(e.get(k, "unset"), default=str)
                                                   for e in experiments.values()}) > 1)
        for r in runs:  # a run with none of the differing settings set is the recipe itself: the plain label
            own = [k for k in differing if k in experiments[id(r)] and not _added_default(k, experiments[id(r)], model)]
            shown = [f"{k}={experiments[id(r)][k]}" for k in own[:3]]
            more = ", …" if len(own) > 3 else ""
            label = model + (" [bugs fixed]" if fixed else "")
            labels[r["_path"]] = f"{label} ({', '.join(shown)}{more})" if own else label
    return labels


def measured_cells(records: list[dict]) -> dict[tuple, dict]:
    """``(protocol, row label, hardware, task label) -> cell``: ``{mean, std, n, seeds, repeats, records, failed,
    reasons, model, majority, generated, configured_precision}``; test accuracy in percent over distinct seeds.

    ``n`` is the number of distinct seeds: a seed trained more than once (a repeated sweep, two concurrent sweeps)
    counts once, by its latest finished run; the other runs of that seed are reported as ``repeats``. ``mean`` is
    None when every run failed.
    """
    labels = variant_labels(records)
    groups = defaultdict(lambda: {"ok": [], "failed": []})
    for r in records:
        key = (r["protocol"], labels[r["_path"]], hardware(r), task_label(r))
        if r.get("status", "ok") == "ok" and r.get("test_acc") is not None:
            groups[key]["ok"].append(r)
        elif r.get("status") == "failed":
            groups[key]["failed"].append(r)
    cells = {}
    for key, runs in groups.items():
        latest = {}
        for r in sorted(runs["ok"], key=lambda r: (r.get("finished") or 0, r["_path"])):
            latest[r["seed"]] = r
        counted = [latest[seed] for seed in sorted(latest)]
        accs = [100 * r["test_acc"] for r in counted]
        any_run = (counted or runs["failed"])[0]
        configured = ((any_run.get("config") or {}).get("trainer") or {}).get("precision")
        cells[key] = {
            "mean": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "n": len(accs),
            "seeds": sorted(latest),
            "repeats": len(runs["ok"]) - len(latest),
            "records": [r["_path"] for r in runs["ok"] + runs["failed"]],
            "failed": len(runs["failed"]),
            "reasons": sorted({r.get("reason", "unknown") for r in runs["failed"]}),
            "model": any_run["model"],
            "majority": next((100 * r["test_majority_rate"] for r in counted if r.get("test_majority_rate")), None),
            "generated": key[3].endswith("[generated]"),
            "configured_precision": configured,
            "tested": sorted({r.get("test_checkpoint", "best") for r in counted}),
            "corrected": [(r["seed"], [c["field"] for c in r["corrections"]], r["_path"])
                          for r in counted if r.get("corrections")],
        }
    return cells


def cell_text(c: dict) -> str:
    """``71.20 ± 0.40 (n=3)``, ``71.20 (n=1)``, ``… (n=2; +1 repeat; 1 failed: …)`` or ``failed: <reason> (1 run)``."""
    if c["mean"] is None:
        runs = "run" if c["failed"] == 1 else "runs"
        return f"failed: {'; '.join(c['reasons'])} ({c['failed']} {runs})"
    notes = [f"n={c['n']}"]
    if c.get("repeats"):
        notes.append(f"+{c['repeats']} repeat{'s' if c['repeats'] > 1 else ''}")
    if c["failed"]:
        notes.append(f"{c['failed']} failed: {'; '.join(c['reasons'])}")
    spread = f" ± {c['std']:.2f}" if c["std"] is not None else ""
    return f"{c['mean']:.2f}{spread} ({'; '.join(notes)})"


# ---- published figures -------------------------------------------------------------------------------------------
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


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def published_average(pub: dict, protocol: str, model: str) -> tuple[str, str | None] | None:
    """The published average of ``model``: the paper's own ``average`` row if given, else the mean of its five
    task figures when all five are numbers; ``(text, source)``."""
    own = pub.get((protocol, model, "average"))
    if own:
        return own["accuracy"], own["source"]
    rows = [pub.get((protocol, model, t)) for t in AVERAGED]
    values = [_number(r["accuracy"]) if r else None for r in rows]
    if all(v is not None for v in values):
        sources = {r["source"] for r in rows}
        return f"{statistics.fmean(values):.2f}", sources.pop() if len(sources) == 1 else None
    return None


def load_known_reasons(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def deviation_reasons(c: dict, protocol: str, task: str, known: list[dict]) -> list[str]:
    """Why a measured cell may differ from its published figure: what the record shows, and the known reasons (a
    reason about one device's runs names that row's hardware, ``CPU · fp32``; ``*`` is any)."""
    reasons = []
    if c["generated"]:
        reasons.append("data made by the suite's LRA generator (same algorithm and sizes, another sample)")
    configured = c.get("configured_precision")
    if configured in ("16-mixed", "16", "bf16-mixed") and c.get("hardware", "").endswith("fp32"):
        reasons.append(f"run in fp32 on CPU where the recipe trains with {PRECISIONS.get(configured, configured)} "
                       f"on a GPU")
    if c["n"] == 1:
        reasons.append("n=1 seed: seed-to-seed spread not yet measured")
    elif c["n"] == 2:
        reasons.append("n=2 seeds: the ± is the spread of two runs")
    for row in known:
        if (row["protocol"] == protocol and row["model"] in ("*", c["model"]) and row["task"] in ("*", task)
                and (row.get("hardware") or "*") in ("*", c.get("hardware"))):
            reasons.append(row["reason"])
    return reasons


# ---- rendering ----------------------------------------------------------------------------------------------------
def _task_sort(label: str):
    base = base_task(label)
    return (TASK_ORDER.index(base) if base in TASK_ORDER else len(TASK_ORDER), label)


def _columns(task_labels: list[str], published_tasks: set[str]) -> list[tuple[str, str]]:
    """``[(kind, task label)]``: each measured task label, and after the last one of a base task its published
    column (generated data gets the official figure beside it: the same task, another sample of its data)."""
    labels = sorted(set(task_labels) | {t for t in published_tasks if t in TASK_ORDER}, key=_task_sort)
    columns = []
    for i, label in enumerate(labels):
        if label in task_labels:
            columns.append(("measured", label))
        last = i + 1 == len(labels) or base_task(labels[i + 1]) != base_task(label)
        if last and base_task(label) in published_tasks:
            columns.append(("published", base_task(label)))
    return columns


class Table:
    """One protocol's rows, shared by the Markdown, CSV and LaTeX writers."""

    def __init__(self, protocol: str, cells: dict, pub: dict, sources: list[str], known: list[dict],
                 not_run: list[dict] = ()):
        self.protocol = protocol
        self.cells = {k: v for k, v in cells.items() if k[0] == protocol}
        self.pub = {k: v for k, v in pub.items() if k[0] == protocol}
        self.sources = sources
        measured_tasks = sorted({k[3] for k in self.cells}, key=_task_sort)
        self.columns = _columns(measured_tasks, {k[2] for k in self.pub})
        rows = {(k[1], k[2]) for k in self.cells}
        models_with_rows = {self.cells[k]["model"] for k in self.cells if k[1] == self.cells[k]["model"]}
        rows |= {(m, "–") for (_, m, _) in self.pub if m not in models_with_rows}
        self.rows = sorted(rows, key=lambda r: (r[0].split(" ")[0], r[0], r[1]))
        self.known = known
        self.not_run = {(r["model"], r["task"]): r["why"] for r in not_run if r["protocol"] == protocol}
        self.notes: dict[str, int] = {}

    def missing(self, row, task_label) -> str:
        """``–``, or ``not run [k]`` for a cell deliberately left undone (``results/not_run.csv``)."""
        why = self.not_run.get((row[0], base_task(task_label)))
        return "–" if why is None else f"not run [{self.notes.setdefault(why, len(self.notes) + 1)}]"

    def measured(self, row, task_label):
        return self.cells.get((self.protocol, row[0], row[1], task_label))

    def published(self, row, task):
        """A published figure is shown only on the row that runs its recipe: the model's own name, no variant."""
        label = row[0]
        if " " in label:
            return None
        return self.pub.get((self.protocol, label, task))

    def average(self, row) -> tuple[str, bool] | None:
        """The mean of the five measured task means of ``row`` (official data preferred), and whether generated
        data took part."""
        means, generated = [], False
        for task in AVERAGED:
            options = [(self.measured(row, label), label) for label in (task, f"{task} [generated]")]
            cell, label = next(((c, lab) for c, lab in options if c and c["mean"] is not None), (None, None))
            if cell is None:
                return None
            means.append(cell["mean"])
            generated |= label.endswith("[generated]")
        return f"{statistics.fmean(means):.2f}", generated

    def source_number(self, source: str | None) -> str:
        return "" if source is None else f" [{self.sources.index(source) + 1}]"

    def deviations(self) -> list[str]:
        """One bullet per measured cell more than a point from its published figure, with its known reasons; the
        reasons that every listed cell of a task shares are stated once, before that task's bullets."""
        by_task: dict[str, list] = {}
        for row in self.rows:
            for kind, task in self.columns:
                c = self.measured(row, task) if kind == "measured" else None
                p = self.published(row, base_task(task)) if c else None
                figure = _number(p["accuracy"]) if p else None
                if c is None or c["mean"] is None or figure is None or abs(c["mean"] - figure) <= 1.0:
                    continue
                reasons = deviation_reasons({**c, "hardware": row[1]}, self.protocol, base_task(task), self.known)
                by_task.setdefault(task, []).append((row, c, p, figure, reasons))
        lines = []
        for task, listed in sorted(by_task.items(), key=lambda item: _task_sort(item[0])):
            shared = [r for r in listed[0][4] if all(r in entry[4] for entry in listed)] if len(listed) > 1 else []
            if shared:
                lines += [f"Known reasons shared by every {task} cell listed below: " + "; ".join(shared) + ".", ""]
            for row, c, p, figure, reasons in listed:
                own = [r for r in reasons if r not in shared]
                said = "; ".join(own) if own else ("only those shared above" if shared else "none identified yet")
                lines.append(f"- **{row[0]}, {task}** ({row[1]}): {c['mean']:.2f} measured vs {figure:.2f} "
                             f"published{self.source_number(p['source'])}, {c['mean'] - figure:+.2f} points. Known "
                             f"reasons{' besides the shared ones' if shared and own else ''}: {said}.")
            lines.append("")
        return lines[:-1]


def markdown_section(t: Table, title: str) -> list[str]:
    header = ["model", "run on"]
    for kind, task in t.columns:
        header.append(f"{task} {kind}")
    header += ["average measured", "average published"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in t.rows:
        cells = [row[0], row[1]]
        for kind, task in t.columns:
            if kind == "measured":
                c = t.measured(row, task)
                cells.append(cell_text(c) if c else t.missing(row, task))
            else:
                p = t.published(row, task)
                cells.append(f"{p['accuracy']}{t.source_number(p['source'])}" if p else "–")
        avg = t.average(row)
        cells.append("–" if avg is None else avg[0] + (" (generated ListOps)" if avg[1] else ""))
        pavg = published_average(t.pub, t.protocol, row[0]) if " " not in row[0] else None
        cells.append("–" if pavg is None else pavg[0] + t.source_number(pavg[1]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    majority = {task: c["majority"] for (_, _, _, task), c in t.cells.items() if c.get("majority")}
    if majority:
        lines += ["Majority-class rate of each test set (the floor to beat): " +
                  ", ".join(f"{task} {rate:.2f}" for task, rate in sorted(majority.items(), key=lambda x: _task_sort(
                      x[0]))) + ".", ""]
    tested = sorted({x for c in t.cells.values() for x in c.get("tested", [])})
    if tested:
        lines += [f"Tested checkpoint: {' and '.join(tested)} (per the protocol).", ""]
    if t.notes:
        lines += ["Not run:", "", *[f"{k}. {why}" for why, k in t.notes.items()], ""]
    deviations = t.deviations()
    if deviations:
        lines += ["Measured cells more than one point from their published figure:", "", *deviations, ""]
    corrected = [f"- {model}, {task} ({run_on}), seed {seed}: {', '.join(fields)} (`{path}`)"
                 for (_, model, run_on, task), c in sorted(t.cells.items())
                 for seed, fields, path in c.get("corrected", [])]
    if corrected:
        lines += ["Records corrected after their run (each keeps what it first said, and why, under `corrections`):",
                  "", *corrected, ""]
    return lines


INTRO = [
    "# LRA accuracy",
    "",
    "Test accuracy (%). **Measured** cells come from this suite's run records (`results/runs/`, each with its config,",
    "seed, git commit and device): mean ± std over distinct seeds, n = number of seeds (a seed trained twice counts",
    "once; repeats are shown). **Published** cells are figures from papers, with the source numbered below; a",
    "published figure stands only beside the experiment that runs its recipe. \"run on\" is the device and the",
    "precision the run really used. The average is over ListOps, Text, Retrieval, Image and Pathfinder (Path-X",
    "excluded, as in the LRA paper), where a row has all five. `[generated]`: ListOps made by the suite's LRA",
    "generator (same algorithm and sizes as the release, another sample). `failed` cells name why their runs failed.",
    f"No published LRA figures could be sourced for {' or '.join(UNSOURCED)} (no public code either).",
    "Regenerate with `make tables`.",
    "",
]


EVAL_KEYS = ("kind", "protocol", "task", "model", "seed", "val_acc", "test_acc")


def load_evaluations(results_dir: str | Path) -> list[dict]:
    """The ``lra-eval`` records under ``results_dir/evals`` (unreadable or foreign files skipped)."""
    return [r for r in load_json_records(Path(results_dir) / "evals", EVAL_KEYS) if r["kind"] == "evaluation"]


def _data_identity(record: dict) -> str:
    """The data a record was evaluated on, independent of the machine's paths: its source description with the
    data folder reduced to its name (generated data: a hash of the generator's settings) and no cache path."""
    data = record.get("data") or {}
    kept = {k: v for k, v in data.items() if k not in ("folder", "cache")}
    return json.dumps({**kept, "folder": Path(str(data.get("folder", ""))).name}, sort_keys=True, default=str)


def _val_test(groups: tuple[dict, dict], name: str | None = None) -> str:
    """``56.14 / 56.02``: accuracy (%) of group ``name`` (all groups pooled when None) on validation / test."""
    cells = []
    for by in groups:
        counts = list(by.values()) if name is None else [by[name]] if name in by else []
        rows = sum(c["rows"] for c in counts)
        cells.append(f"{100 * sum(c['correct'] for c in counts) / rows:.2f}" if rows else "–")
    return " / ".join(cells)


def _checkpoint_key(path: str) -> tuple[str, ...]:
    """A checkpoint's identity without the machine's paths: its file and experiment folder (``cells/<experiment>/``)
    or, for the ``checkpoints/`` folder of a run, the run's folder and the folder above it (a multirun's run
    folders share their names across multiruns, their parent is unique)."""
    parts = Path(path).parts
    return parts[-4:] if len(parts) > 1 and parts[-2] == "checkpoints" else parts[-2:]


def evaluation_sections(evals: list[dict], protocol: str, results_dir: Path, runs: list[dict] = ()) -> list[str]:
    """Markdown tables of ``protocol``'s checkpoint evaluations with a group breakdown, one per (task, grouping,
    data): a row per record (model labelled by ``variant_labels``, seed, checkpoint step, where it was evaluated,
    accuracy overall and per group, validation / test) and a row per distinct floor (``prior_by``) of the same data.
    A checkpoint that the training records ``runs`` show was trained on other data (matched by ``_checkpoint_key``)
    names that data."""
    trained_on = {_checkpoint_key(r["checkpoint"]): _data_identity(r) for r in runs if r.get("checkpoint")}
    groups = defaultdict(list)
    for r in evals:
        if r["protocol"] == protocol and r.get("test_by"):
            groups[(task_label(r), r["by"], _data_identity(r))].append(r)
    lines = []
    for (task, by, data), records in sorted(groups.items(), key=lambda kv: (_task_sort(kv[0][0]), kv[0][1:])):
        labels = variant_labels(records)  # within one data: the data's own settings are in the heading
        names = list(dict.fromkeys(n for r in records for split in ("val_by", "test_by") for n in r[split]))
        identity = json.loads(data)
        folder, generator = identity["folder"], identity.get("generator")
        seed = f", generator seed {generator['seed']}" if generator and "seed" in generator else ""
        lines += [f"### `{protocol}` · {task}: checkpoints evaluated by {by} (`lra-eval`, data `{folder}`{seed})", "",
                  f"Accuracy (%), validation / test, overall and by {by}. The floor row always answers the training "
                  f"split's most common label of the {by} (shown after →); a model at it has learned the {by} "
                  f"and nothing more.", "",
                  "| checkpoint | evaluated on | all | " + " | ".join(names) + " | record |",
                  "|" + "---|" * (len(names) + 4)]
        floors = {}  # one row per distinct floor; a record that also has the training split's floor supplies it
        for prior in (r["prior_by"] for r in records if r.get("prior_by")):
            key = json.dumps({split: prior[split] for split in ("label", "val", "test")}, sort_keys=True)
            if "train" in prior or key not in floors:
                floors[key] = prior
        for floor in floors.values():
            splits = (floor["val"], floor["test"])
            lines.append("| floor | – | " + _val_test(splits) + " | " + " | ".join(
                f"{_val_test(splits, n)} → {floor['label'][n]}" if n in floor["label"] else "–" for n in names)
                + " | – |")
        for r in sorted(records, key=lambda r: (r["model"], r["seed"], r.get("finished") or 0, r["_path"])):
            splits = (r["val_by"], r["test_by"])
            model = labels[r["_path"]]
            trained = trained_on.get(_checkpoint_key(r["checkpoint"]), data) if r.get("checkpoint") else data
            if trained != data:
                model += f" (trained on `{json.loads(trained)['folder']}`)"
            path = Path(r["_path"])
            shown = path.relative_to(results_dir) if path.is_relative_to(results_dir) else path
            lines.append(f"| {model}, seed {r['seed']}, step {r.get('checkpoint_step', '?')} | {hardware(r)} | "
                         f"{100 * r['val_acc']:.2f} / {100 * r['test_acc']:.2f} | "
                         + " | ".join(_val_test(splits, n) for n in names) + f" | `{shown}` |")
        lines.append("")
        for spread in filter(None, map(floor_spread, floors.values())):
            lines += [f"{spread[0].upper()}{spread[1:]}.", ""]
    return lines


def render_markdown(tables: list[Table], reference: list[Table], sources: list[str], results_dir: Path,
                    evals: list[dict] = (), runs: list[dict] = ()) -> str:
    lines = list(INTRO)
    for t in tables:
        lines += markdown_section(t, f"## Protocol `{t.protocol}`: {PROTOCOLS.get(t.protocol, 'published')}")
        lines += evaluation_sections(list(evals), t.protocol, results_dir, runs)
    for t in reference:
        lines += markdown_section(t, f"## {NOT_ATTENTION[t.protocol]}")
    if sources:
        lines += ["## Sources of published figures", "", *[f"{i}. {s}" for i, s in enumerate(sources, 1)], ""]
    skipped = sorted(p for p in SKIPPED if Path(p).is_relative_to(results_dir / "runs"))
    if skipped:
        lines += ["## Files skipped", "", "Under `runs/` but not readable as run records (torn by a kill, foreign, or "
                  "not UTF-8); they are left in place for you to inspect or delete:", ""]
        lines += [f"- `{path}`: {SKIPPED[path]}" for path in skipped] + [""]
    return "\n".join(lines)


def render_csv(cells: dict, published: list[dict]) -> str:
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["kind", "protocol", "model", "run_on", "task", "accuracy_mean", "accuracy_std", "n", "seeds",
                "repeats", "failed", "failure_reasons", "source"])
    for (protocol, label, where, task), c in sorted(cells.items()):
        kind, mean = ("measured", f"{c['mean']:.4f}") if c["mean"] is not None else ("failed", "")
        w.writerow([kind, protocol, label, where, task, mean, "" if c["std"] is None else f"{c['std']:.4f}", c["n"],
                    " ".join(map(str, c["seeds"])), c["repeats"], c["failed"], "; ".join(c["reasons"]),
                    "; ".join(c["records"])])
    for r in published:
        w.writerow(["published", r["protocol"], r["model"], "", r["task"], r["accuracy"], "", "", "", "", "", "",
                    r["source"]])
    return f.getvalue()


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("·", r"$\cdot$"), ("–", "--"), ("…", r"\dots")):
        text = text.replace(a, b)
    return text


def latex_section(t: Table, title: str) -> list[str]:
    tasks = [task for kind, task in t.columns if kind == "measured"]
    bases = list(dict.fromkeys(base_task(x) for x in tasks + [task for k, task in t.columns if k == "published"]))
    spec = "ll" + "cc" * (len(bases) + 1)
    head = " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(b.capitalize())}}}" for b in bases + ["average"])
    rules = " ".join(rf"\cmidrule(lr){{{3 + 2 * i}-{4 + 2 * i}}}" for i in range(len(bases) + 1))
    lines = [f"% {title}", r"\begin{table}[t]", r"\centering", r"\footnotesize", rf"\begin{{tabular}}{{{spec}}}",
             r"\toprule", f"Model & Run on & {head} \\\\", rules,
             " & & " + " & ".join(["meas.", "publ."] * (len(bases) + 1)) + r" \\", r"\midrule"]
    for row in t.rows:
        cells = [_tex(row[0]), _tex(row[1])]
        for base in bases:
            labels = [x for x in tasks if base_task(x) == base]
            c = next((t.measured(row, x) for x in labels if t.measured(row, x)), None)
            if c is None:
                cells.append("--")
            elif c["mean"] is None:
                cells.append("fail")
            else:
                spread = rf" $\pm$ {c['std']:.2f}" if c["std"] is not None else ""
                mark = r"$^\dagger$" if c["generated"] else ""
                cells.append(f"{c['mean']:.2f}{spread}{mark} {{\\tiny(n={c['n']})}}")
            p = t.published(row, base)
            cells.append(f"{_tex(p['accuracy'])}{t.source_number(p['source'])}" if p else "--")
        avg = t.average(row)
        cells.append("--" if avg is None else avg[0] + (r"$^\dagger$" if avg[1] else ""))
        pavg = published_average(t.pub, t.protocol, row[0]) if " " not in row[0] else None
        cells.append("--" if pavg is None else pavg[0] + t.source_number(pavg[1]))
        lines.append(" & ".join(cells) + r" \\")
    caption = (f"LRA test accuracy (\\%), {_tex(title)}. Measured: mean $\\pm$ std over n seeds; published: "
               f"[k] numbers the sources listed below. $^\\dagger$ ListOps made by the LRA generator.")
    return lines + [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}", ""]


def render_latex(tables: list[Table], reference: list[Table], sources: list[str]) -> str:
    lines = ["% LRA accuracy tables generated by `make tables` (lra.tables); needs \\usepackage{booktabs}.",
             "% Published sources:"] + [f"% [{i}] {s}" for i, s in enumerate(sources, 1)] + [""]
    for t in tables:
        lines += latex_section(t, f"protocol {t.protocol}")
    for t in reference:
        lines += latex_section(t, NOT_ATTENTION[t.protocol])
    return "\n".join(lines)


def render(results_dir: str | Path, published_csv: str | Path | None = None, plots: bool = True
           ) -> list[Path]:
    """Write ``accuracy.md``, ``accuracy.csv``, ``accuracy.tex`` (and the accuracy plots) into ``results_dir``."""
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    cells = measured_cells(records)
    published = load_published(published_csv or reference_file(results_dir, PUBLISHED))
    sources = list(dict.fromkeys(row["source"] for row in published))
    pub = {(r["protocol"], r["model"], r["task"]): r for r in published}
    known = load_known_reasons(reference_file(results_dir, KNOWN_REASONS))
    not_run = load_known_reasons(reference_file(results_dir, NOT_RUN))
    protocols = sorted({k[0] for k in cells} | {k[0] for k in pub if k[0] not in NOT_ATTENTION},
                       key=lambda p: (p not in ("nystrom", "lra"), p == "quick", p))
    tables = [Table(p, cells, pub, sources, known, not_run) for p in protocols]
    reference = [Table(p, cells, pub, sources, known) for p in NOT_ATTENTION if any(k[0] == p for k in pub)]
    written = [
        write_text_atomic(results_dir / "accuracy.md", render_markdown(tables, reference, sources, results_dir,
                                                                       load_evaluations(results_dir), records)),
        write_text_atomic(results_dir / "accuracy.csv", render_csv(cells, published)),
        write_text_atomic(results_dir / "accuracy.tex", render_latex(tables, reference, sources)),
    ]
    if plots:
        written += render_plots(records, results_dir)
    return written


# ---- plots --------------------------------------------------------------------------------------------------------
def curve_groups(records: list[dict]) -> dict[tuple, dict[str, list]]:
    """``(protocol, task label, hardware) -> row label -> [(seed, [(step, val_acc %)])]`` from ``val_history``.

    A row whose finished records all lack a history (written before records kept one) maps to ``[]``, so that its
    plot can name it instead of leaving it out silently; a group with no history at all is dropped."""
    labels = variant_labels(records)
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status", "ok") == "ok":
            curves = groups[(r["protocol"], task_label(r), hardware(r))][labels[r["_path"]]]
            if history := r.get("val_history"):
                curves.append((r["seed"], [(h["step"], 100 * h["val_acc"]) for h in history]))
    return {key: curves for key, curves in groups.items() if any(curves.values())}


def task_lengths(records: list[dict]) -> dict[tuple, int]:
    """``(protocol, task) -> padded length`` the runs used (``data.seq_len``)."""
    out = {}
    for r in records:
        seq_len = ((r.get("config") or {}).get("data") or {}).get("seq_len")
        if seq_len:
            out[(r["protocol"], r["task"])] = int(seq_len)
    return out


def speed_points(bench: list[dict]) -> dict[tuple, dict]:
    """``(protocol, device type, model, length) -> latest ok train-mode fp32 bench record`` (smallest batch)."""
    out = {}
    for r in sorted(bench, key=lambda r: (r.get("run_id", ""), -r.get("batch_size", 1))):
        if r.get("status") == "ok" and r.get("mode") == "train" and r.get("precision") == "fp32":
            protocol = (r.get("config") or {}).get("bench", {}).get("protocol")
            out[(protocol, r.get("device_type"), r["model"], r["seq_len"])] = r
    return out


def validation_floors(records: list[dict], evals: list[dict]) -> dict[tuple, tuple[float, str]]:
    """``(protocol, task label) -> (validation floor %, grouping)``: the accuracy on the validation split of always
    answering the training split's most common label of each group (ListOps: root operator), from a training or
    ``lra-eval`` record of the data those runs trained on (compared without machine paths); no entry where the runs
    trained on more than one dataset or no record of that data carries the floor."""
    data = defaultdict(set)
    for r in records:
        if r.get("status", "ok") == "ok" and r.get("val_history"):
            data[(r["protocol"], task_label(r))].add(_data_identity(r))
    floors = {}
    for e in [*evals, *records]:
        key = (e["protocol"], task_label(e))
        if e.get("prior_by") and data.get(key) == {_data_identity(e)}:
            correct, rows = pooled(e["prior_by"]["val"])
            floors[key] = (100 * correct / rows, e["by"])
    return floors


def validation_plots(records: list[dict], results_dir: Path, evals: list[dict] = ()) -> list[Path]:
    """One plot of validation accuracy over training steps per protocol × task × device (``val_history``), with the
    validation floor (``validation_floors``) where a training record or one of ``evals`` has it."""
    from lra import plots

    written, floors = [], validation_floors(records, list(evals))
    for (protocol, task, where), curves in sorted(curve_groups(records).items()):
        slug = f"{protocol}_{task.replace(' [generated]', '-generated')}_{where.split(' · ')[0]}"
        path = results_dir / "plots" / f"val_curves_{slug.lower().replace(' ', '-')}.png"
        title = f"protocol {protocol}, {task}, {where}: validation accuracy during training"
        if without := sorted(label for label, runs in curves.items() if not runs):
            title += f" (not drawn, their records keep no validation history: {', '.join(without)})"
        drawn = {label: runs for label, runs in curves.items() if runs}
        written.append(plots.plot_validation_curves(drawn, path, title, floors.get((protocol, task))))
    return written


def accuracy_plots(results_dir: Path, records: list[dict] | None = None) -> list[Path]:
    """LRA Figure 3 per protocol × device: each task's measured accuracy against the training speed (and memory, the
    marker size) of that protocol's encoder at that task's padded length, from the latest ``lra-bench`` train-mode
    fp32 point; cells with no such point are counted in the title, never paired with another length or encoder."""
    from lra import plots

    if not plots.available():
        return []
    records = load_records(results_dir) if records is None else records
    cells = measured_cells(records)
    bench = speed_points(load_json_records(results_dir / "bench", ("model", "mode", "seq_len")))
    lengths = task_lengths(records)
    figures = defaultdict(lambda: defaultdict(list))  # (protocol, device type) -> task -> points
    floors, missing = {}, defaultdict(set)
    for (protocol, label, where, task), c in cells.items():
        if c["mean"] is None:
            continue
        kind = "cpu" if where.startswith("CPU") else "cuda"
        length = lengths.get((protocol, base_task(task)))
        point = bench.get((protocol, kind, c["model"], length))
        if point is None:
            missing[(protocol, kind)].add((label, task))
            continue
        figures[(protocol, kind)][task].append((label, c["mean"], point["steps_per_s"], point["peak_mb"]))
        if c.get("majority"):
            floors[(protocol, kind, task)] = c["majority"]
    written = []
    for (protocol, kind), per_task in sorted(figures.items()):
        panels = {f"{task} (N={lengths.get((protocol, base_task(task)))})":
                  (points, floors.get((protocol, kind, task)))
                  for task, points in sorted(per_task.items(), key=lambda x: _task_sort(x[0]))}
        gaps = len(missing[(protocol, kind)])
        note = f" ({gaps} measured cell{'s' if gaps > 1 else ''} without a benchmark point left out)" if gaps else ""
        written.append(plots.plot_accuracy_vs_speed(
            panels, results_dir / "plots" / f"accuracy_vs_speed_{protocol}_{kind}.png",
            f"protocol {protocol} on {kind.upper()}: test accuracy vs training steps/s of that protocol's encoder at "
            f"the task's length (lra-bench, fp32){note}"))
    return written


def render_plots(records: list[dict], results_dir: Path) -> list[Path]:
    from lra import plots

    if not plots.available():
        print("[lra] matplotlib is not installed: no plots (pip install -e '.[plots]').")
        return []
    return (validation_plots(records, results_dir, load_evaluations(results_dir))
            + accuracy_plots(results_dir, records))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lra-tables", description="Render results/accuracy.{md,csv,tex} and the "
                                                                      "accuracy plots from the run records.")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--published", default=None,
                        help="published figures CSV (default: <results-dir>/published.csv, else the "
                             "repository's results/published.csv)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    args = parser.parse_args(argv)
    results = Path(args.results_dir)
    if not results.is_dir():
        print(f"error: --results-dir {results} is not a folder: give the folder that holds runs/ (the records "
              f"lra-train writes under paths.results_dir; default results).", file=sys.stderr)
        return 2
    published = Path(args.published) if args.published else reference_file(results, PUBLISHED)
    if not published.is_file():
        print(f"error: the published figures {published} do not exist: give --published <csv> (columns protocol, "
              f"model, task, accuracy, source, note).", file=sys.stderr)
        return 2
    used = [published] + [reference_file(results, name) for name in (KNOWN_REASONS, NOT_RUN)]
    print("[lra] published figures and reasons: " + ", ".join(map(str, used)))
    for path in render(results, published, args.plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
