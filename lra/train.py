"""The one training entry point: compose config -> fit -> test (best or last checkpoint) -> write a run record.

    python -m lra.train task=listops model=transformer protocol=nystrom seed=0
    python -m lra.train -m model=transformer,sdpa seed=0,1,2 protocol=quick      # Hydra multirun
    lra-train ...                                                                  # the same, installed

Configs live in ``configs/`` (``train.yaml`` composes ``task/``, ``model/``, ``protocol/``, ``recipe/`` (the
protocol's numbers for the task), ``trainer/``, ``logger/``, ``paths/``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lra.callbacks import RunHistory, StepProgressBar, StepSeed, Throughput
from lra.data import DataError
from lra.models import build_model
from lra.module import LRAModule, NonFiniteLoss
from lra.results import cell_key, device_name, finished_record, git_state, package_versions, write_record

REPO = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A bad option or path in the composed config; the message names it and the fix."""


def _output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _precision(cfg: DictConfig, accelerator: str) -> str:
    """Mixed precision is a GPU setting; on CPU it is replaced by 32-true, said out loud and recorded."""
    precision = str(cfg.trainer.precision)
    if accelerator == "cpu" and precision in ("16-mixed", "bf16-mixed", "16", "bf16"):
        print(f"[lra] trainer.precision={precision} is for GPUs; this run is on CPU and uses 32-true.")
        return "32-true"
    return precision


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _cell_dir(cfg: DictConfig, cell: str) -> Path:
    """Where a ``resume=true`` run keeps its checkpoints: one folder per experiment, found again by a re-run."""
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


def _write_outcome(out_dir: Path, outcome: dict) -> None:
    """``<job dir>/outcome.json``: what this job did (ok | skipped | failed) and its overrides, read by the sweep
    summary."""
    if HydraConfig.initialized():
        outcome["overrides"] = list(HydraConfig.get().overrides.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "outcome.json").write_text(json.dumps(outcome, indent=1, default=str))


