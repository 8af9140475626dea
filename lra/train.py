"""The one training entry point: compose config -> fit -> test (best or last checkpoint) -> write a run record.

    python -m lra.train task=listops model=transformer protocol=nystrom seed=0
    python -m lra.train -m model=transformer,sdpa seed=0,1,2 protocol=quick      # Hydra multirun
    lra-train ...                                                                  # the same, installed

Configs live in ``configs/`` (``train.yaml`` composes ``task/``, ``model/``, ``protocol/``, ``recipe/`` (the
protocol's numbers for the task), ``trainer/``, ``logger/``, ``paths/``, and optionally ``hparams_search/`` and
``debug/``). ``lra.eval`` tests a checkpoint with the same config and the same ``build``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lra.callbacks import RunHistory, StepProgressBar, StepSeed, Throughput
from lra.console import quiet_known_noise, tee_console
from lra.data import DataError
from lra.loggers import build_loggers, close_loggers, hyperparameters, log_hyperparams
from lra.models import build_model
from lra.module import LRAModule, NonFiniteLoss
from lra.preflight import (
    CellLock,
    ConfigError,
    check_added_keys,
    check_checkpoint,
    check_values,
    check_writable,
    loads,
    resolved,
    usable_checkpoint,
)
from lra.results import (
    breakdown_lines,
    by_group,
    cell_key,
    create_json,
    device_name,
    finished_record,
    floors_by_group,
    git_state,
    package_versions,
    write_record,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parent.parent


def _output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


CPU_FALLBACK = {"16-mixed": "32-true", "16": "32-true", "16-true": "32-true"}  # fp16 is a GPU format


def resolve_hardware(cfg: DictConfig) -> None:
    """Set ``trainer.accelerator`` and ``trainer.precision`` to what the run will really use, before anything is
    derived from the config (the experiment key, the record): a CPU run and a GPU run, or an fp32 and an fp16 run,
    are different experiments. ``auto`` becomes ``gpu`` when CUDA is available, else ``cpu``; on CPU the fp16
    precisions become ``32-true``, said out loud (``bf16-mixed`` and ``bf16-true`` run on CPU as asked)."""
    accelerator, precision = str(cfg.trainer.accelerator), str(cfg.trainer.precision)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} (trainer=gpu) but torch sees no CUDA device"
                          f"{' (a CPU build of torch)' if torch.version.cuda is None else ''}. Run on a GPU machine "
                          f"with a CUDA build of torch (make ... TORCH=... TORCH_INDEX=...), or use trainer=cpu.")
    if accelerator == "cpu" and precision in CPU_FALLBACK:
        print(f"[lra] trainer.precision={precision} is a GPU setting; this run is on CPU and uses "
              f"{CPU_FALLBACK[precision]} (recorded).")
        precision = CPU_FALLBACK[precision]
    with open_dict(cfg):
        cfg.trainer.accelerator, cfg.trainer.precision = accelerator, precision


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


CELL_CONFIG = "config.yaml"  # in an experiment's folder: the config of its latest segment, as composed


def _cell_dir(cfg: DictConfig, cell: str) -> Path:
    """Where a ``resume=true`` run keeps its checkpoints (and ``CELL_CONFIG``, the config its latest segment was
    composed with, for ``lra-eval``): one folder per experiment, found again by a re-run."""
    name = f"{cfg.task.name}_{cfg.protocol.name}_{cfg.model.name}_seed{cfg.seed}_{cell}"
    return Path(cfg.paths.log_dir) / "cells" / name


def _check_launch(trainer_cfg: dict) -> None:
    """DDP inside a multirun needs a launcher that starts every process itself (SLURM, torchrun)."""
    devices = trainer_cfg.get("devices", 1)
    many = devices in ("auto", -1) or (isinstance(devices, int) and devices > 1) or trainer_cfg.get("num_nodes", 1) > 1
    external = "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if _multirun() and many and str(trainer_cfg.get("strategy", "auto")).startswith("ddp") and not external:
        raise ConfigError(
            "trainer=ddp in a Hydra multirun (-m) with the basic launcher would make Lightning re-run the whole "
            "sweep in every extra process. Run the cells one by one (no -m), or sweep with a launcher that starts "
            "one process per device itself: hydra/launcher=slurm with tasks_per_node = trainer.devices."
        )


def _failure_reason(err: BaseException) -> str:
    if isinstance(err, NonFiniteLoss):
        return f"non-finite loss at step {err.step}"
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err):
        return "out of memory"
    if isinstance(err, ConfigError):
        return "bad config"
    if isinstance(err, DataError):
        return "data error"
    return f"error: {type(err).__name__}"


HINTS = {  # what to try, by failure reason
    "non-finite loss": ". Lower optim.lr, raise optim.warmup_steps or set trainer.gradient_clip_val; the failure "
                       "record names the last good checkpoint.",
    "out of memory": ". Lower data.batch_size (add +trainer.accumulate_grad_batches=k to keep the batch), use "
                     "bf16-mixed on a GPU, or a more memory-lean attention.",
}


def _overrides() -> list[str]:
    """The command line's overrides as typed (interpolations left unresolved)."""
    if not HydraConfig.initialized():
        return []
    return list(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def _write_outcome(out_dir: Path, outcome: dict) -> None:
    """``<job dir>/outcome.json``: what this job did (ok | skipped | failed) and its overrides, read by the sweep
    summary."""
    outcome["overrides"] = _overrides()
    write_text_atomic(out_dir / "outcome.json", json.dumps(outcome, indent=1, default=str))


def run(cfg: DictConfig) -> dict:
    """Train, test and record one run; returns the record.

    First the preflight (``lra.preflight``): hardware resolved, settings and added keys checked, the config
    resolved, the record folder writable, the experiment claimed (``resume=true``) and the checkpoint to continue
    from chosen. A problem found there, a data error or a missing package is not the experiment's failure: it raises
    with a one-paragraph message and leaves no failure record (only the sweep's ``outcome.json``). A run that fails
    while training (non-finite loss, out of memory, a crash) writes a failure record (``status: failed`` with the
    reason, the step reached and the last loadable checkpoint) and re-raises.

    The record is written under ``paths.results_dir`` (``record=false``: not written; ``fast_dev_run``: never),
    by the global rank zero only; if that folder cannot be written at the end, next to the checkpoints. With
    ``resume=true`` a run whose experiment (``cell_key``) already has a finished record is skipped (that record is
    returned), one that another process is training is skipped too, and an unfinished one continues from its
    last checkpoint under ``<paths.log_dir>/cells/``. ``ckpt_path=`` continues a run in that checkpoint's folder.
    """
    started = time.time()
    out_dir = _output_dir(cfg)
    fast = bool(cfg.trainer.fast_dev_run)
    state: dict = {}
    ident = {key.split(".")[0]: OmegaConf.select(cfg, key, default="?", throw_on_resolution_failure=False)
             for key in ("task.name", "model.name", "protocol.name", "seed")}
    rank_zero = rank_zero_only.rank == 0
    try:
        config = resolved(cfg)
        composed = OmegaConf.to_yaml(cfg)  # as composed (before the hardware fallbacks): what lra-eval re-uses
        resolve_hardware(cfg)
        check_values(cfg)
        check_added_keys(_overrides())
        config = resolved(cfg)
        cell = state["cell"] = cell_key(config)
        records = Path(cfg.paths.results_dir) / "runs" / cfg.protocol.name / cfg.task.name / cfg.model.name
        if cfg.record and not fast and rank_zero:
            check_writable(records)
        if cfg.resume and not fast:
            done = _finished(cfg, cell)
            if done is None and rank_zero:
                lock = state["lock"] = CellLock(_cell_dir(cfg, cell))
                if not lock.acquired:
                    print(f"[lra] {_name(cfg)}: another process is training this experiment ({lock.path}); "
                          f"skipped.")
                    _write_outcome(out_dir, {**ident, "status": "skipped", "cell": cell,
                                             "reason": "running in another process"})
                    return {"status": "skipped", "reason": "running in another process", **ident}
                done = _finished(cfg, cell)  # it may have finished while we waited for the claim
            if done is not None:
                print(f"[lra] {_name(cfg)}: finished before (test accuracy {100 * done['test_acc']:.2f}%, "
                      f"{done['_path']}); skipped.")
                if rank_zero:
                    _write_outcome(out_dir, {**ident, "status": "skipped", "cell": cell, "record": done["_path"],
                                             "val_acc": done.get("val_acc"), "test_acc": done.get("test_acc")})
                return done
        ckpt_dir, ckpt_path = _checkpoints(cfg, cell, out_dir)
        if cfg.resume and cfg.ckpt_path is None and not fast and rank_zero:  # the experiment's folder keeps its config
            write_text_atomic(ckpt_dir / CELL_CONFIG, composed)
        git = git_state(REPO)  # the code that runs: taken now, not when the run ends

        def provenance() -> dict:  # what every record, finished or failed, says about the run that made it
            history = state.get("history")  # a resumed run: the time and count of the segments before this one
            earlier, segments = state.get("segments") or ((history.earlier_s, history.segments) if history
                                                          else (0.0, 1))
            return {**ident, "attention": cfg.model.attention, "cell": cell, "resumed_from": ckpt_path,
                    "output_dir": str(out_dir), "wall_time_s": round(earlier + time.time() - started, 2),
                    "segments": segments, "git": git, "versions": package_versions(), "config": config,
                    "finished": time.time()}

        record = {**_fit_and_test(cfg, out_dir, ckpt_dir, ckpt_path, state), **provenance()}
    except Exception as err:
        trainer = state.get("trainer")
        rank_zero = trainer.is_global_zero if trainer is not None else rank_zero
        if rank_zero and not fast:
            reason, path = _failure_reason(err), None
            if cfg.record and not isinstance(err, NOT_THE_EXPERIMENT):
                last = _loadable_last(state.get("ckpt_dir"))
                failure = {
                    "status": "failed", "reason": reason,
                    "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-8),
                    "step": trainer.global_step if trainer is not None else None,
                    "last_checkpoint": last,
                    "data": state["datamodule"].describe_source() if "datamodule" in state else {},
                    "device": device_name(trainer.strategy.root_device) if trainer is not None else None,
                    **provenance(),
                }
                path = err.failure_record = _save_record(cfg, failure, state)
            _write_outcome(out_dir, {**ident, "status": "failed", "cell": state.get("cell"), "reason": reason,
                                     "error": f"{type(err).__name__}: {err}", "record": path})
        raise
    finally:
        if "lock" in state:
            state["lock"].release()
    if state["trainer"].is_global_zero:
        _print_summary(cfg, record, state.get("notes", []))
    if fast:
        print("[lra] fast_dev_run: no run record written (smoke test, not a measurement).")
        if state["trainer"].is_global_zero:  # a sweep of smoke tests: each job ran, none is a measurement
            _write_outcome(out_dir, {**ident, "status": "smoke", "cell": cell, "record": None,
                                     "reason": "fast_dev_run: no record"})
    elif state["trainer"].is_global_zero:
        path = record["_path"] = _save_record(cfg, record, state) if cfg.record else None
        _write_outcome(out_dir, {**ident, "status": "ok", "cell": cell, "record": path,
                                 "val_acc": record["val_acc"], "test_acc": record["test_acc"]})
    return record


NOT_THE_EXPERIMENT = (ConfigError, DataError, ImportError)  # no failure record: the run never was the experiment

MEMORY_KINDS = {"process_peak_rss": "process peak RSS", Throughput.CUDA_KIND: "CUDA, above the step's start"}


def _print_summary(cfg: DictConfig, record: dict, notes: list[str]) -> None:
    """The end of a run on the console: accuracy against the majority rate, then where the run is and how fast."""
    val = "n/a" if record["val_acc"] is None else f"{100 * record['val_acc']:.2f}%"
    print(f"[lra] {_name(cfg)}: test accuracy {100 * record['test_acc']:.2f}% (majority-class rate of this test "
          f"set: {100 * record['test_majority_rate']:.2f}%), best val {val}, {record['steps']} steps in "
          f"{record['wall_time_s']:.0f}s")
    if "test_by" in record:
        print("\n".join(breakdown_lines(record, tuple(record["test_by"]), ("test",))))
    rate = record.get("train_tokens_per_s")
    kind = MEMORY_KINDS.get(record.get("peak_memory_kind"), record.get("peak_memory_kind"))
    print(f"[lra]   run folder: {record['output_dir']}"
          + (f"; best checkpoint: {record['checkpoint']}" if record.get("checkpoint") else ""))
    print(f"[lra]   training speed: {f'{rate:,.0f} tokens/s' if rate else 'n/a'} (median step); peak memory: "
          f"{record.get('peak_memory_mb', 0):,.1f} MB ({kind})")
    for profile in sorted(Path(record["output_dir"]).glob("*-profile.txt")):
        print(f"[lra]   profile (Lightning's SimpleProfiler): {profile}")
    if not cfg.record and not cfg.trainer.fast_dev_run:
        print("[lra]   record=false: no run record written.")
    for note in notes:
        print(f"[lra]   {note}")


def _name(cfg: DictConfig) -> str:
    return f"{cfg.task.name}/{cfg.model.name}/{cfg.protocol.name} seed {cfg.seed}"


def _finished(cfg: DictConfig, cell: str) -> dict | None:
    return finished_record(cfg.paths.results_dir, cfg.protocol.name, cfg.task.name, cfg.model.name, cell)


def _checkpoints(cfg: DictConfig, cell: str, out_dir: Path) -> tuple[Path, str | None]:
    """Where this run keeps its checkpoints, and the checkpoint it continues from (None: from scratch).

    ``ckpt_path=`` continues in that checkpoint's own folder, so the best-validation checkpoint and score found
    before the interruption stay in the race; ``resume=true`` uses the experiment's folder under ``cells/``.
    """
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={path} does not exist. Give the path of a Lightning checkpoint written by a previous "
                f"run (its <output_dir>/checkpoints/last.ckpt), or drop ckpt_path to start from scratch.")
        return path.parent, str(path)
    if not cfg.resume:
        return out_dir / "checkpoints", None
    folder = _cell_dir(cfg, cell)
    path, note = usable_checkpoint(folder)
    if note:
        print(f"[lra] {note}")
    if path is not None:
        print(f"[lra] continuing this experiment from {path}")
    return folder, None if path is None else str(path)


