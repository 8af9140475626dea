"""``lra-bench``: run a profile's grid (with command-line overrides), then render tables, plots and reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lra.bench.grid import CONFIGS, MODES, PRECISIONS, BenchError, load_profile, run_grid
from lra.bench.report import REFERENCES, growth_lines, render, with_ratios


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lra-bench", description=(
        "Time and peak memory of every attention over sequence lengths (see lra/bench/__init__.py for the "
        "method). A profile (configs/bench/<name>.yaml) sets the grid; the options below override its keys."))
    p.add_argument("--profile", default="quick", help="configs/bench/<name>.yaml (quick, full, scaling, ...)")
    p.add_argument("--models", nargs="+", help="model config names (configs/model/); softmax and sdpa are added")
    p.add_argument("--lengths", nargs="+", type=int, help="sequence lengths")
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="bf16/fp16: GPU only")
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--warmup", type=int, help="untimed steps per point")
    p.add_argument("--repeats", type=int, help="timed steps per point")
    p.add_argument("--timeout", dest="timeout_s", type=float, help="seconds per point (then: timeout)")
    p.add_argument("--memory-limit-mb", type=float, help="resident MB per point (then: oom)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    p.add_argument("--threads", type=int, help="CPU threads per point (torch.set_num_threads)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"))
    p.add_argument("--protocol", help="configs/protocol/<name>.yaml giving the encoder")
    p.add_argument("--task", help="configs/task/<name>.yaml whose recipe sizes the encoder")
    p.add_argument("--in-process", dest="isolate", action="store_false", default=None,
                   help="run points in this process (no time or memory limit; for debugging)")
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--configs", type=Path, default=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--render-only", action="store_true", help="only rebuild tables and plots from the records")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    return p


def settings_from(args: argparse.Namespace) -> tuple[str, dict]:
    """``(profile label, settings)``: the profile's settings with the overrides; label ``<name>-custom`` if any
    override changed them."""
    settings = load_profile(args.profile, args.configs)
    changed = {k: v for k, v in vars(args).items() if k in settings and v is not None and v != settings[k]}
    return (f"{args.profile}-custom" if changed else args.profile), {**settings, **changed}


def ratio_summary(records: list[dict]) -> list[str]:
    """One line per model at the longest length of each mode / precision / batch size."""
    lines = []
    rows = with_ratios(records)
    for section in sorted({(r["mode"], r["precision"], r["batch_size"]) for r in rows}):
        part = [r for r in rows if (r["mode"], r["precision"], r["batch_size"]) == section]
        longest = max(r["seq_len"] for r in part)
        lines.append(f"{section[0]} {section[1]} batch {section[2]}, N={longest}: speed and memory ratios "
                     f"to {' / '.join(REFERENCES)}")
        for r in sorted((r for r in part if r["seq_len"] == longest), key=lambda r: r["model"]):
            if r["status"] != "ok":
                lines.append(f"  {r['model']:<20} {r['status']}")
                continue
            speed = " / ".join("–" if r[f"speed_vs_{a}"] is None else f"{r[f'speed_vs_{a}']:.2f}x" for a in REFERENCES)
            memory = " / ".join("–" if r[f"memory_vs_{a}"] is None else f"{r[f'memory_vs_{a}']:.3f}x"
                                for a in REFERENCES)
            lines.append(f"  {r['model']:<20} speed {speed:<16} memory {memory}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not args.render_only:
            label, settings = settings_from(args)
            records = run_grid(label, settings, args.results_dir, args.configs)
            print("\n".join(ratio_summary(records)))
            for check in records[0]["config"]["bench"]["scaling_checks"]:
                print(f"\ngrowth {check['long']}/{check['short']} tokens, {check['mode']} mode "
                      f"(limit {check['limit']}x):")
                print("\n".join(growth_lines(records, check)))
        if args.render_only and not (Path(args.results_dir) / "bench").is_dir():
            raise BenchError(f"--render-only: {Path(args.results_dir) / 'bench'} does not exist, so there are no "
                             f"benchmark records to render: give the --results-dir that lra-bench wrote them under "
                             f"(default results), or run lra-bench without --render-only first.")
        for path in render(args.results_dir, plots=args.plots):
            print(f"wrote {path}")
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
