"""Sweeps and scale-out: failure records, resumed sweeps, exact resume, determinism, DDP on CPU, Optuna resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

import lra.train
from lra.module import NonFiniteLoss
from lra.results import cell_key, load_records, write_record
from lra.sweep import main as sweep_main
from lra.tables import render
from lra.train import ConfigError, run
from tests.conftest import TINY, Killed, kill_at_step, train_subprocess

REPO = Path(__file__).resolve().parent.parent


def _table_rows(results: Path) -> dict[str, dict]:
    render(results, REPO / "results" / "published.csv", plots=False)
    return {r["model"]: r for r in csv.DictReader((results / "accuracy.csv").open()) if r["kind"] != "published"}


def test_nan_loss_stops_the_run_with_a_failure_record(make_cfg, monkeypatch):
    """Logits turn NaN at step 4: the run stops there, its failure record names the step and the last checkpoint
    (step 3's, finite weights), and the table shows the cell as failed."""
    from lra.module import LRAModule

    forward = LRAModule.forward

    def poisoned(self, batch):
        logits = forward(self, batch)
        return logits * float("nan") if self.training and self.global_step == 4 else logits

    monkeypatch.setattr(LRAModule, "forward", poisoned)
    cfg = make_cfg(*TINY)
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        run(cfg)
    (record,) = load_records(cfg.paths.results_dir)
    assert record["status"] == "failed" and record["reason"] == "non-finite loss at step 4" and record["step"] == 4
    assert Path(record["_path"]).name.endswith("_failed.json") and record["git"]["commit"]
    checkpoint = torch.load(record["last_checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(w).all() for w in checkpoint["state_dict"].values())
    row = _table_rows(Path(cfg.paths.results_dir))["transformer"]
    assert row["kind"] == "failed" and row["failed"] == "1" and row["failure_reasons"] == "non-finite loss at step 4"
    assert "failed: non-finite loss at step 4 (1 run)" in (Path(cfg.paths.results_dir) / "accuracy.md").read_text()


def test_out_of_memory_is_a_failure_record(make_cfg, monkeypatch):
    from lra.module import LRAModule

    def out_of_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(LRAModule, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run(make_cfg(*TINY))
    (record,) = load_records(make_cfg().paths.results_dir)
    assert record["reason"] == "out of memory" and record["step"] == 0 and "64.00 GiB" in record["error"]


def test_a_diverging_learning_rate_is_caught(make_cfg):
    with pytest.raises(NonFiniteLoss):
        run(make_cfg(*TINY, "optim.lr=1e30", "optim.schedule=constant", "optim.warmup_steps=0"))
    (record,) = load_records(make_cfg().paths.results_dir)
    assert record["reason"].startswith("non-finite loss at step")


def test_a_sweep_with_a_failing_cell_finishes_tabulates_and_resumes(tmp_path):
    """``-m model=transformer,broken resume=true``: the broken cell (an unknown attention option) fails, the other
    finishes, the summary names both with the reason and the exit status is 1. A config error is not the
    experiment's failure: no failure record, so the tables do not count it. Re-running skips the finished cell (no
    new record) and retries the broken one."""
    extra = tmp_path / "extra" / "model"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("name: broken\nattention: softmax\noptions:\n  not_an_option: 1\n")
    args = ["-m", "model=transformer,broken", "resume=true", f"hydra.searchpath=[file://{tmp_path / 'extra'}]"]
    first = train_subprocess(args, tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "failed   listops/broken/quick seed 0  bad config" in first.stdout
    assert "not_an_option" in first.stderr
    assert "ok       listops/transformer/quick seed 0  test" in first.stdout
    rows = _table_rows(tmp_path / "results")
    assert rows["transformer"]["kind"] == "measured" and rows["transformer"]["n"] == "1" and "broken" not in rows

    second = train_subprocess(args, tmp_path)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "skipped  listops/transformer/quick seed 0" in second.stdout
    assert "failed   listops/broken/quick seed 0  bad config" in second.stdout
    records = load_records(tmp_path / "results")
    assert [(r["model"], r["status"]) for r in records] == [("transformer", "ok")]


def test_a_sweep_of_smoke_tests_passes_and_records_nothing(tmp_path):
    """``-m ... debug=fdr``: each job is a fast_dev_run; the summary lists them as smoke tests (not failed for
    want of a record) and the sweep exits 0 with no run record written."""
    result = train_subprocess(["-m", "model=transformer,nystromformer", "debug=fdr"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for model in ("transformer", "nystromformer"):
        assert f"smoke    listops/{model}/quick seed 0  fast_dev_run: no record" in result.stdout
    assert "[lra] 2 smoke." in result.stdout
    assert load_records(tmp_path / "results") == []


def test_make_sweep_checks_names_then_runs_one_multirun(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: calls.append(cmd))
    sweep_main(["--tasks", "listops,text", "--models", "transformer,proxyformer", "--seeds", "0,1",
                "--protocol", "quick", "trainer.max_steps=10"])
    assert calls[0][1:] == ["-m", "lra.train", "-m", "task=listops,text", "model=transformer,proxyformer",
                            "seed=0,1", "protocol=quick", "resume=true", "trainer.max_steps=10"]
    with pytest.raises(SystemExit, match=r"unknown model name\(s\) \['proxyfomer'\]: configs/model/ has"):
        sweep_main(["--tasks", "listops", "--models", "transformer,proxyfomer"])
    with pytest.raises(SystemExit, match=r"do not compose, nothing was run:\n  task=listops model=transformer: .*"
                                         r"num_proxies"):  # an option only proxyformer has
        sweep_main(["--tasks", "listops", "--models", "proxyformer,transformer", "model.options.num_proxies=64"])
    assert len(calls) == 1
    sweep_main(["--tasks", "listops", "--models", "proxyformer,transformer", "++model.options.num_proxies=64",
                "optim.lr=1e-3,1e-4"])  # forced key; a swept value composes with its first value
    assert len(calls) == 2
    with pytest.raises(SystemExit, match="--seeds must be comma-separated integers"):
        sweep_main(["--tasks", "listops", "--models", "transformer", "--seeds", "0-3"])


def _weights(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 24
    return checkpoint["state_dict"]


def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(make_cfg, tmp_path, monkeypatch):
    """24 steps with dropout over 16-batch epochs. Killed after its step-12 checkpoint and started again with the
    same command (``resume=true``), the run continues from its experiment's last.ckpt and ends with the same
    validation and test figures as a run that was never interrupted; two uninterrupted deterministic runs agree."""
    steps = ["trainer.max_steps=24", "trainer.val_check_interval=6", "trainer.deterministic=true"]
    straight = [run(make_cfg(*TINY, *steps, "record=false", run_dir=f"straight{i}")) for i in range(2)]
    keys = ("val_acc", "test_acc", "test_loss", "steps")
    assert [straight[0][k] for k in keys] == [straight[1][k] for k in keys]

    kill_at_step(monkeypatch, 12)
    with pytest.raises(Killed):
        run(make_cfg(*TINY, *steps, "resume=true", run_dir="killed"))
    monkeypatch.undo()
    resumed = run(make_cfg(*TINY, *steps, "resume=true", run_dir="resumed"))
    assert resumed["resumed_from"].endswith("last.ckpt") and "/cells/" in resumed["resumed_from"]
    assert [resumed[k] for k in keys] == [straight[0][k] for k in keys]
    # the record covers both segments: every validation (the killed segment's from its checkpoint) and both times
    assert [h["step"] for h in resumed["val_history"]] == [6, 12, 18, 24]
    assert [h["val_acc"] for h in resumed["val_history"]] == [h["val_acc"] for h in straight[0]["val_history"]]
    assert (resumed["segments"], straight[0]["segments"]) == (2, 1)
    elapsed = [h["elapsed_s"] for h in resumed["val_history"]]
    assert elapsed == sorted(elapsed) and resumed["fit_time_s"] >= elapsed[-1]
    assert resumed["wall_time_s"] >= resumed["fit_time_s"]
    final = [_weights(Path(r["output_dir"]) / "checkpoints" / "last.ckpt") for r in straight]
    final.append(_weights(Path(resumed["resumed_from"])))  # the cell's last.ckpt, rewritten at step 24
    for name, value in final[0].items():
        assert torch.equal(value, final[1][name]) and torch.equal(value, final[2][name]), name
    (failure, ok) = sorted(load_records(make_cfg().paths.results_dir), key=lambda r: r["status"])
    assert failure["status"] == "failed" and failure["step"] == 12 and ok["status"] == "ok"
    again = run(make_cfg(*TINY, *steps, "resume=true", run_dir="again"))  # finished: skipped, no new record
    assert again["_path"] == ok["_path"] and len(load_records(make_cfg().paths.results_dir)) == 2


def test_bad_checkpoint_path_is_a_clear_error_and_no_failure_record(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="nope.ckpt does not exist"):
        run(make_cfg(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert load_records(make_cfg().paths.results_dir) == []  # not the experiment's failure: nothing in the tables


def test_ddp_two_cpu_processes_write_one_record_with_exact_test_accuracy(tmp_path):
    """``trainer=ddp`` on 2 CPU processes (gloo): both train, rank zero alone writes the record, and the test
    accuracy is counted over the whole test split, every row once (61 rows: shards of 31 and 30, so neither a mean
    of the shards' accuracies nor a padded shard would give these counts)."""
    tiny = [a for a in TINY if not a.startswith("task.generator.num_test=")] + ["task.generator.num_test=61"]
    proc = train_subprocess(["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"], tmp_path, tiny=tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = load_records(tmp_path / "results")
    assert record["world_size"] == 2 and record["steps"] == 6 and record["status"] == "ok"
    by_operator = record["test_by"].values()  # counted by root operator, reduced over the processes
    assert sum(c["rows"] for c in by_operator) == 61 == record["data"]["sizes"]["test"]
    assert record["test_acc"] == pytest.approx(sum(c["correct"] for c in by_operator) / 61, abs=1e-6)
    (log,) = (tmp_path / "logs").rglob("train.log")  # rank zero's console alone: one line per validation
    assert log.read_text().count("[lra] step 6: val/acc") == 1 and proc.stderr.count("[lra] step 6: val/acc") == 1


@pytest.mark.slow  # two Optuna subprocess sweeps: about a minute
def test_optuna_search_resumes_its_stored_study(tmp_path):
    """Two invocations of a 2-trial ``hparams_search=lr_dropout``: the second loads the SQLite study and adds to it;
    trial records stay out of the accuracy tables' folder."""
    optuna = pytest.importorskip("optuna", reason="the Optuna sweeper is the 'sweep' extra: pip install -e '.[sweep]'")
    args = ["-m", "hparams_search=lr_dropout", "hydra.sweeper.n_trials=2"]
    for _ in range(2):
        proc = train_subprocess(args, tmp_path, results=False)  # the search's own results folder
        assert proc.returncode == 0, proc.stderr[-3000:]
    name = "listops_quick_transformer_lr_dropout"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'logs' / 'optuna' / name}.db")
    values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 4 and len(values) == 4 and all(0 <= v <= 1 for v in values)
    assert len({t.params["optim.lr"] for t in study.trials}) == 4
    assert not (tmp_path / "results").exists() and "Optuna study" in proc.stdout
    # each trial's line shows the settings that tell it apart (the learning rates always differ)
    assert proc.stdout.count("ok       listops/transformer/quick seed 0 [optim.lr=") == 2
    assert len(load_records(tmp_path / "logs" / "hparams_search" / name)) == 4


def test_slurm_launcher_config_composes_with_the_usual_fields(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the SLURM launcher is the 'slurm' extra: pip install -e '.[slurm]'")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3 and launcher.tasks_per_node == 1
    assert {"account", "qos", "timeout_min", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb"} <= set(launcher)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.max_steps == 1500  # ddp keeps the recipe's numbers


def test_ddp_inside_a_basic_multirun_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(lra.train, "_multirun", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(ConfigError, match="hydra/launcher=slurm with tasks_per_node"):
        lra.train._check_launch({"strategy": "ddp", "devices": 2})
    lra.train._check_launch({"strategy": "auto", "devices": 1})  # one process: fine
    monkeypatch.setenv("SLURM_NTASKS", "2")
    lra.train._check_launch({"strategy": "ddp", "devices": 2})  # SLURM started the processes


def test_an_option_added_since_keeps_the_plain_label_where_older_runs_did_what_is_default_today(tmp_path):
    """An older Performer record (no ``harness_fixes``: added since) and a new one at the default ``[]`` are one
    experiment with the plain label (and so the published figure); a run with a fix is its own row, labelled by
    it. Proxyformer's older runs dropped landmarks on ``pinv`` where today's default is ``k2``: both labelled."""
    def record(model, seed, options, acc):
        config = {"seed": seed, "model": {"attention": model, "options": options}}
        write_record(tmp_path, {"status": "ok", "protocol": "nystrom", "task": "listops", "model": model,
                                "seed": seed, "test_acc": acc, "config": config, "finished": 1.0e9 + seed})

    record("performer", 0, {"variant": "harness"}, 0.30)
    record("performer", 1, {"variant": "harness", "harness_fixes": []}, 0.20)
    record("performer", 0, {"variant": "harness", "harness_fixes": ["scale"]}, 0.10)
    record("proxyformer", 0, {}, 0.40)
    record("proxyformer", 0, {"landmark_dropout_on": "k2"}, 0.35)
    rows = _table_rows(tmp_path)
    assert (rows["performer"]["n"], rows["performer"]["accuracy_mean"]) == ("2", "25.0000")
    assert rows["performer (model.options.harness_fixes=['scale'])"]["accuracy_mean"] == "10.0000"
    assert rows["proxyformer (model.options.landmark_dropout_on=pinv)"]["accuracy_mean"] == "40.0000"
    assert rows["proxyformer (model.options.landmark_dropout_on=k2)"]["accuracy_mean"] == "35.0000"
    assert len(rows) == 4


def test_runs_of_different_configs_are_never_averaged_into_one_cell(tmp_path):
    """Seeds of one experiment share a cell (whatever their data paths); another learning rate gets its own row,
    labelled by the setting that differs."""
    def record(seed, lr, data_dir, acc):
        config = {"seed": seed, "optim": {"lr": lr}, "task": {"datamodule": {"data_dir": data_dir}},
                  "paths": {"results_dir": str(tmp_path)}}
        write_record(tmp_path, {"status": "ok", "protocol": "quick", "task": "listops", "model": "transformer",
                                "seed": seed, "test_acc": acc, "config": config, "finished": 1.0e9 + seed})

    record(0, 1e-3, "data", 0.40)
    record(1, 1e-3, "/elsewhere", 0.50)
    record(0, 1e-4, "data", 0.20)
    render(tmp_path)
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "accuracy.csv").open())}
    assert rows["transformer (optim.lr=0.001)"]["accuracy_mean"] == "45.0000"
    assert rows["transformer (optim.lr=0.001)"]["n"] == "2"
    assert rows["transformer (optim.lr=0.0001)"]["accuracy_mean"] == "20.0000"
    assert cell_key({"seed": 0, "task": {"datamodule": {"data_dir": "a"}}, "paths": {"log_dir": "x"}}) == \
        cell_key({"seed": 0, "task": {"datamodule": {"data_dir": "b"}}, "paths": {"log_dir": "y"}})