def _loadable_last(folder: Path | None) -> str | None:
    """``last.ckpt`` of ``folder`` if it loads (failure records name it as the checkpoint to continue from)."""
    last = None if folder is None else folder / "last.ckpt"
    return str(last) if last is not None and last.is_file() and loads(last) is None else None


def _save_record(cfg: DictConfig, record: dict, state: dict) -> str:
    """Write the record under ``paths.results_dir``; if that fails now, next to the checkpoints (said out loud)."""
    try:
        path = write_record(cfg.paths.results_dir, record)
        print(f"[lra] run record: {path}")
    except OSError as err:
        folder = state.get("ckpt_dir") or Path(cfg.paths.log_dir)
        path = create_json(Path(folder) / f"record_{record['status'] if 'status' in record else 'ok'}_"
                           f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.json", record)
        print(f"[lra] could not write the run record under {cfg.paths.results_dir} ({err}); it is kept at {path}. "
              f"Copy it to {cfg.paths.results_dir}/runs/{record['protocol']}/{record['task']}/{record['model']}/ "
              f"for the tables.", file=sys.stderr)
    return str(path)


def build(cfg: DictConfig, state: dict) -> tuple:
    """The datamodule (prepared and set up; also ``state["datamodule"]``), the model and its LightningModule of a
    composed config: what training and ``lra.eval`` both run."""
    datamodule = state["datamodule"] = hydra.utils.instantiate(cfg.task.datamodule, seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup()
    try:
        model = build_model(
            OmegaConf.to_container(cfg.encoder, resolve=True),
            cfg.model.attention,
            OmegaConf.to_container(cfg.model.options, resolve=True) or {},
            vocab_size=datamodule.vocab_size,
            max_len=datamodule.seq_len,
            num_classes=datamodule.num_classes,
            dual=datamodule.dual,
        )
    except (KeyError, TypeError, ValueError) as err:  # unknown attention or option, or a bad option value
        raise ConfigError(f"model={cfg.model.name}: {err.args[0]}") from None
    module = LRAModule(model, OmegaConf.to_container(cfg.optim, resolve=True), max_steps=cfg.trainer.max_steps)
    if (breakdown := datamodule.breakdown()) is not None:  # ListOps: also count accuracy by root operator
        module.breakdown = breakdown[1:]
    return datamodule, model, module


def _fit_and_test(cfg: DictConfig, out_dir: Path, ckpt_dir: Path, ckpt_path: str | None, state: dict) -> dict:
    """The run itself -> its measurements; ``state`` receives the datamodule and the trainer as they come to exist."""
    state["ckpt_dir"] = ckpt_dir
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    torch.set_float32_matmul_precision(trainer_cfg.pop("float32_matmul_precision", "highest"))
    if isinstance(trainer_cfg.get("profiler"), dict):  # debug=profiler: a profiler writing into the run folder
        trainer_cfg["profiler"] = hydra.utils.instantiate(trainer_cfg["profiler"])
    _check_launch(trainer_cfg)
    # protocol.test_checkpoint: best (best validation accuracy) | last (the weights training ended with, as LRA tests)
    which = str(cfg.protocol.get("test_checkpoint", "best"))
    if which not in ("best", "last"):
        raise ConfigError(f"protocol.test_checkpoint must be 'best' or 'last', got {which!r}.")

    datamodule, model, module = build(cfg, state)
    if ckpt_path is not None:
        check_checkpoint(Path(ckpt_path), model)

    fast = bool(trainer_cfg.get("fast_dev_run"))
    checkpoint = ModelCheckpoint(  # the best validation accuracy so far (tested at the end)
        dirpath=ckpt_dir, monitor="val/acc", mode="max", save_top_k=1,
        filename="best-step{step}-val_acc{val/acc:.4f}", auto_insert_metric_name=False,
    )
    # last.ckpt at every validation (Lightning's save_last follows only improvements): what a resumed run continues
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    throughput, history = Throughput(), state.setdefault("history", RunHistory())
    loggers = state["loggers"] = build_loggers(cfg.logger)  # ConfigError if a logger's package is missing
    trainer = state["trainer"] = L.Trainer(
        **trainer_cfg,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        default_root_dir=out_dir,
        logger=loggers or False,
        use_distributed_sampler=False,  # the datamodule shards its own loaders (resumable training order)
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, latest, throughput, history, StepSeed(cfg.seed), StepProgressBar()],
    )
    params = hyperparameters(OmegaConf.to_container(cfg, resolve=True), cell=state.get("cell"),
                             output_dir=str(out_dir), resumed_from=ckpt_path)
    try:
        log_hyperparams(loggers, params)
        with warnings.catch_warnings():
            if ckpt_path is not None or cfg.resume:  # continuing in the experiment's folder: it holds checkpoints
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        # taken before testing: trainer.test(ckpt_path=...) restores the callbacks' states saved in that checkpoint.
        # The device is the strategy's: Lightning's teardown has moved the module back to the CPU by now.
        device = trainer.strategy.root_device
        fit_seconds, val_history, speed = history.elapsed(), list(history.history), throughput.summary(device)
        state["segments"] = (history.earlier_s, history.segments)
        best = None if fast or which == "last" else checkpoint.best_model_path or None
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        log_hyperparams(loggers, params, {"hp/val_acc": float(checkpoint.best_model_score or 0),
                                          "hp/test_acc": float(tested["test/acc"])})
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            close_loggers(loggers, failed=True)
        raise
    state["notes"] = close_loggers(loggers)  # W&B: where an offline run is and how to upload it

    return {
        "status": "ok",
        "val_acc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "test_acc": float(tested["test/acc"]),
        "test_loss": float(tested["test/loss"]),
        "test_majority_rate": datamodule.majority_rate("test"),
        "steps": int(trainer.global_step),
        "fit_time_s": round(fit_seconds, 2),
        "val_history": val_history,
        **speed,
        "parameters": sum(p.numel() for p in module.parameters()),
        "device": device_name(device),
        "world_size": trainer.world_size,
        "precision": trainer_cfg["precision"],
        "deterministic": bool(cfg.trainer.deterministic),
        "data": {**datamodule.describe_source(), "cache": str(datamodule.cache_dir),
                 "sizes": {k: len(v) for k, v in datamodule.datasets.items()}},
        "test_checkpoint": which,  # best | last
        "checkpoint": best,  # the tested checkpoint file (None: the weights in memory at the end of training)
        **_test_breakdown(datamodule, module),
        **({"sdpa_kernels": kernels} if (kernels := sdpa_kernels(model)) else {}),
    }


def _test_breakdown(datamodule, module: LRAModule) -> dict:
    """Where the task groups its rows (``datamodule.breakdown()``; ListOps: by root operator): the tested
    checkpoint's test accuracy by group (``test_by``) and each group's floor on every split (``prior_by``), as
    ``lra-eval`` records them; nothing for other tasks."""
    breakdown = datamodule.breakdown()
    if breakdown is None:
        return {}
    return {"by": breakdown[0], "test_by": by_group(module.group_counts["test"]),
            "prior_by": floors_by_group(datamodule.group_prior())}


def sdpa_kernels(model) -> list[str]:
    """The fused-attention kernels PyTorch picked for the model's ``sdpa`` attentions (``lra.attention.sdpa``)."""
    return sorted(set().union(*(getattr(a, "backends_used", ()) for a in model.encoder.attentions())))


@hydra.main(version_base="1.3", config_path=str(REPO / "configs"), config_name="train")
def main(cfg: DictConfig) -> float:
    """One run; returns its best validation accuracy (the objective of ``hparams_search``), NaN if it failed.

    A failed run has written its failure record. Alone, the process then exits with status 2 and a one-paragraph
    message for known causes (an unexpected error keeps its traceback); in a multirun the sweep goes on.
    The console output (messages, warnings, the progress bars' final states) is also kept in the run folder's
    ``train.log`` (global rank zero).
    """
    log = _output_dir(cfg) / "train.log" if rank_zero_only.rank == 0 else None
    quiet_known_noise()
    with tee_console(log):
        return _main(cfg)


def _main(cfg: DictConfig) -> float:
    try:
        record = run(cfg)
    except Exception as err:
        known = isinstance(err, (DataError, ConfigError, NonFiniteLoss)) or _failure_reason(err) == "out of memory"
        where = getattr(err, "failure_record", None)
        if not known and not _multirun():
            raise
        if not known:
            traceback.print_exc()
        hint = HINTS.get(_failure_reason(err).split(" at ")[0], "")
        print(f"\nerror: {err}{hint}" + (f"\n[lra] failure record: {where}" if where else ""), file=sys.stderr)
        if not _multirun():
            sys.exit(2)
        return math.nan
    return math.nan if record.get("val_acc") is None else float(record["val_acc"])


if __name__ == "__main__":
    main()
