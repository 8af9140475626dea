"""scripts/: each runs end to end with tiny settings on the CPU and leaves its records and tables where asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lra.results import load_records
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1", "RESULTS_DIR": str(tmp_path / "results"),
               **env}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          env=environ, timeout=900)


def test_reproduce_accuracy_runs_the_sweep_then_the_tables(tmp_path):
    paths = f"paths.data_dir={tmp_path / 'data'} paths.log_dir={tmp_path / 'logs'}"
    args = " ".join([*TINY, "protocol=quick"]).replace("protocol=quick ", "", 1) + " " + paths
    proc = _run("reproduce_accuracy.sh", "quick", "listops", "transformer", "0", tmp_path=tmp_path, ARGS=args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (record,) = load_records(tmp_path / "results")
    assert record["protocol"] == "quick" and record["steps"] == 6
    assert "transformer" in (tmp_path / "results" / "accuracy.md").read_text()
    again = _run("reproduce_accuracy.sh", "quick", "listops", "transformer", "0", tmp_path=tmp_path, ARGS=args)
    assert again.returncode == 0 and "skipped" in again.stdout and len(load_records(tmp_path / "results")) == 1


@pytest.mark.slow  # three benchmark processes and a render: about a minute
def test_reproduce_efficiency_benchmarks_and_renders(tmp_path):
    proc = _run("reproduce_efficiency.sh", tmp_path=tmp_path, PROFILES="quick",
                BENCH_ARGS="--models nystromformer --lengths 64 --device cpu --warmup 0 --repeats 1 --threads 1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "results" / "efficiency.md").read_text()
    assert "nystromformer" in table and "sdpa" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check would run for real")
def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path):
    proc = _run("gpu_check.sh", tmp_path=tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