def run(cfg: DictConfig) -> dict:
    """Train, test and record one run; returns the record.

    The record is written under ``paths.results_dir`` (``record=false``: not written; ``fast_dev_run``: never),
    by the global rank zero only. A run that fails writes a failure record (``status: failed`` with the reason,
    the step reached and the last checkpoint) and re-raises. With ``resume=true`` a run whose experiment
    (``cell_key``) already has a finished record is skipped (that record is returned), and an unfinished one
    continues from its last checkpoint under ``<paths.log_dir>/cells/``.
    """
    started = time.time()
    out_dir = _output_dir(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    cell = cell_key(config)
    fast = bool(cfg.trainer.fast_dev_run)
    ident = {"task": cfg.task.name, "model": cfg.model.name, "protocol": cfg.protocol.name, "seed": int(cfg.seed)}
    if cfg.resume and not fast:
        done = finished_record(cfg.paths.results_dir, cfg.protocol.name, cfg.task.name, cfg.model.name, cell)
        if done is not None:
            print(f"[lra] {cfg.task.name}/{cfg.model.name}/{cfg.protocol.name} seed {cfg.seed}: finished before "
                  f"(test accuracy {100 * done['test_acc']:.2f}%, {done['_path']}); skipped.")
            if rank_zero_only.rank == 0:
                _write_outcome(out_dir, {**ident, "status": "skipped", "cell": cell, "record": done["_path"],
                                         "val_acc": done.get("val_acc"), "test_acc": done.get("test_acc")})
            return done
    ckpt_dir = _cell_dir(cfg, cell) if cfg.resume else out_dir / "checkpoints"
    ckpt_path = cfg.ckpt_path
    if ckpt_path is None and cfg.resume and (ckpt_dir / "last.ckpt").is_file():
        ckpt_path = str(ckpt_dir / "last.ckpt")
        print(f"[lra] continuing this experiment from {ckpt_path}")

    git = git_state(REPO)  # the code that runs: taken now, not when the run ends

    def provenance() -> dict:  # what every record, finished or failed, says about the run that made it
        history = state.get("history")  # a resumed run: the time and count of the segments before this one
        earlier, segments = state.get("segments") or ((history.earlier_s, history.segments) if history else (0.0, 1))
        return {**ident, "attention": cfg.model.attention, "cell": cell, "resumed_from": ckpt_path,
                "output_dir": str(out_dir), "wall_time_s": round(earlier + time.time() - started, 2),
                "segments": segments, "git": git,
                "versions": package_versions(), "config": config, "finished": time.time()}

    state: dict = {}
    try:
        record = {**_fit_and_test(cfg, out_dir, ckpt_dir, ckpt_path, state), **provenance()}
    except Exception as err:
        trainer, last = state.get("trainer"), ckpt_dir / "last.ckpt"
        rank_zero = trainer.is_global_zero if trainer is not None else rank_zero_only.rank == 0
        failure = {
            "status": "failed", "reason": _failure_reason(err),
            "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-8),
            "step": trainer.global_step if trainer is not None else None,
            "last_checkpoint": str(last) if last.is_file() else None,
            "data": state["datamodule"].describe_source() if "datamodule" in state else {},
            "device": device_name(trainer.strategy.root_device) if trainer is not None else None,
            **provenance(),
        }
        if rank_zero and not fast:
            path = err.failure_record = write_record(cfg.paths.results_dir, failure) if cfg.record else None
            _write_outcome(out_dir, {**ident, "status": "failed", "cell": cell, "reason": failure["reason"],
                                     "record": path})
        raise
    if state["trainer"].is_global_zero:
        print(f"[lra] {cfg.task.name}/{cfg.model.name}/{cfg.protocol.name} seed {cfg.seed}: test accuracy "
              f"{100 * record['test_acc']:.2f}% (majority-class rate of this test set: "
              f"{100 * record['test_majority_rate']:.2f}%), best val {100 * (record['val_acc'] or 0):.2f}%, "
              f"{record['steps']} steps in {record['wall_time_s']:.0f}s")
    if fast:
        print("[lra] fast_dev_run: no run record written (smoke test, not a measurement).")
    elif state["trainer"].is_global_zero:
        path = record["_path"] = write_record(cfg.paths.results_dir, record) if cfg.record else None
        if path:
            print(f"[lra] run record: {path}")
        _write_outcome(out_dir, {**ident, "status": "ok", "cell": cell, "record": path,
                                 "val_acc": record["val_acc"], "test_acc": record["test_acc"]})
    return record


def _fit_and_test(cfg: DictConfig, out_dir: Path, ckpt_dir: Path, ckpt_path: str | None, state: dict) -> dict:
    """The run itself -> its measurements; ``state`` receives the datamodule and the trainer as they come to exist."""
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist. Give the path of a Lightning checkpoint written by a "
            f"previous run (its <output_dir>/checkpoints/last.ckpt), or drop ckpt_path to start from scratch."
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    _check_launch(trainer_cfg)
    # protocol.test_checkpoint: best (best validation accuracy) | last (the weights training ended with, as LRA tests)
    which = str(cfg.protocol.get("test_checkpoint", "best"))
    if which not in ("best", "last"):
        raise ConfigError(f"protocol.test_checkpoint must be 'best' or 'last', got {which!r}.")

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

    accelerator = trainer_cfg["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer_cfg.update(accelerator=accelerator, precision=_precision(cfg, accelerator))
    fast = bool(trainer_cfg.get("fast_dev_run"))
    checkpoint = ModelCheckpoint(  # the best validation accuracy so far (tested at the end)
        dirpath=ckpt_dir, monitor="val/acc", mode="max", save_top_k=1,
        filename="best-step{step}-val_acc{val/acc:.4f}", auto_insert_metric_name=False,
    )
    # last.ckpt at every validation (Lightning's save_last follows only improvements): what a resumed run continues
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    throughput, history = Throughput(), state.setdefault("history", RunHistory())
    logger = hydra.utils.instantiate(cfg.logger) if cfg.logger else False
    trainer = state["trainer"] = L.Trainer(
        **trainer_cfg,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        default_root_dir=out_dir,
        logger=logger,
        use_distributed_sampler=False,  # the datamodule shards its own loaders (resumable training order)
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, latest, throughput, history, StepSeed(cfg.seed), StepProgressBar()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # taken before testing: trainer.test(ckpt_path=...) restores the callbacks' states saved in that checkpoint
    fit_seconds, val_history, speed = history.elapsed(), list(history.history), throughput.summary(module.device)
    state["segments"] = (history.earlier_s, history.segments)
    best = None if fast or which == "last" else checkpoint.best_model_path or None
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]

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
        "device": device_name(module.device),
        "world_size": trainer.world_size,
        "precision": trainer_cfg["precision"],
        "deterministic": bool(cfg.trainer.deterministic),
        "data": {**datamodule.describe_source(), "cache": str(datamodule.cache_dir),
                 "sizes": {k: len(v) for k, v in datamodule.datasets.items()}},
        "test_checkpoint": which,  # best | last
        "checkpoint": best,  # the tested checkpoint file (None: the weights in memory at the end of training)
    }


@hydra.main(version_base="1.3", config_path=str(REPO / "configs"), config_name="train")
def main(cfg: DictConfig) -> float:
    """One run; returns its best validation accuracy (the objective of ``hparams_search``), NaN if it failed.

    A failed run has written its failure record. Alone, the process then exits with status 2 and a one-paragraph
    message for known causes (an unexpected error keeps its traceback); in a multirun the sweep goes on.
    """
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
