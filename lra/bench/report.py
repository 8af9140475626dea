"""Tables, growth reports and plots rendered from the benchmark records.

For each profile and device the latest run is rendered (older runs stay on disk). Within a run, a point
is compared with the softmax and sdpa points of the same mode, precision, batch size and length:

    speed ratio  = median_ms(reference) / median_ms(method)     (> 1: the method is faster; LRA Table 2)
    memory ratio = peak_mb(method) / peak_mb(reference)         (< 1: the method needs less)

A ratio is empty when either point is not ``ok`` (``oom``, ``timeout``, ``error``) or has no memory figure.
When several model configs use the reference attention, the first by name is the reference. A growth
report gives, per model, ``time(long) / time(short)`` and ``memory(long) / memory(short)`` and whether both
are within a limit (a linear method's figures grow about ``long / short`` times, a quadratic one's its square).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from lra.bench.grid import REFERENCES
from lra.results import load_json_records, write_text_atomic

SECTION = ("mode", "precision", "batch_size")
CSV_COLUMNS = ["profile", "device", "run_id", "mode", "precision", "batch_size", "compile", "model", "attention",
               "seq_len", "status", "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "steps_per_s",
               "tokens_per_s", "peak_mb", "rss_peak_mb", "speed_vs_softmax", "speed_vs_sdpa", "memory_vs_softmax",
               "memory_vs_sdpa", "error", "record"]


def load_bench_records(results_dir: str | Path) -> list[dict]:
    return load_json_records(Path(results_dir) / "bench")


def latest_runs(records: list[dict]) -> list[list[dict]]:
    """The runs to render: the latest run (run ids start with their time) of each named profile and device, and
    every run with options of its own (``<profile>-custom``), each in its own section, so an exploratory run never
    replaces a profile's section or another exploratory run's."""
    runs = defaultdict(lambda: defaultdict(list))
    for r in records:
        custom = r["profile"].endswith("-custom")
        runs[(r["profile"], r["device_slug"], r["run_id"] if custom else "")][r["run_id"]].append(r)
    return [by_id[max(by_id)] for _, by_id in sorted(runs.items())]


def key(record: dict, *fields: str) -> tuple:
    return tuple(record[f] for f in fields)


def model_order(records: list[dict]) -> list[str]:
    """Reference models first (softmax, then sdpa), then the others by name."""
    rank = {a: i for i, a in enumerate(REFERENCES)}
    firsts = {}
    for r in sorted(records, key=lambda r: r["model"]):
        firsts.setdefault(r["model"], r["attention"])
    return sorted(firsts, key=lambda m: (rank.get(firsts[m], len(rank)), m))


def references(records: list[dict], attention: str) -> dict[tuple, dict]:
    """``(mode, precision, batch_size, seq_len) -> record`` of the reference model for ``attention``."""
    refs = {}
    for r in sorted(records, key=lambda r: r["model"]):
        if r["attention"] == attention:
            refs.setdefault(key(r, *SECTION, "seq_len"), r)
    return refs


def speed_ratio(reference: dict | None, record: dict) -> float | None:
    if reference is None or reference["status"] != "ok" or record["status"] != "ok":
        return None
    return reference["median_ms"] / record["median_ms"]


def memory_ratio(reference: dict | None, record: dict) -> float | None:
    if speed_ratio(reference, record) is None or record["peak_mb"] is None or not reference["peak_mb"]:
        return None
    return record["peak_mb"] / reference["peak_mb"]


def with_ratios(records: list[dict]) -> list[dict]:
    """Each record of one run with ``speed_vs_<ref>`` and ``memory_vs_<ref>`` for ref in softmax, sdpa."""
    refs = {ref: references(records, ref) for ref in REFERENCES}
    rows = []
    for r in records:
        row = dict(r)
        for ref in REFERENCES:
            reference = refs[ref].get(key(r, *SECTION, "seq_len"))
            row[f"speed_vs_{ref}"] = speed_ratio(reference, r)
            row[f"memory_vs_{ref}"] = memory_ratio(reference, r)
        rows.append(row)
    return rows


def growth(records: list[dict], mode: str, short: int, long: int) -> list[dict]:
    """Per model, precision and batch size: ``time_ratio`` and ``memory_ratio`` of length ``long`` to ``short``."""
    points = {key(r, "model", "precision", "batch_size", "seq_len"): r for r in records if r["mode"] == mode}
    rows = []
    for (model, precision, batch, n), a in sorted(points.items()):
        b = points.get((model, precision, batch, long))
        if n != short or b is None:
            continue
        ok = a["status"] == "ok" and b["status"] == "ok"
        with_memory = ok and bool(a["peak_mb"]) and b["peak_mb"] is not None
        rows.append({
            "model": model, "precision": precision, "batch_size": batch,
            "statuses": f"{short}: {a['status']}, {long}: {b['status']}",
            "time_ratio": b["median_ms"] / a["median_ms"] if ok else None,
            "memory_ratio": b["peak_mb"] / a["peak_mb"] if with_memory else None,
        })
    return rows


def growth_verdict(row: dict, limit: float) -> str:
    if row["time_ratio"] is None or row["memory_ratio"] is None:
        return f"n/a ({row['statuses']})"
    return "yes" if max(row["time_ratio"], row["memory_ratio"]) <= limit else "NO"


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:#.3g}"


def growth_lines(records: list[dict], check: dict) -> list[str]:
    rows = growth(records, check["mode"], check["short"], check["long"])
    ratio = f"{check['long']}/{check['short']}"
    lines = [f"| model | precision | batch | time {ratio} | memory {ratio} | both ≤ {check['limit']}× |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['precision']} | {row['batch_size']} | {fmt(row['time_ratio'])} | "
                     f"{fmt(row['memory_ratio'])} | {growth_verdict(row, check['limit'])} |")
    return lines


def _table(title: str, models: list[str], lengths: list[int], cell) -> list[str]:
    lines = [title, "", "| model | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell(m, n) for n in lengths) + " |")
    return lines + [""]


def section_lines(rows: list[dict], repeats: int) -> list[str]:
    """The four tables of one mode / precision / batch size: speed, memory, each absolute and relative."""
    at = {(r["model"], r["seq_len"]): r for r in rows}
    models, lengths = model_order(rows), sorted({r["seq_len"] for r in rows})

    def status_or(m, n, show):
        r = at.get((m, n))
        if r is None:
            return ""
        return show(r) if r["status"] == "ok" else ("OOM" if r["status"] == "oom" else r["status"])

    def speed(r):
        return f"{fmt_rate(r['steps_per_s'])} ({fmt_rate(1000 / r['max_ms'])}–{fmt_rate(1000 / r['min_ms'])})"

    def memory(r):
        return "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"

    def relative(kind):
        return lambda r: " / ".join(fmt(r[f"{kind}_vs_{ref}"]) for ref in REFERENCES)

    return [
        *_table(f"Steps per second: median of {repeats} timed steps (slowest–fastest)", models, lengths,
                lambda m, n: status_or(m, n, speed)),
        *_table("Speed relative to softmax / sdpa (their time over this method's; > 1 is faster)", models,
                lengths, lambda m, n: status_or(m, n, relative("speed"))),
        *_table("Peak memory (MB) above parameters, optimizer state and inputs", models, lengths,
                lambda m, n: status_or(m, n, memory)),
        *_table("Memory relative to softmax / sdpa (this method's peak over theirs; < 1 is less)", models,
                lengths, lambda m, n: status_or(m, n, relative("memory"))),
    ]


def run_lines(records: list[dict]) -> list[str]:
    first = records[0]
    bench, enc = first["config"]["bench"], first["config"]["encoder"]
    commit = first["git"]["commit"][:12] + (" (uncommitted changes)" if first["git"]["dirty"] else "")
    threads = next((r["threads"] for r in records if r.get("threads")), "?")
    host = f" {threads} CPU threads." if first["device_type"] == "cpu" else ""
    memory_limit = f"{bench['memory_limit_mb']:g} MB" if bench["memory_limit_mb"] else "80% of RAM"
    custom = f" (run `{first['run_id']}`: options of its own)" if first["profile"].endswith("-custom") else ""
    lines = [
        f"## Profile `{first['profile']}`{custom} on {first['device']}",
        "",
        f"Run `{first['run_id']}`, commit {commit}, torch {first['versions']['torch']}.{host} "
        f"Encoder of protocol `{bench['protocol']}`: depth "
        f"{enc['depth']}, width {enc['dim']}, {enc['num_heads']} heads, MLP {enc['mlp_dim']}. "
        f"{bench['warmup']} warm-up and {bench['repeats']} timed steps per point, compile={bench['compile']}, "
        f"per-point limits {bench['timeout_s']:g} s and {memory_limit}. Memory: "
        f"{next((r['memory_method'] for r in records if r.get('memory_method')), 'not measured')}.",
        "",
    ]
    rows = with_ratios(records)
    sections = defaultdict(list)
    for r in rows:
        sections[key(r, *SECTION)].append(r)
    for (mode, precision, batch), part in sorted(sections.items()):
        what = "attention module alone, inference" if mode == "attention" else "training step of the encoder"
        lines += [f"### {mode} ({what}), {precision}, batch {batch}", ""]
        lines += section_lines(part, bench["repeats"])
    for check in bench["scaling_checks"]:
        if growth(records, check["mode"], check["short"], check["long"]):  # a check this run has points for
            lines += [f"### Growth from {check['short']} to {check['long']} tokens, {check['mode']} mode", ""]
            lines += growth_lines(records, check) + [""]
    return lines


HEADER = [
    "# Efficiency: speed and memory",
    "",
    "Measured by `lra-bench` (`make bench`); generated from the records under `results/bench/`, one JSON",
    "file per point with device, versions, commit and configuration. Each point runs in a fresh process;",
    "times are medians of the timed steps; memory is the peak of one further step above what was held before",
    "it, in bytes of live tensors (CUDA: `max_memory_allocated`; CPU: tensors tracked at the dispatcher; the",
    "CPU records also hold the process's peak resident memory, `rss_peak_mb`, in the CSV).",
    "Ratios compare with softmax and sdpa measured in the same run (LRA Table 2: relative speed and memory).",
    "`attention` mode times the attention module alone (inference, batch 1 as in the Nyströmformer paper);",
    "`train` mode a full training step of the encoder (forward, backward, AdamW; as in the LRA paper).",
    "No method drops attention weights in the benchmark (attention dropout would send exact attention to PyTorch's",
    "math kernel); half-precision points run the attention in half precision too. One section per profile and",
    "device (its latest run), and one per run with options of its own (`<profile>-custom`), never replaced.",
    "The method is described in `lra/bench/__init__.py`. Regenerate with `lra-bench --render-only`.",
    "",
]


def write_csv(runs: list[list[dict]], path: Path) -> None:
    f = io.StringIO()
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for records in runs:
        for row in with_ratios(records):
            out = {c: row.get(c) for c in CSV_COLUMNS}
            out.update(device=row["device"], record=row["_path"])
            writer.writerow({c: "" if v is None else v for c, v in out.items()})
    write_text_atomic(path, f.getvalue())


def length_curves(records: list[dict]) -> dict[tuple, dict[str, list[tuple]]]:
    """``(mode, precision, batch) -> model -> [(seq_len, steps_per_s, slowest, fastest, peak_mb)]`` over the ``ok``
    points (slowest/fastest: the steps/s of the slowest and fastest timed step)."""
    curves = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: r["seq_len"]):
        if r["status"] == "ok":
            curves[key(r, *SECTION)][r["model"]].append(
                (r["seq_len"], r["steps_per_s"], 1000 / r["max_ms"], 1000 / r["min_ms"], r["peak_mb"]))
    return curves


def plot_run(records: list[dict], plots_dir: Path) -> list[Path]:
    from lra import plots

    first = records[0]
    stem = f"{first['profile']}_{first['device_slug']}"
    if first["profile"].endswith("-custom"):  # each exploratory run has its own section, and its own plots
        stem += f"_{first['run_id']}"
    memory = next((r["memory_method"] for r in records if r.get("memory_method")), "not measured")
    written = []
    for (mode, precision, batch), curves in sorted(length_curves(records).items()):
        path = plots_dir / f"efficiency_{stem}_{mode}_{precision}_b{batch}.png"
        what = "attention module alone, inference" if mode == "attention" else "training step of the encoder"
        plots.plot_length_curves(curves, path, f"profile {first['profile']} on {first['device']}\n{mode} ({what}), "
                                                f"{precision}, batch {batch}", memory)
        written.append(path)
    return written


def render(results_dir: str | Path, plots: bool = True, log=print) -> list[Path]:
    """Write ``efficiency.md``, ``efficiency.csv`` and (``plots`` and matplotlib) ``plots/*.png``; their paths."""
    from lra import plots as charts

    results_dir = Path(results_dir)
    runs = latest_runs(load_bench_records(results_dir))
    lines = list(HEADER)
    for records in runs:
        lines += run_lines(records)
    if not runs:
        lines.append("No benchmark records yet: run `lra-bench --profile quick`.")
    md, table = results_dir / "efficiency.md", results_dir / "efficiency.csv"
    write_text_atomic(md, "\n".join(lines) + "\n")
    write_csv(runs, table)
    written = [md, table]
    if not plots:
        return written
    if not charts.available():
        log("[lra-bench] matplotlib is not installed: no plots (pip install -e '.[plots]').")
        return written
    from lra.tables import accuracy_plots

    for records in runs:
        written += plot_run(records, results_dir / "plots")
    return written + accuracy_plots(results_dir)  # accuracy against the speed just measured
