"""Test a checkpoint without training: ``python -m lra.eval ckpt_path=...`` (installed: ``lra-eval``).

    lra-eval ckpt_path=outputs/listops/quick/proxyformer/seed0_<time>_<id>/checkpoints/best-step1500-....ckpt
    lra-eval ckpt_path=outputs/cells/<experiment>/best-step4000-....ckpt      # a resume=true run's experiment folder
    lra-eval ckpt_path=outputs/cells/<experiment>/last.ckpt task=listops model=proxyformer protocol=nystrom
    lra-eval ckpt_path=... data.eval_batch_size=64 trainer.accelerator=cpu record=true

The config is the one the run trained with:

* when the checkpoint sits in a run folder (``<run>/checkpoints/<name>.ckpt`` with ``<run>/.hydra/config.yaml``, as
  every ``lra-train`` run writes) or in a ``resume=true`` experiment's folder (``<paths.log_dir>/cells/<experiment>/``
  with its ``config.yaml``, the config of its latest segment; folders of runs before this file existed lack it),
  that saved config, exactly; ``key=value`` arguments change single settings of it (e.g. ``paths.data_dir=...``,
  ``data.eval_batch_size=64``, ``trainer.accelerator=cpu``);
* otherwise (or when ``task=``, ``model=`` or ``protocol=`` is given) the training config composed from
  ``configs/`` with the arguments as overrides, as ``lra-train`` would compose it: give the task, model, protocol
  and every other override the run was trained with.

The checkpoint is loaded with ``weights_only=True`` (and must hold this model's weights: names and shapes); the
validation and test splits are evaluated (exact counts over the whole splits, also under DDP) and their accuracy
printed, with the test set's majority-class rate, and broken down where the task defines groups of rows
(``datamodule.breakdown()``; ListOps: by root operator, MIN / MAX / MED / SM, whose difficulty differs widely),
each group beside its floor: always answering the training split's most common label of the group
(``datamodule.group_prior()``; for ListOps, what a model that reads only the root operator can reach). The
overall floor is also taken on the training split, and the validation and test splits' floors are printed as
binomial standard errors from it (``lra.results.floor_spread``): how typical a split these are.
Nothing is written unless ``record=true``: then one JSON record under
``<paths.results_dir>/evals/<protocol>/<task>/<model>/`` marked ``"kind": "evaluation"`` (with the breakdown
under ``val_by``/``test_by`` and the floors under ``prior_by``), apart from the training records under ``runs/``
that form the tables' measured cells, so an evaluation never counts as a training run; ``lra-tables`` shows the
breakdowns beside the floors under their protocol's table.
Metric loggers, profilers and training-only debug settings (``fast_dev_run``, ``overfit_batches``) of the saved
config are not used.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lra.callbacks import StepProgressBar
from lra.data import DataError
from lra.preflight import CONFIGS, ConfigError, check_checkpoint
from lra.results import (
    breakdown_lines,
    by_group,
    create_json,
    device_name,
    floors_by_group,
    git_state,
    package_versions,
)

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("task", "model", "protocol")  # naming one of these composes the config from configs/
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "deterministic", "max_steps",
                "float32_matmul_precision", "limit_val_batches", "limit_test_batches")  # what evaluation keeps
USAGE = "usage: lra-eval ckpt_path=PATH [task=T model=M protocol=P] [KEY=VALUE ...] [record=true]"


def _split(argv: list[str]) -> tuple[str, list[str], bool]:
    """``(ckpt_path, other overrides, record)`` from ``key=value`` words."""
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: every argument is key=value. {USAGE}")
    ckpt = [a.split("=", 1)[1] for a in argv if a.startswith("ckpt_path=")]
    if not ckpt or not ckpt[-1]:
        raise ConfigError(f"ckpt_path= is required: the checkpoint to test. {USAGE}")
    record = [a.split("=", 1)[1].lower() for a in argv if a.startswith("record=")]
    rest = [a for a in argv if not a.startswith(("ckpt_path=", "record="))]
    return ckpt[-1], rest, bool(record) and record[-1] in ("true", "1", "yes")


def saved_config(ckpt: Path) -> Path | None:
    """The config ``ckpt`` was trained with, if saved: ``<run>/.hydra/config.yaml`` of the run folder that holds
    ``<run>/checkpoints/<ckpt>``, or the ``config.yaml`` beside it in a ``resume=true`` experiment's folder."""
    from lra.train import CELL_CONFIG

    folder = ckpt.resolve().parent
    return next((p for p in (folder.parent / ".hydra" / "config.yaml", folder / CELL_CONFIG) if p.is_file()), None)


