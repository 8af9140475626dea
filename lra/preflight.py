"""What is checked before a run trains, so that a mistake costs seconds and a clear message, not a traceback, a
corrupt result or a silently ignored setting.

* ``check_values``: settings that would make nonsense of a run (zero lengths, steps or batch sizes, a learning rate
  that is not positive, an unknown schedule, a negative seed, a validation interval past the last step).
* ``check_added_keys``: a ``+key=value`` (or ``++key=value``) override must name a key the suite reads. Hydra
  refuses unknown keys given without ``+``, but takes ``+optim.learning_rate=1e-3`` silently, and the run then
  trains with the default learning rate under a row label that says otherwise. Added keys are accepted only where
  the consumer validates them: ``trainer.*`` (a ``lightning.Trainer`` argument) and ``model.options.*`` (the
  attention's own options, checked by ``lra.attention.build``), or a config group (``+hparams_search=...``).
* ``resolved``: the whole config resolved (an unset ``${oc.env:...}`` becomes a message naming the key).
* ``check_writable``: the run's record folder can be written (checked before hours of training, not after).
* ``usable_checkpoint`` / ``check_checkpoint``: a checkpoint to continue from must load and must belong to the
  model being built.
* ``CellLock``: with ``resume=true`` a run claims its experiment, so two sweeps never train the same cell at once.

Every problem is a ``ConfigError`` (or the data layer's ``DataError``): not the experiment's failure, so it
leaves no failure record in the tables; the run exits non-zero with the message.
"""

from __future__ import annotations

import fcntl
import inspect
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCHEDULES = ("onecycle_linear", "rsqrt", "cosine", "constant")


class ConfigError(ValueError):
    """A bad option, path or checkpoint in the composed config; the message names it and the fix."""


def _int(cfg: DictConfig, key: str, low: int, why: str, high: int | None = None) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={value!r}: must be an integer {bound} ({why}). Fix the override or the config.")


def check_values(cfg: DictConfig) -> None:
    """Refuse settings that cannot make a meaningful run (see the module doc)."""
    _int(cfg, "seed", 0, "seeds torch, the data order and dropout", 2**32 - 1)
    _int(cfg, "task.max_len", 1, "the longest input kept")
    _int(cfg, "data.seq_len", 1, "every batch is padded to it")
    _int(cfg, "data.batch_size", 1, "rows per training step")
    _int(cfg, "data.eval_batch_size", 1, "rows per evaluation step")
    _int(cfg, "data.num_workers", 0, "data-loader processes")
    _int(cfg, "trainer.max_steps", 1, "training is measured in optimizer steps")
    _int(cfg, "trainer.val_check_interval", 1, "validate every this many training steps")
    interval, steps = cfg.trainer.val_check_interval, cfg.trainer.max_steps
    if interval > steps and not cfg.trainer.fast_dev_run:
        raise ConfigError(f"trainer.val_check_interval={interval} is past trainer.max_steps={steps}: no validation "
                          f"would run, so no checkpoint could be chosen to test. Lower the interval.")
    o = cfg.optim
    if isinstance(o.lr, bool) or not isinstance(o.lr, int | float) or not math.isfinite(o.lr) or o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr!r}: the learning rate must be a positive, finite number.")
    _int(cfg, "optim.warmup_steps", 0, "linear warm-up steps")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r}: valid schedules are {', '.join(SCHEDULES)}.")
    betas = list(o.betas) if OmegaConf.is_list(o.betas) else None
    if not betas or len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={o.betas!r}: give two numbers in [0, 1), e.g. [0.9, 0.999].")
    if not isinstance(o.eps, int | float) or o.eps <= 0 or not isinstance(o.weight_decay, int | float) \
            or o.weight_decay < 0:
        raise ConfigError(f"optim.eps={o.eps!r}, optim.weight_decay={o.weight_decay!r}: eps must be > 0 and "
                          f"weight_decay >= 0.")


def _trainer_arguments() -> set[str]:
    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _groups() -> set[str]:
    return {p.name for p in CONFIGS.iterdir() if p.is_dir()}


