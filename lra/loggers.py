"""Metric loggers of a run: built from ``cfg.logger``, given the run's hyper-parameters, closed at the end.

``configs/logger/<name>.yaml`` holds one entry per logger (``csv``, ``tensorboard``, ``wandb``; the layout of
lightning-hydra-template), so ``logger=many`` composes several: CSV + TensorBoard + Weights & Biases. Each writes
into the run folder (``<run>/csv/``, ``<run>/tensorboard/``, ``<run>/wandb/``).

* ``build_loggers``: instantiates every entry that has a ``_target_``. A logger whose package is missing becomes a
  ``ConfigError`` naming the package to install (TensorBoard is the optional extra ``tensorboard``).
* Weights & Biases without an account: when no API key is configured (no ``WANDB_API_KEY``, no ``api.wandb.ai``
  entry in ``~/.netrc`` as ``wandb login`` writes) and the user chose no mode (``WANDB_MODE`` or
  ``logger.wandb.mode``/``offline``), the run logs offline instead of failing with ``UsageError: No API key
  configured``; where the files went and how to upload them later (``wandb sync <run dir>``) is printed.
* ``log_hyperparams``: the resolved run config (task, model, protocol, seed, every option) goes to every logger
  through ``Logger.log_hyperparams``: CSV ``hparams.yaml``, TensorBoard's ``hparams.yaml`` and, at the end of the
  run, its HParams tab (flattened to ``model/name``, with ``hp/val_acc`` and ``hp/test_acc``), the W&B run config
  (nested: ``model.name`` in its UI).
* ``close_loggers``: finalizes every logger, finishes the W&B run (so the next run of a multirun in the same
  process gets its own) and says where its offline files are.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lra.preflight import ConfigError

PACKAGES = {"TensorBoardLogger": "tensorboard (pip install -e '.[tensorboard]')",
            "WandbLogger": "wandb (pip install wandb)"}


def wandb_key_configured() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY`` or a ``.netrc`` entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_offline(entry: DictConfig) -> bool:
    """Decide the mode of a W&B entry; True (and the entry set to offline) when it has to run offline."""
    chosen = entry.get("mode") is not None or entry.get("offline") or os.environ.get("WANDB_MODE")
    if chosen:
        return str(entry.get("mode") or os.environ.get("WANDB_MODE", "")).lower() in ("offline", "dryrun") \
            or bool(entry.get("offline"))
    if wandb_key_configured():
        return False
    with open_dict(entry):
        entry.mode = "offline"
    if rank_zero_only.rank == 0:
        print("[lra] W&B: no API key configured (WANDB_API_KEY or `wandb login`), so this run logs offline; "
              "upload it later with `wandb sync <its folder>` (printed at the end of the run).")
    return True


def build_loggers(logger_cfg: DictConfig | None) -> list:
    """One Lightning logger per entry of ``cfg.logger`` that has a ``_target_`` (``logger=none``: none)."""
    loggers = []
    for name, entry in (logger_cfg or {}).items():
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            continue
        entry = OmegaConf.create(OmegaConf.to_container(entry, resolve=True))
        target = str(entry._target_)
        if target.endswith("WandbLogger"):
            _wandb_offline(entry)
        try:
            loggers.append(hydra.utils.instantiate(entry))
        except Exception as err:  # a logger package that is not installed, or a bad logger option
            cause = err.__cause__ or err
            package = next((p for k, p in PACKAGES.items() if target.endswith(k)), None)
            install = f"Install {package}" if package and isinstance(cause, ImportError | ModuleNotFoundError) \
                else "Fix its options in configs/logger/"
            reason = (str(cause).splitlines() or [""])[0]
            raise ConfigError(f"logger {name}: {target} could not be created: {type(cause).__name__}: "
                              f"{reason.rstrip('.')}. {install}, or pick another logger (logger=csv, logger=none).") \
                from None
    return loggers


def hyperparameters(config: dict, **run) -> dict:
    """What the loggers receive: the resolved run config (without Hydra's node and the loggers' own settings) and
    ``run`` facts (the experiment key ``cell``, the run folder, the checkpoint continued from)."""
    params = {k: v for k, v in config.items() if k not in ("hydra", "logger")}
    if run:
        params["run"] = run
    return params


def log_hyperparams(loggers: list, params: dict, results: dict | None = None) -> None:
    """Give ``params`` to every logger (at the start of a run). With ``results`` (``{"hp/test_acc": ...}``, at the
    end): TensorBoard only, whose HParams tab lists a run once it has metrics: it gets ``params`` again with them."""
    for logger in loggers:
        if results is None:
            logger.log_hyperparams(params)
        elif type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(params, metrics=results)


def wandb_run_dir(logger) -> Path | None:
    """The folder of a W&B run (``<save_dir>/wandb/offline-run-<time>-<id>``), if one was started."""
    experiment = getattr(logger, "_experiment", None)
    folder = getattr(experiment, "dir", None)  # <run folder>/files
    return Path(folder).parent if folder else None


def close_loggers(loggers: list, failed: bool = False) -> list[str]:
    """Finalize every logger and finish W&B runs (marked failed if the run failed); returns the lines to print
    about them (where an offline run is, how to upload it)."""
    notes = []
    for logger in loggers:
        logger.finalize("failed" if failed else "success")  # flushes what was logged after the test (TensorBoard)
        if type(logger).__name__ != "WandbLogger" or not hasattr(getattr(logger, "_experiment", None), "finish"):
            continue
        folder, offline = wandb_run_dir(logger), getattr(logger._experiment, "offline", False)
        logger._experiment.finish(exit_code=1 if failed else 0)
        logger._experiment = None
        if offline and folder is not None:
            notes.append(f"W&B offline run: {folder} (upload: wandb sync {folder})")
    return notes