def compose(argv: list[str]) -> tuple[DictConfig, str, bool]:
    """The evaluation's config, where it came from (the saved file, or ``configs/``), and whether to record."""
    ckpt, overrides, record = _split(argv)
    path = Path(ckpt)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist. Give a checkpoint written by lra-train "
                          f"(<run folder>/checkpoints/best-....ckpt or last.ckpt).")
    saved = saved_config(path)
    if saved is not None and not any(o.split("=", 1)[0] in GROUPS for o in overrides):
        cfg, source = OmegaConf.load(saved), str(saved)
        for override in overrides:
            key, value = override.split("=", 1)
            if key.startswith(("+", "~")) or OmegaConf.select(cfg, key, default=KeyError) is KeyError \
                    or OmegaConf.is_config(OmegaConf.select(cfg, key)):
                raise ConfigError(
                    f"{override}: the checkpoint's run config ({saved}) is used as saved; change one of its keys "
                    f"(e.g. trainer.accelerator=cpu, data.eval_batch_size=64), or give task=, model= and "
                    f"protocol= (with the run's other overrides) to compose the config from configs/ instead.")
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
    else:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not any(o.split("=", 1)[0] in GROUPS for o in overrides):
            print(f"[lra] {path} is neither in a run folder with .hydra/config.yaml nor in an experiment folder with "
                  f"config.yaml: composing the default config "
                  f"(task, model, protocol as configs/train.yaml); give task=, model=, protocol= and the run's "
                  f"other overrides if it was trained otherwise.", file=sys.stderr)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(CONFIGS), version_base="1.3"):
                cfg = hydra_compose("train", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(f"cannot compose the config with {overrides}: {err}") from None
        finally:
            GlobalHydra.instance().clear()
        source = f"configs/ with {overrides}"
    with open_dict(cfg):
        cfg.ckpt_path, cfg.record, cfg.logger = str(path), record, {}  # no metric loggers: an evaluation prints
        cfg.trainer = {k: v for k, v in cfg.trainer.items() if k in TRAINER_KEYS}
    return cfg, source, record


def evaluate(cfg: DictConfig, source: str = "", record: bool = False) -> dict:
    """Validate and test ``cfg.ckpt_path`` under ``cfg``; returns the evaluation record (written if ``record``)."""
    from lra.train import build, resolve_hardware

    resolve_hardware(cfg)
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an unresolvable interpolation (an unset environment variable, ...)
        raise ConfigError(f"the config does not resolve: {err}") from None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.pop("max_steps", None)
    torch.set_float32_matmul_precision(trainer_cfg.pop("float32_matmul_precision", "highest"))
    datamodule, model, module = build(cfg, {})
    breakdown = datamodule.breakdown()  # build() has set the module to count by it
    ckpt = Path(cfg.ckpt_path)
    step = check_checkpoint(ckpt, model).get("global_step")
    trainer = L.Trainer(**trainer_cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[StepProgressBar()])
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False, weights_only=True)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False, weights_only=True)[0]
    prior = datamodule.group_prior()  # the splits are loaded by now
    result = {
        "kind": "evaluation", "status": "ok", "checkpoint": str(ckpt), "checkpoint_step": step,
        "task": cfg.task.name, "model": cfg.model.name, "protocol": cfg.protocol.name, "seed": cfg.seed,
        "attention": cfg.model.attention,
        "val_acc": float(val["val/acc"]), "val_loss": float(val["val/loss"]),
        "test_acc": float(test["test/acc"]), "test_loss": float(test["test/loss"]),
        "test_majority_rate": datamodule.majority_rate("test"),
        "device": device_name(trainer.strategy.root_device), "world_size": trainer.world_size,
        "precision": trainer_cfg["precision"],
        "data": {**datamodule.describe_source(), "sizes": {k: len(v) for k, v in datamodule.datasets.items()}},
        **({} if breakdown is None else {"by": breakdown[0], "val_by": by_group(module.group_counts["val"]),
                                          "test_by": by_group(module.group_counts["test"]),
                                          "prior_by": floors_by_group(prior)}),
        "config_source": source, "config": config, "git": git_state(REPO), "versions": package_versions(),
        "finished": time.time(),
    }
    if trainer.is_global_zero:
        print(f"[lra] evaluation of {ckpt} (step {step}; {cfg.task.name}/{cfg.model.name}/{cfg.protocol.name} seed "
              f"{cfg.seed}): val accuracy {100 * result['val_acc']:.2f}%, test accuracy "
              f"{100 * result['test_acc']:.2f}% (majority-class rate of this test set: "
              f"{100 * result['test_majority_rate']:.2f}%)")
        if breakdown is not None:
            print("\n".join(breakdown_lines(result, breakdown[1], ("val", "test"))))
        if record:
            folder = Path(cfg.paths.results_dir) / "evals" / cfg.protocol.name / cfg.task.name / cfg.model.name
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"seed{cfg.seed}_{stamp}_{secrets.token_hex(3)}_eval.json"
            result["_path"] = str(create_json(folder / name, result))
            print(f"[lra] evaluation record: {result['_path']} (kept apart from the training records)")
        else:
            print("[lra] no record written (record=true writes one under <results>/evals/)")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return 0 if argv else 2
    try:
        cfg, source, record = compose(argv)
        evaluate(cfg, source, record)
    except (ConfigError, DataError) as err:
        if rank_zero_only.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
