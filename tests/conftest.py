"""Shared fixtures: compose the real Hydra configs, shrunk to seconds, with every path in a tmp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TINY = [
    "protocol=quick",
    "task.generator.num_train=256",
    "task.generator.num_val=64",
    "task.generator.num_test=64",
    "task.generator.min_length=4",
    "task.generator.max_length=40",
    "task.max_len=40",
    "data.seq_len=40",
    "data.batch_size=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
]


def tmp_paths(tmp_path: Path, results: bool = True) -> list[str]:
    """Overrides that keep a run's data, logs and (with ``results``) records under ``tmp_path``."""
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    return paths + [f"paths.results_dir={tmp_path / 'results'}"] if results else paths


def train_subprocess(args: list[str], tmp_path: Path, results: bool = True, tiny: list[str] = TINY
                     ) -> subprocess.CompletedProcess:
    """``python -m lra.train *args`` at the ``tiny`` settings in ``tmp_path`` (1 thread, paths from ``tmp_paths``)."""
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lra.train", *args, *tiny, *tmp_paths(tmp_path, results)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> the composed train config, as ``python -m lra.train`` would see it."""

    def make(*overrides, run_dir: str = "run"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    f"paths.data_dir={tmp_path / 'data'}",
                    f"paths.log_dir={tmp_path / 'outputs'}",
                    f"paths.results_dir={tmp_path / 'results'}",
                    *overrides,
                ],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / run_dir)
            HydraConfig().set_config(cfg)
            del cfg["hydra"]
        return cfg

    yield make
    GlobalHydra.instance().clear()


class Killed(RuntimeError):
    """Stands for a run killed mid-way (in-process, so that the test can go on)."""


def kill_at_step(monkeypatch, step: int) -> None:
    """Make ``lra.train`` runs raise ``Killed`` when training reaches ``step`` (undo with ``monkeypatch.undo()``)."""
    import lra.train

    class KillAtStep(lra.train.StepProgressBar):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == step:
                raise Killed
            super().on_train_batch_start(trainer, *args)

    monkeypatch.setattr(lra.train, "StepProgressBar", KillAtStep)
