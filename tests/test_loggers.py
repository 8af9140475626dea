"""Metric loggers: the run config reaches every logger; W&B runs offline without an account; logger=many; the
console kept in train.log; no warnings about folders that are expected to exist."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import yaml

import lra.loggers
from lra.console import LineLog
from lra.preflight import ConfigError
from lra.train import run
from tests.conftest import TINY, Killed, kill_at_step, train_subprocess

REPO = Path(__file__).resolve().parent.parent
TWO_STEPS = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]


@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    """No API key anywhere W&B looks, and W&B's own folders in the tmp dir."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def wandb_offline_config(run_dir: Path) -> dict:
    """The run config stored in an offline W&B run (what `wandb sync` uploads): the ``config`` records of its
    ``run-<id>.wandb`` file (a LevelDB-style log of ``wandb.proto`` Records: 7-byte header, 32 KiB blocks, each
    chunk ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last) | data``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, pending, config = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 2, 3, 4):
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record.FromString(pending)
            which = record.WhichOneof("record_type")
            items = record.run.config.update if which == "run" else record.config.update if which == "config" else []
            config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def test_the_run_config_is_logged_and_the_console_kept(make_cfg, tmp_path):
    cfg = make_cfg(*TWO_STEPS, "model=nystromformer", "model.options.num_landmarks=8", "seed=3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = run(cfg)
    hparams = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert (hparams["task"]["name"], hparams["model"]["name"], hparams["protocol"]["name"], hparams["seed"]) == \
        ("listops", "nystromformer", "quick", 3)
    assert hparams["model"]["options"]["num_landmarks"] == 8 and hparams["trainer"]["max_steps"] == 2
    assert hparams["run"]["cell"] == record["cell"] and "logger" not in hparams
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "exists and is not empty" in m], messages


def test_wandb_without_an_api_key_runs_offline(make_cfg, tmp_path, no_wandb_account, capsys):
    record = run(make_cfg(*TWO_STEPS, "logger=wandb", "model=sdpa"))
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert "logs offline" in out and f"wandb sync {run_dir}" in out
    config = wandb_offline_config(run_dir)
    assert config["model"]["name"] == "sdpa" and config["task"]["name"] == "listops"
    assert config["protocol"]["name"] == "quick" and config["seed"] == 0 and record["steps"] == 2


def test_logger_many_writes_csv_tensorboard_and_wandb(make_cfg, tmp_path, no_wandb_account):
    run(make_cfg(*TWO_STEPS, "logger=many"))
    folder = tmp_path / "run"
    assert (folder / "csv" / "metrics.csv").is_file() and list((folder / "wandb").glob("offline-run-*"))
    assert yaml.safe_load((folder / "tensorboard" / "hparams.yaml").read_text())["model"]["name"] == "transformer"
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams, scalars = {}, set()
    for path in (folder / "tensorboard").glob("events.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    hparams.update({k: v.string_value for k, v in data.session_start_info.hparams.items()})
                else:
                    scalars.add(value.tag)
    assert hparams["model/name"] == "transformer" and hparams["protocol/name"] == "quick"
    assert {"val/acc", "test/acc", "hp/test_acc", "hp/val_acc"} <= scalars


def test_a_missing_logger_package_says_what_to_install(make_cfg, monkeypatch):
    import lightning.fabric.loggers.tensorboard as tb

    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tb, "_TENSORBOARDX_AVAILABLE", False)
    expected = r"logger tensorboard: .*TensorBoardLogger could not be created: .*Install tensorboard \(pip install"
    with pytest.raises(ConfigError, match=expected):
        run(make_cfg(*TWO_STEPS, "logger=tensorboard"))


def test_wandb_mode_is_the_users_when_chosen(monkeypatch, no_wandb_account):
    from omegaconf import OmegaConf

    entry = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "mode": None})
    assert lra.loggers._wandb_offline(entry) and entry.mode == "offline"  # no key: offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    entry = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "mode": None})
    assert not lra.loggers._wandb_offline(entry) and entry.mode is None  # a key: W&B's default (online)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not lra.loggers._wandb_offline(entry) and entry.mode is None  # the user's WANDB_MODE stands


def test_train_log_keeps_final_lines_only(tmp_path):
    log = LineLog(tmp_path / "train.log")
    for text in ["train:  10%|#", "\rtrain:  50%|#####", "\rtrain: 100%|##########\n", "\x1b[Adone\n", "tail"]:
        log.write(text)
    log.close()
    assert (tmp_path / "train.log").read_text() == "train: 100%|##########\ndone\ntail\n"


def fake_trainer(**kw):
    from types import SimpleNamespace

    base = dict(max_steps=10, global_step=0, is_global_zero=True, sanity_checking=False, num_val_batches=[2],
                num_test_batches=[2], callback_metrics={}, log_every_n_steps=1)
    return SimpleNamespace(**{**base, **kw})


def test_validation_gets_its_own_bar_and_leaves_the_training_eta_alone(capsys):
    import time

    from lra.callbacks import StepProgressBar

    bars, trainer = StepProgressBar(), fake_trainer()
    bars.on_train_start(trainer, None)
    trainer.global_step = 5
    bars.bar.update(5)
    trainer_elapsed = bars.bar.format_dict["elapsed"]
    bars.on_validation_start(trainer, None)
    for _ in range(2):
        bars.on_validation_batch_end(trainer, None, None, None, 0)
    assert bars.eval_bar.n == 2 and bars.eval_bar.total == 2
    time.sleep(0.5)
    trainer.callback_metrics = {"val/acc": 0.25, "val/loss": 1.5}
    bars.on_validation_end(trainer, None)
    assert bars.bar.format_dict["elapsed"] - trainer_elapsed < 0.25  # the half second of validation is not counted
    bars.on_train_end(trainer, None)
    err = capsys.readouterr().err
    assert "validate (step 5)" in err and "[lra] step 5: val/acc 25.00%, val/loss 1.5000" in err


def test_only_global_rank_zero_draws_bars(capsys):
    from lra.callbacks import StepProgressBar

    bars, trainer = StepProgressBar(), fake_trainer(is_global_zero=False)
    bars.on_train_start(trainer, None)
    bars.on_validation_start(trainer, None)
    bars.on_validation_batch_end(trainer, None, None, None, 0)
    bars.on_validation_end(trainer, None)
    bars.on_train_end(trainer, None)
    bars.on_test_start(trainer, None)
    bars.on_test_batch_end(trainer, None, None, None, 0)
    bars.on_test_end(trainer, None)
    assert capsys.readouterr().err == ""


def test_a_run_stopped_by_an_error_closes_its_bars(capsys):
    from tqdm import tqdm

    from lra.callbacks import StepProgressBar

    bars, trainer = StepProgressBar(), fake_trainer()
    bars.on_train_start(trainer, None)
    bars.on_validation_start(trainer, None)
    train_bar, eval_bar = bars.bar, bars.eval_bar
    assert {train_bar, eval_bar} <= set(tqdm._instances)
    bars.on_exception(trainer, None, RuntimeError("a failing cell"))
    assert train_bar not in tqdm._instances and eval_bar not in tqdm._instances and bars.eval_bar is None


def test_a_resumed_run_does_not_warn_about_its_checkpoint_folder(make_cfg, tmp_path, monkeypatch):
    kill_at_step(monkeypatch, 6)
    with pytest.raises(Killed):
        run(make_cfg(*TINY, "trainer.max_steps=9", run_dir="first"))
    monkeypatch.undo()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(make_cfg(*TINY, "trainer.max_steps=9", f"ckpt_path={last}", run_dir="second"))
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]


def test_the_console_is_kept_in_train_log_with_a_summary(tmp_path):
    """``python -m lra.train``: train.log holds the messages, each validation's line, the bars' final states and the
    end-of-run summary (run folder, tokens/s, peak memory); no warning about the logs' folder."""
    proc = train_subprocess([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log,) = (tmp_path / "logs").rglob("train.log")
    text = log.read_text()
    for expected in ("[lra] step 3: val/acc", "[lra] step 6: val/acc", "train: 100%", "test: 100%",
                     f"run folder: {log.parent}", "tokens/s", "peak memory", "[lra] run record:"):
        assert expected in text, (expected, text)
    assert "\r" not in text and "exists and is not empty" not in proc.stderr + proc.stdout
    assert "run folder:" in proc.stdout and "train: 100%" in proc.stderr
