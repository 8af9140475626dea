"""The training path end to end on tiny generated ListOps: smoke runs, records, tables, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lra.results import load_records, write_record
from lra.tables import render
from lra.train import ConfigError, run
from tests.conftest import TINY, Killed, kill_at_step, option_names, train_subprocess

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("model", option_names("model"))
def test_fast_dev_run_of_every_model(make_cfg, model):
    cfg = make_cfg(*TINY, f"model={model}", "trainer.fast_dev_run=true", "logger=none")
    record = run(cfg)
    assert 0.0 <= record["test_acc"] <= 1.0 and record["steps"] == 1
    assert not (Path(cfg.paths.results_dir) / "runs").exists()  # a smoke test is not a measurement


def test_two_seeds_make_records_and_one_table_cell(make_cfg, tmp_path, capsys):
    records = [run(make_cfg(*TINY, f"seed={seed}", run_dir=f"run{seed}")) for seed in (0, 1)]
    out = capsys.readouterr().out
    results = Path(make_cfg().paths.results_dir)
    stored = load_records(results)
    assert len(stored) == 2 and {r["seed"] for r in stored} == {0, 1}
    first = stored[0]
    for key in ("task", "model", "protocol", "val_acc", "test_acc", "steps", "wall_time_s", "train_tokens_per_s",
                "peak_memory_mb", "parameters", "device", "versions", "git", "config"):
        assert first[key] is not None, key
    assert first["steps"] == 6 and first["config"]["trainer"]["max_steps"] == 6
    assert first["data"]["source"] == "generated" and first["versions"]["torch"]
    # ListOps: the tested checkpoint's accuracy by root operator, every test row counted once, beside the floors
    by = first["test_by"]
    assert first["by"] == "root operator" and sum(c["rows"] for c in by.values()) == first["data"]["sizes"]["test"]
    assert sum(c["correct"] for c in by.values()) / first["data"]["sizes"]["test"] == pytest.approx(first["test_acc"])
    assert set(first["prior_by"]) == {"label", "train", "val", "test"} and set(first["prior_by"]["test"]) == set(by)
    name, counts = next(iter(by.items()))
    assert "[lra] accuracy by root operator, test (rows); beside it, the floor" in out
    assert (f"{100 * counts['acc']:6.2f}% ({counts['rows']})   floor (label {first['prior_by']['label'][name]}): "
            f"{100 * first['prior_by']['test'][name]['acc']:6.2f}%") in out

    md, out, _ = render(results, REPO / "results" / "published.csv", plots=False)
    accs = [100 * r["test_acc"] for r in records]
    mean = sum(accs) / 2
    std = abs(accs[0] - accs[1]) / 2 ** 0.5
    assert f"{mean:.2f} ± {std:.2f} (n=2)" in md.read_text()
    rows = [r for r in csv.DictReader(out.open()) if r["kind"] == "measured"]
    assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["task"] == "listops [generated]"
    assert any(r["kind"] == "published" for r in csv.DictReader(out.open()))


def test_records_are_never_overwritten(tmp_path):
    record = {"protocol": "quick", "task": "listops", "model": "transformer", "seed": 0, "finished": 1.0e9}
    first, second = write_record(tmp_path, record), write_record(tmp_path, record)  # same run, same second
    assert first != second and len(load_records(tmp_path)) == 2


def test_resume_from_last_checkpoint(make_cfg, tmp_path, monkeypatch):
    """A run killed after step 6 (checkpointed at its step-6 validation) resumes from last.ckpt to step 9."""
    kill_at_step(monkeypatch, 6)
    with pytest.raises(Killed):
        run(make_cfg(*TINY, "trainer.max_steps=9", run_dir="first"))
    monkeypatch.undo()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = run(make_cfg(*TINY, "trainer.max_steps=9", f"ckpt_path={last}", run_dir="second"))
    assert resumed["steps"] == 9 and resumed["resumed_from"] == str(last)
    records = load_records(make_cfg().paths.results_dir)  # the killed run left a failure record, not a result
    assert sorted(r["status"] for r in records) == ["failed", "ok"]


def test_missing_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=.*does not exist.*last.ckpt"):
        run(make_cfg(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_unknown_attention_name_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="Valid names: .*softmax"):
        run(make_cfg(*TINY, "model.attention=nope"))


def test_multirun_then_tables(tmp_path):
    """``python -m lra.train -m model=transformer,sdpa seed=0,1`` then ``lra-tables``: one cell per model, n=2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = train_subprocess(["-m", "model=transformer,sdpa", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = subprocess.run([sys.executable, "-m", "lra.tables", "--results-dir", str(tmp_path / "results"),
                             "--published", str(REPO / "results" / "published.csv")],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert tables.returncode == 0, tables.stderr
    rows = [r for r in csv.DictReader((tmp_path / "results" / "accuracy.csv").open()) if r["kind"] == "measured"]
    assert sorted((r["model"], r["n"]) for r in rows) == [("sdpa", "2"), ("transformer", "2")]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").rglob("*.json")]
    assert len(records) == 4 and all(r["git"]["commit"] for r in records)


def test_learning_rate_schedules():
    from lra.module import lr_lambda

    cosine = lr_lambda("cosine", warmup=10, cycle=100)
    assert [cosine(s) for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 1.0])
    rsqrt = lr_lambda("rsqrt", warmup=100)
    assert rsqrt(50) == pytest.approx(0.5 / 10) and rsqrt(400) == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="optim.schedule must be"):
        lr_lambda("cyclic", warmup=1)
