"""lightning-hydra-template conventions: the debug/ group (fdr, overfit, profiler: no records) and lra.eval, which
tests a checkpoint without training, from its run folder's config or a composed one."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest

import lra.eval
from lra.data.listops import tokenize
from lra.preflight import ConfigError
from lra.results import load_records
from lra.train import run
from tests.conftest import TINY, option_names, tmp_paths, train_subprocess
from tests.test_listops import outermost_operator, rows

REPO = Path(__file__).resolve().parent.parent


def test_the_debug_group_and_the_trainer_choices(make_cfg):
    assert option_names("debug") == ["fdr", "overfit", "profiler"]
    assert {"cpu", "gpu", "ddp"} <= set(option_names("trainer"))
    for name in option_names("debug"):
        cfg = make_cfg(*TINY, f"debug={name}")
        assert cfg.record is False, name
    assert make_cfg(*TINY, "debug=fdr").trainer.fast_dev_run is True
    assert make_cfg(*TINY, "debug=overfit").trainer.overfit_batches == 4
    assert make_cfg(*TINY, "debug=profiler").trainer.profiler._target_.endswith("SimpleProfiler")
    assert make_cfg(*TINY, "trainer=ddp").trainer.strategy == "ddp"


def test_debug_fdr_and_profiler_run_and_write_no_record(make_cfg, tmp_path):
    record = run(make_cfg(*TINY, "debug=fdr", run_dir="fdr"))
    assert record["steps"] == 1
    run(make_cfg(*TINY, "debug=profiler", "trainer.max_steps=6", "trainer.val_check_interval=3", run_dir="prof"))
    assert (tmp_path / "prof" / "fit-profile.txt").is_file() and (tmp_path / "prof" / "test-profile.txt").is_file()
    assert "run_training_batch" in (tmp_path / "prof" / "fit-profile.txt").read_text()
    assert not (tmp_path / "results" / "runs").exists()


def test_debug_overfit_learns_its_few_batches(make_cfg, tmp_path):
    run(make_cfg(*TINY, "debug=overfit", "trainer.max_steps=60", "trainer.val_check_interval=60", run_dir="over"))
    losses = [float(r["train/loss"]) for r in csv.DictReader((tmp_path / "over" / "csv" / "metrics.csv").open())
              if r["train/loss"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert not (tmp_path / "results" / "runs").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained by ``python -m lra.train`` (a real Hydra run folder with .hydra/config.yaml), its record and the
    path overrides; shared by the evaluation tests (which write only under their own results folder)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    proc = train_subprocess([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = load_records(tmp_path / "results")
    return record, tmp_paths(tmp_path)


def test_eval_tests_a_checkpoint_from_its_run_folder(trained, tmp_path, capsys):
    record, paths = trained
    results = f"paths.results_dir={tmp_path / 'results'}"
    assert lra.eval.main([f"ckpt_path={record['checkpoint']}", results]) == 0
    out = capsys.readouterr().out
    assert f"val accuracy {100 * record['val_acc']:.2f}%, test accuracy {100 * record['test_acc']:.2f}%" in out
    assert "no record written" in out and not (tmp_path / "results" / "evals").exists()

    cfg, source, _ = lra.eval.compose([f"ckpt_path={record['checkpoint']}", "data.eval_batch_size=7", results])
    assert source.endswith(".hydra/config.yaml") and cfg.data.eval_batch_size == 7
    result = lra.eval.evaluate(cfg, source, record=True)
    assert result["test_acc"] == pytest.approx(record["test_acc"]) and result["checkpoint_step"] == 3
    (stored,) = (tmp_path / "results" / "evals").rglob("*.json")
    saved = json.loads(stored.read_text())
    assert saved["kind"] == "evaluation" and saved["checkpoint"] == record["checkpoint"]
    assert saved["by"] == "root operator" and saved["test_by"] == result["test_by"]
    assert load_records(tmp_path / "results") == []  # evaluations are not training records: the tables skip them


def test_eval_breaks_listops_accuracy_down_by_root_operator(trained, capsys):
    record, _ = trained
    cfg, source, _ = lra.eval.compose([f"ckpt_path={record['checkpoint']}", "data.eval_batch_size=5"])
    result = lra.eval.evaluate(cfg, source)  # 64 rows a split: 12 full batches and a partial one
    out = capsys.readouterr().out
    assert "[lra] accuracy by root operator, val / test (rows); beside it, the floor of always answering" in out
    for split in ("val", "test"):
        counts = result[f"{split}_by"]
        tsv = Path(record["data"]["folder"]) / f"basic_{split}.tsv"
        roots = Counter(outermost_operator(tokenize(source)) for source, _ in rows(tsv)[1:])
        assert {name: c["rows"] for name, c in counts.items()} == dict(roots)  # every row, in its own group
        assert sum(c["correct"] for c in counts.values()) / sum(roots.values()) == pytest.approx(result[f"{split}_acc"])
        assert all(c["acc"] == c["correct"] / c["rows"] for c in counts.values())
    name, c = next(iter(result["test_by"].items()))
    assert f"{100 * result['val_by'][name]['acc']:6.2f}% ({result['val_by'][name]['rows']})" in out
    assert f"{100 * c['acc']:6.2f}% ({c['rows']})" in out
    # the floor: the training split's most common label of each root operator (ties: the smaller), from the TSVs
    folder = Path(record["data"]["folder"])
    labels_by_op: dict[str, Counter] = {}
    for source, label in rows(folder / "basic_train.tsv")[1:]:
        labels_by_op.setdefault(outermost_operator(tokenize(source)), Counter())[int(label)] += 1
    answer = {op: min(lab for lab, n in c.items() if n == max(c.values())) for op, c in labels_by_op.items()}
    assert result["prior_by"]["label"] == answer
    overall = {}
    for split in ("train", "val", "test"):
        pairs = [(outermost_operator(tokenize(source)), int(label)) for source, label in
                 rows(folder / f"basic_{split}.tsv")[1:]]
        expected = {op: sum(lab == answer.get(op) for o, lab in pairs if o == op) for op in {o for o, _ in pairs}}
        assert {op: c["correct"] for op, c in result["prior_by"][split].items()} == expected
        assert {op: c["rows"] for op, c in result["prior_by"][split].items()} == dict(Counter(o for o, _ in pairs))
        overall[split] = (sum(expected.values()), len(pairs))
    floor = result["prior_by"]
    assert (f"floor (label {floor['label'][name]}): {100 * floor['val'][name]['acc']:6.2f}% / "
            f"{100 * floor['test'][name]['acc']:6.2f}%") in out
    # and how far each split's overall floor sits from the training split's, in binomial standard errors
    p = overall["train"][0] / overall["train"][1]
    z = {split: (c / n - p) / math.sqrt(p * (1 - p) / n) for split, (c, n) in overall.items()}
    assert (f"[lra] the floor on the training split ({overall['train'][1]} rows) is {100 * p:.2f}; drawn the same "
            f"way, a split's floor differs from it by sampling error alone: validation "
            f"{100 * overall['val'][0] / overall['val'][1]:.2f} is {z['val']:+.1f} standard errors") in out
    assert f"test {100 * overall['test'][0] / overall['test'][1]:.2f} is {z['test']:+.1f} standard errors" in out


def test_eval_composes_from_the_command_line_and_refuses_other_weights(trained, capsys):
    record, paths = trained
    args = [f"ckpt_path={record['checkpoint']}", "task=listops", "model=transformer", *TINY, *paths]
    cfg, source, recording = lra.eval.compose(args)
    assert source.startswith("configs/") and not recording and cfg.logger == {}
    assert lra.eval.evaluate(cfg, source)["test_acc"] == pytest.approx(record["test_acc"])
    with pytest.raises(ConfigError, match="holds another model's weights"):
        lra.eval.evaluate(lra.eval.compose([*args, "model=nystromformer"])[0])
    assert lra.eval.main([*args[:1], "trainer=cpu"]) == 2
    assert "is used as saved" in capsys.readouterr().err
    assert lra.eval.main(["task=listops"]) == 2
    assert "ckpt_path= is required" in capsys.readouterr().err


def test_eval_finds_the_config_of_a_resumed_experiments_folder(make_cfg, tmp_path):
    """A ``resume=true`` run keeps its checkpoints in ``<log_dir>/cells/<experiment>/``, which is no Hydra run folder:
    the config it was composed with is kept there, so ``lra-eval`` of its checkpoints needs no overrides."""
    record = run(make_cfg(*TINY, "model=nystromformer", "trainer.precision=16-mixed", "resume=true"))
    ckpt = Path(record["checkpoint"])
    assert ckpt.parent.parent.name == "cells"
    cfg, source, _ = lra.eval.compose([f"ckpt_path={ckpt}"])
    assert source == str(ckpt.parent / "config.yaml")
    assert cfg.model.name == "nystromformer" and cfg.trainer.precision == "16-mixed"  # as composed, before fallbacks
    assert lra.eval.evaluate(cfg, source)["test_acc"] == pytest.approx(record["test_acc"])
