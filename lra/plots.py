"""PNG charts of the benchmark and of the accuracy records (matplotlib, Agg backend; optional extra ``plots``).

* ``plot_length_curves``: throughput (steps/s, error bars from the slowest to the fastest timed step) and peak
  memory against sequence length on log-log axes, with O(N) and O(N²) guide slopes; the four methods this suite
  exists for are drawn bold, the baselines thin; every method has its own colour, marker and line style.
* ``plot_validation_curves``: validation accuracy against training steps, one colour per method, one line per seed.
* ``plot_accuracy_vs_speed``: LRA Figure 3, one panel per task: accuracy against training steps/s, marker area
  proportional to peak memory, the majority-class rate drawn as the floor.
"""

from __future__ import annotations

import importlib.util
import itertools
import textwrap
from pathlib import Path

SEED_METHODS = ("nystromformer", "proxyformer", "cast", "tost")  # drawn bold
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, marker, line style) per name; the seed methods first, bold and in strong colours."""
    plt = _pyplot()
    strong, soft = plt.get_cmap("tab10").colors, plt.get_cmap("tab20b").colors + plt.get_cmap("tab20c").colors
    ordered = [n for n in names if n.split(" ")[0] in SEED_METHODS] + [n for n in names
                                                                       if n.split(" ")[0] not in SEED_METHODS]
    combos = itertools.cycle(itertools.product(LINESTYLES, MARKERS))
    out = {}
    for i, name in enumerate(ordered):
        seed = name.split(" ")[0] in SEED_METHODS
        linestyle, marker = ("-", MARKERS[i % len(MARKERS)]) if seed else next(combos)
        out[name] = {"color": strong[i % len(strong)] if seed else soft[(3 * i) % len(soft)], "marker": marker,
                     "linestyle": linestyle, "linewidth": 2.6 if seed else 1.1, "markersize": 7 if seed else 4,
                     "zorder": 3 if seed else 2, "label": name}
    return out


def _title(fig, text: str, width: int = 110) -> None:
    fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=9)


def _guides(ax, lengths: list[int], anchor: float, falling: bool = False) -> None:
    """Dashed O(N) and O(N²) slopes through ``anchor`` at the shortest length, labelled at the longest (``falling``:
    for a rate, which drops as 1/N and 1/N²)."""
    lo, hi = min(lengths), max(lengths)
    ax.set_xlim(lo / 1.15, hi * 1.45)  # room for the labels at the right end
    for power, name in ((1, "O(N)"), (2, "O(N²)")):
        end = anchor * (hi / lo) ** (-power if falling else power)
        ax.plot([lo, hi], [anchor, end], color="0.6", linestyle=(0, (4, 3)), linewidth=0.9, zorder=1)
        ax.annotate(name, (hi, end), fontsize=7, color="0.4", xytext=(3, 0), textcoords="offset points",
                    va="center")


def plot_length_curves(curves: dict[str, list[tuple]], path: Path, title: str, memory_method: str = "") -> Path:
    """``curves: model -> [(seq_len, steps_per_s, slowest, fastest, peak_mb)]`` -> two log-log panels in ``path``."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(14, 5.4))
    look = styles(list(curves))
    for model, points in curves.items():
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        low = [max(p[1] - p[2], 0) for p in points]
        high = [max(p[3] - p[1], 0) for p in points]
        speed.errorbar(xs, ys, yerr=[low, high], capsize=2, **look[model])
        with_memory = [p for p in points if p[4] is not None and p[4] > 0]
        memory.plot([p[0] for p in with_memory], [p[4] for p in with_memory], **look[model])
    lengths = sorted({p[0] for points in curves.values() for p in points})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    memory_label = "peak memory (MB)" + (f"\n{memory_method}" if memory_method else "")
    for ax, ylabel in ((speed, "steps per second (bars: slowest–fastest step)"), (memory, memory_label)):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if high / low < 30 else NullFormatter())  # label 2..9 on short axes
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 60)), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if len(lengths) > 1:
        firsts = [pts[0] for pts in curves.values() if pts and pts[0][0] == lengths[0]]
        with_memory = [p[4] for p in firsts if p[4]]
        if with_memory:
            _guides(memory, lengths, min(with_memory))
        if firsts:  # time grows as N or N²: steps/s falls as 1/N or 1/N²
            _guides(speed, lengths, max(p[1] for p in firsts), falling=True)
    memory.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="bold: the four methods",
                  title_fontsize=7)
    _title(fig, title)
    return _save(plt, fig, path)


def plot_validation_curves(curves: dict[str, list[tuple]], path: Path, title: str,
                           floor: tuple[float, str] | None = None) -> Path:
    """``curves: label -> [(seed, [(step, val_acc %)])]`` -> validation accuracy against training steps;
    ``floor: (accuracy %, grouping)`` draws the validation split's floor of always answering the most common
    label of each group (e.g. ListOps' root operator)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    look = styles(list(curves))
    for label, runs in sorted(curves.items()):
        for i, (seed, points) in enumerate(sorted(runs)):
            style = {**look[label], "linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": None,
                     "label": f"{label} (seed {seed})" if len(runs) > 1 else label}
            ax.plot([p[0] for p in points], [p[1] for p in points], **style)
    if floor is not None:
        ax.axhline(floor[0], color="0.3", linestyle=":", linewidth=1.2)
        text = f"floor {floor[0]:.2f}%: always the training split's most common label of the {floor[1]}"
        ax.annotate(text, (0.01, floor[0]), xycoords=("axes fraction", "data"), xytext=(0, -3),
                    textcoords="offset points", va="top", fontsize=7, color="0.3")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _title(fig, title, 90)
    return _save(plt, fig, path)


def plot_accuracy_vs_speed(panels: dict[str, tuple], path: Path, title: str) -> Path:
    """``panels: task -> ([(label, accuracy %, steps_per_s, peak_mb)], majority-class rate % or None)`` -> one
    scatter per task, marker area proportional to peak memory (the largest marker = the largest memory)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    largest = max((p[3] or 0 for points, _ in panels.values() for p in points), default=0) or 1
    look = styles(sorted({p[0] for points, _ in panels.values() for p in points}))
    for ax, (task, (points, floor)) in zip(axes[0], panels.items(), strict=True):
        for label, accuracy, speed, memory in points:
            ax.scatter(speed, accuracy, s=40 + 800 * (memory or 0) / largest, alpha=0.55, color=look[label]["color"],
                       marker=look[label]["marker"], zorder=3)
            ax.annotate(label, (speed, accuracy), textcoords="offset points", xytext=(6, 6), fontsize=7)
        if floor is not None:
            ax.axhline(floor, color="0.5", linestyle="--", linewidth=1)
            ax.annotate(f"majority class {floor:.1f}%", (0.01, floor), xycoords=("axes fraction", "data"),
                        fontsize=7, color="0.35", xytext=(0, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training steps per second")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task, fontsize=9)
        ax.grid(True, alpha=0.3)
    _title(fig, title, 120)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write ``path`` (creating its folder; nothing clipped) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
