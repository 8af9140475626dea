"""Sweeps: ``make sweep`` (task x model x seed grids over Hydra multirun) and the end-of-sweep summary.

    python -m lra.sweep --tasks listops,text --models transformer,proxyformer --seeds 0,1,2 --protocol nystrom
    make sweep TASKS=listops,text MODELS=transformer,proxyformer SEEDS=0,1,2 [PROTOCOL=nystrom] [ARGS="..."]

checks that every task and model names a config and that every cell composes with the given overrides (either
mistake would otherwise stop Hydra half-way through the grid), then runs
``python -m lra.train -m task=... model=... seed=... protocol=... resume=true [ARGS]``:

* one job per cell; ``resume=true`` skips a cell whose experiment already has a finished record and continues an
  interrupted one from its last checkpoint, so re-running the same command resumes the sweep;
* a job that fails (out of memory, NaN/Inf loss, bad config, missing data, ...) writes a failure record with the
  reason and the sweep goes on; ``make tables`` shows the cell as failed;
* ``SweepSummary`` (a Hydra callback in ``configs/train.yaml``) prints one line per job at the end, from the
  ``outcome.json`` every job writes into its folder, and exits with status 1 if any job failed.

Extra overrides in ``ARGS`` apply to every cell, including Hydra's own: ``hydra/launcher=slurm`` sends the cells
to a SLURM cluster, ``hparams_search=<name>`` turns the sweep into an Optuna search (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NAMED = ("task=", "model=", "protocol=", "seed=")  # overrides the summary line already shows


class SweepSummary(Callback):
    """Around a multirun. Before: creates the folder of an Optuna SQLite study (``hparams_search``). After: a
    line per job (ok / skipped / failed with its reason / smoke: a ``fast_dev_run``, no record), an Optuna
    search's best parameters; status 1 if any job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        storage = str(config.hydra.sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = [job_outcome(job) for job in sorted(p.parent for p in sweep_dir.rglob(".hydra"))]
        best = sweep_dir / "optimization_results.yaml"
        if best.is_file():
            print(f"\n[lra] Optuna study {config.hydra.sweeper.study_name} ({config.hydra.sweeper.storage}), "
                  f"best so far ({best}):\n{best.read_text()}")
        if not outcomes:
            print(f"\n[lra] sweep {sweep_dir}: no job ran.")
            sys.exit(1)
        shared = set.intersection(*(set(o.get("overrides", [])) for o in outcomes))  # show what tells jobs apart
        counts: dict[str, int] = {}
        print(f"\n[lra] sweep {sweep_dir}:")
        for o in outcomes:
            counts[o["status"]] = counts.get(o["status"], 0) + 1
            extra = [x for x in o.get("overrides", []) if x not in shared and not x.startswith(NAMED)]
            cell = f"{o.get('task', '?')}/{o.get('model', '?')}/{o.get('protocol', '?')} seed {o.get('seed', '?')}"
            cell += f" [{' '.join(extra)}]" if extra else ""
            if o["status"] in ("failed", "smoke"):
                detail = o["reason"] + (f" ({o['record']})" if o.get("record") else "")
            else:
                detail = f"test {100 * o['test_acc']:.2f}%" if o.get("test_acc") is not None else ""
            print(f"  {o['status']:8s} {cell}  {detail}")
        print("[lra] " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
              + ". Tables: make tables")
        if counts.get("failed"):
            sys.exit(1)


def job_outcome(job_dir: Path) -> dict:
    """A job's ``outcome.json``; a job that wrote none (it stopped before its run could, or the file is unreadable)
    counts as failed, named by the overrides Hydra saved for it."""
    try:
        return json.loads((job_dir / "outcome.json").read_text())
    except (OSError, ValueError) as err:
        try:
            from omegaconf import OmegaConf

            overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        except (OSError, ValueError):
            overrides = []
        picked = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith(NAMED)}
        why = "no outcome.json" if isinstance(err, FileNotFoundError) else f"unreadable outcome.json ({err})"
        return {"status": "failed", "task": picked.get("task", "?"), "model": picked.get("model", "?"),
                "protocol": picked.get("protocol", "?"), "seed": picked.get("seed", "?"), "overrides": overrides,
                "reason": f"{why}: the job stopped before recording its outcome (see {job_dir})"}


def _names(group: str, text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"error: unknown {group} name(s) {unknown or names}: configs/{group}/ has {known}")
    return names


def _one_value(overrides: list[str]) -> list[str]:
    """Each sweep override (``optim.lr=1e-3,1e-4``) cut to its first value, for composing one config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if not parsed.is_sweep_override():
            out.append(line)
            continue
        try:
            first = next(iter(parsed.sweep_string_iterator()))
        except Exception:  # an interval (a search space for a sweeper): nothing to compose
            continue
        out.append(f"{line.split('=', 1)[0]}={first}")
    return out


def _check_cells(tasks: list[str], models: list[str], protocol: str, overrides: list[str]) -> None:
    """Compose every task x model config first: an override that does not apply to some model would otherwise stop
    Hydra in the middle of the grid."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    fixed, bad = _one_value(overrides), []
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        for task in tasks:
            for model in models:
                try:
                    compose("train", overrides=[f"task={task}", f"model={model}", f"protocol={protocol}", *fixed])
                except Exception as err:
                    bad.append(f"  task={task} model={model}: {str(err).splitlines()[0]}")
    GlobalHydra.instance().clear()
    if bad:
        raise SystemExit("error: these cells do not compose, nothing was run:\n" + "\n".join(bad) + "\nFix the "
                         "overrides, drop the cells, or add a key only some models have with '++key=value'.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lra-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", required=True, help="comma-separated configs/task names")
    parser.add_argument("--models", required=True, help="comma-separated configs/model names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--protocol", default="nystrom", help="configs/protocol name (default nystrom)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every cell")
    args = parser.parse_args(argv)
    tasks, models = _names("task", args.tasks), _names("model", args.models)
    _names("protocol", args.protocol)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    _check_cells(tasks, models, args.protocol, args.overrides)
    cmd = [sys.executable, "-m", "lra.train", "-m", f"task={','.join(tasks)}", f"model={','.join(models)}",
           f"seed={','.join(map(str, seeds))}", f"protocol={args.protocol}", "resume=true", *args.overrides]
    print("[lra] " + " ".join(cmd[1:]), flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