def _base_config(overrides: list[str]) -> DictConfig:
    """The config composed with ``overrides`` only (no added keys), to see which keys exist without them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def check_added_keys(overrides: list[str]) -> None:
    """Refuse ``+key=value`` / ``++key=value`` overrides that add a key nothing reads (see the module doc)."""
    added = [o for o in overrides if o.startswith("+") and not o.startswith("~")]
    if not added:
        return
    base = _base_config([o for o in overrides if not o.startswith(("+", "~"))])
    trainer_args, groups = None, _groups()
    for override in added:
        key = override.lstrip("+").split("=", 1)[0].split("@", 1)[0]
        if key in groups or OmegaConf.select(base, key, default=KeyError) is not KeyError:
            continue  # a config group, or a key the config has (++ forcing its value)
        if key.startswith("model.options."):
            continue  # checked by lra.attention.build against the attention's own options
        if key.startswith("trainer.") and key.count(".") == 1:
            trainer_args = trainer_args or _trainer_arguments()
            if key.split(".", 1)[1] in trainer_args:
                continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if OmegaConf.is_dict(node) else []
        raise ConfigError(
            f"{override}: the config has no key {key!r}, and nothing would read it (the run would train with the "
            f"defaults and be labelled with the unused key). Valid keys of {parent or 'the top level'}: "
            f"{', '.join(map(str, valid))}." + (" Lightning Trainer arguments may be added as +trainer.<name>."
                                                 if parent == "trainer" else ""))


def resolved(cfg: DictConfig) -> dict:
    """The config as a plain dict with every interpolation resolved; an unresolvable one is a ``ConfigError``."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"the config does not resolve: {first} (at {getattr(err, 'full_key', '?')}). Set the "
                          f"environment variable or fix the interpolation.") from None


def check_writable(folder: Path) -> None:
    """The run record will be written into ``folder``: try it now, not after training."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "x") as f:
            f.write("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write run records into {folder}: {err.strerror or err}. Fix its permissions or "
                          f"point paths.results_dir elsewhere (the run has not started).") from None


def read_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)`` if ``path`` is a loadable Lightning checkpoint (read with ``weights_only=True``), else
    ``(None, why not)``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torn, truncated, foreign: torch raises many kinds
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return None, "not a Lightning checkpoint (no state_dict)"
    return checkpoint, None


def loads(path: Path) -> str | None:
    """None if ``path`` is a loadable checkpoint, else why not."""
    return read_checkpoint(path)[1]


def usable_checkpoint(folder: Path) -> tuple[Path | None, str | None]:
    """The checkpoint a ``resume=true`` run continues from, and a note if it is not ``last.ckpt``.

    ``last.ckpt`` if it loads; else the loadable checkpoint of this experiment with the most steps (its best one);
    else none (the run starts over). An unreadable ``last.ckpt`` is renamed ``last.ckpt.unreadable-<time>`` so it is
    neither tried again nor overwritten unseen.
    """
    last = folder / "last.ckpt"
    if not last.is_file():
        return None, None
    why = loads(last)
    if why is None:
        return last, None
    aside = last.with_name(f"last.ckpt.unreadable-{int(os.path.getmtime(last))}")
    os.replace(last, aside)
    candidates = []
    for path in folder.glob("*.ckpt"):
        if loads(path) is None:
            step = torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0)
            candidates.append((step, path))
    if candidates:
        step, path = max(candidates)
        return path, (f"{last} is unreadable ({why}; kept as {aside.name}): continuing from {path.name}, "
                      f"the latest loadable checkpoint of this experiment (step {step}).")
    return None, f"{last} is unreadable ({why}; kept as {aside.name}) and no other checkpoint loads: starting over."


def check_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """``path`` must load and hold weights of exactly this model's parameters (names and shapes); returns the
    checkpoint (read once)."""
    checkpoint, why = read_checkpoint(path)
    if why is not None:
        raise ConfigError(f"ckpt_path={path} cannot be loaded: {why}. Give a checkpoint written by a run of this "
                          f"suite (<run dir>/checkpoints/last.ckpt), or drop ckpt_path.")
    saved = checkpoint["state_dict"]
    expected = {f"model.{k}": v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k]))
    if missing or unexpected or reshaped:
        parts = [f"{name} {keys[:3]}{' …' if len(keys) > 3 else ''}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)) if keys]
        raise ConfigError(f"ckpt_path={path} holds another model's weights ({'; '.join(parts)}). Resume with the "
                          f"task, model and protocol of the run that wrote it.")
    return checkpoint


class CellLock:
    """An exclusive, non-blocking claim on an experiment (``fcntl.flock`` on ``<cell dir>/.lock``), released when the
    process ends, however it ends. ``acquired`` is False when another process holds it."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".lock"
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.acquired = True
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(f"{os.getpid()}\n")
            self.handle.flush()
        except BlockingIOError:
            self.acquired = False

    def release(self) -> None:
        if not self.handle.closed:
            if self.acquired:
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
