"""Specifications of the efficiency benchmark (lra-bench): grid, records, failures, tables, ratios, plots."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from lra.bench import grid, measure, report
from lra.bench.cli import main, parser, settings_from
from lra.results import write_record
from tests.conftest import CONFIGS, option_names

RUN = "20260101-120000_aaaaaa"


def fake_record(results, model, attention, n, median_ms=None, peak_mb=None, status="ok", mode="attention",
                run_id=RUN, profile="quick"):
    """A record as run_grid writes it, with chosen figures (written under ``results``)."""
    settings = grid.load_profile("quick")
    record = {
        "kind": "bench", "profile": profile, "run_id": run_id, "device": "cpu: test", "device_type": "cpu",
        "device_slug": "cpu", "git": {"commit": "0" * 40, "dirty": False}, "versions": {"torch": "test"},
        "status": status, "model": model, "model_config": model, "attention": attention, "mode": mode,
        "precision": "fp32", "batch_size": 1, "seq_len": n, "compile": False,
        "config": {"bench": settings, "encoder": {"depth": 2, "dim": 64, "num_heads": 2, "mlp_dim": 128}},
    }
    if status == "ok":
        record.update(median_ms=median_ms, min_ms=0.8 * median_ms, max_ms=1.25 * median_ms, q1_ms=median_ms,
                      q3_ms=median_ms, steps_per_s=1000 / median_ms, tokens_per_s=1000 * n / median_ms,
                      peak_mb=peak_mb, threads=2, times_ms=[median_ms])
    else:
        record["error"] = f"simulated {status}"
    grid.write_point_record(results / "bench" / profile / "cpu" / run_id, record)
    return record


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_of(rows, model, n, mode="attention"):
    (row,) = [r for r in rows if r["model"] == model and int(r["seq_len"]) == n and r["mode"] == mode]
    return row


def table_row(md: str, title: str, model: str) -> str:
    """The line of ``model`` in the first table after the line starting with ``title``."""
    after = md[md.index(title):]
    return next(line for line in after.splitlines() if line.startswith(f"| {model} |"))


@pytest.fixture
def synthetic(tmp_path):
    """softmax / sdpa / nystromformer at 1024 (all ok) and 2048 (sdpa timed out, nystromformer out of memory)."""
    results = tmp_path / "results"
    fake_record(results, "transformer", "softmax", 1024, 40.0, 100.0)
    fake_record(results, "sdpa", "sdpa", 1024, 20.0, 50.0)
    fake_record(results, "nystromformer", "nystromformer", 1024, 10.0, 8.0)
    fake_record(results, "transformer", "softmax", 2048, 160.0, 400.0)
    fake_record(results, "sdpa", "sdpa", 2048, status="timeout")
    fake_record(results, "nystromformer", "nystromformer", 2048, status="oom")
    return results


def test_table_ratios_are_ratios_of_the_recorded_numbers(synthetic):
    report.render(synthetic, plots=False)
    rows = read_csv(synthetic / "efficiency.csv")
    nys = row_of(rows, "nystromformer", 1024)
    assert float(nys["speed_vs_softmax"]) == 40 / 10 and float(nys["speed_vs_sdpa"]) == 20 / 10
    assert float(nys["memory_vs_softmax"]) == 8 / 100 and float(nys["memory_vs_sdpa"]) == 8 / 50
    assert float(row_of(rows, "sdpa", 1024)["speed_vs_softmax"]) == 2.0
    md = (synthetic / "efficiency.md").read_text()
    assert table_row(md, "Speed relative", "nystromformer") == "| nystromformer | 4.00 / 2.00 | OOM |"
    assert table_row(md, "Memory relative", "nystromformer") == "| nystromformer | 0.08 / 0.16 | OOM |"
    assert table_row(md, "Peak memory", "transformer") == "| transformer | 100.0 | 400.0 |"
    assert table_row(md, "Steps per second", "transformer") == "| transformer | 25.0 (20.0–31.2) | 6.25 (5.00–7.81) |"
    assert "quick" in md and "cpu: test" in md


def test_failed_points_are_shown_and_give_no_ratio(synthetic):
    report.render(synthetic, plots=False)
    rows = read_csv(synthetic / "efficiency.csv")
    assert row_of(rows, "sdpa", 2048)["status"] == "timeout" and row_of(rows, "nystromformer", 2048)["status"] == "oom"
    softmax = row_of(rows, "transformer", 2048)
    assert softmax["speed_vs_softmax"] == "1.0" and softmax["speed_vs_sdpa"] == ""  # sdpa timed out there
    assert row_of(rows, "nystromformer", 2048)["speed_vs_softmax"] == ""
    md = (synthetic / "efficiency.md").read_text()
    assert table_row(md, "Steps per second", "sdpa").endswith("| timeout |")
    assert table_row(md, "Speed relative", "transformer") == "| transformer | 1.00 / 0.50 | 1.00 / – |"


def test_only_the_latest_run_of_a_profile_is_tabulated(synthetic):
    later = "20260102-090000_bbbbbb"
    fake_record(synthetic, "transformer", "softmax", 1024, 30.0, 90.0, run_id=later)
    fake_record(synthetic, "sdpa", "sdpa", 1024, 15.0, 45.0, run_id=later)
    report.render(synthetic, plots=False)
    rows = read_csv(synthetic / "efficiency.csv")
    assert {r["run_id"] for r in rows} == {later} and len(rows) == 2
    assert float(row_of(rows, "sdpa", 1024)["speed_vs_softmax"]) == 2.0


def test_records_are_never_overwritten(tmp_path, synthetic):
    with pytest.raises(FileExistsError):
        fake_record(synthetic, "transformer", "softmax", 1024, 1.0, 1.0)
    record = json.loads((synthetic / "bench/quick/cpu" / RUN / "transformer/attention_fp32_b1_n1024.json").read_text())
    assert record["median_ms"] == 40.0


def test_growth_report(tmp_path):
    results = tmp_path / "results"
    for n, t, m in ((2048, 10.0, 20.0), (8192, 45.0, 70.0)):
        fake_record(results, "nystromformer", "nystromformer", n, t, m)
    for n, t, m in ((2048, 10.0, 20.0), (8192, 160.0, 320.0)):
        fake_record(results, "transformer", "softmax", n, t, m)
    fake_record(results, "sdpa", "sdpa", 2048, 5.0, 4.0)
    fake_record(results, "sdpa", "sdpa", 8192, status="timeout")
    records = report.load_bench_records(results)
    rows = {r["model"]: r for r in report.growth(records, "attention", 2048, 8192)}
    assert rows["nystromformer"]["time_ratio"] == 4.5 and rows["nystromformer"]["memory_ratio"] == 3.5
    assert rows["transformer"]["time_ratio"] == 16.0
    lines = report.growth_lines(records, {"mode": "attention", "short": 2048, "long": 8192, "limit": 5.0})
    assert "| nystromformer | fp32 | 1 | 4.50 | 3.50 | yes |" in lines
    assert "| transformer | fp32 | 1 | 16.00 | 16.00 | NO |" in lines
    assert "| sdpa | fp32 | 1 | – | – | n/a (2048: ok, 8192: timeout) |" in lines


def test_in_process_grid_writes_full_records_and_consistent_table(tmp_path):
    settings = {**grid.load_profile("quick"), "models": ["transformer", "nystromformer"], "lengths": [128, 256],
                "modes": ["attention"], "warmup": 0, "repeats": 1, "isolate": False}
    records = grid.run_grid("test", settings, tmp_path)
    assert len(records) == 6  # sdpa is added: ratios need it
    assert {r["model"] for r in records} == {"transformer", "nystromformer", "sdpa"}
    for r in records:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["steps_per_s"] == 1000 / r["median_ms"]
        assert r["git"]["commit"] and r["versions"]["torch"] == torch.__version__ and r["device"].startswith("cpu")
        assert r["config"]["bench"]["lengths"] == [128, 256] and r["config"]["encoder"]["dim"] == 64
    nys = next(r for r in records if r["model"] == "nystromformer")
    assert nys["config"]["model"]["options"]["num_landmarks"] == 64
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "bench").rglob("*.json"))
    assert len(files) == 6 and all(str(p).startswith("bench/test/cpu/") for p in files)
    report.render(tmp_path, plots=False)
    rows = read_csv(tmp_path / "efficiency.csv")
    by = {(r["model"], r["seq_len"]): r for r in records}
    for n in (128, 256):
        row = row_of(rows, "nystromformer", n)
        assert float(row["speed_vs_softmax"]) == by["transformer", n]["median_ms"] / by["nystromformer", n]["median_ms"]
        assert float(row["speed_vs_sdpa"]) == by["sdpa", n]["median_ms"] / by["nystromformer", n]["median_ms"]


def test_isolated_point_measures_time_and_the_attention_matrix_memory():
    """In a fresh process softmax attention at N=512 holds one to a few [H, N, N] fp32 score matrices."""
    composed = grid.compose_models(["transformer"], "nystrom")
    blocks = grid.model_settings(composed["transformer"], 512)
    point = grid.Point("transformer", "attention", "fp32", 1, 512)
    spec = grid.point_spec(point, blocks, {**grid.load_profile("quick"), "warmup": 0, "repeats": 2}, "cpu")
    result = grid.run_isolated(spec, timeout_s=60, memory_limit_mb=None)
    assert result["status"] == "ok", result
    assert len(result["times_ms"]) == 2 and result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    if result["peak_mb"] is not None:  # Linux: VmHWM; with the allocator's cache released, a few such matrices
        score_matrix_mb = 2 * 512 * 512 * 4 / 2**20
        assert score_matrix_mb <= result["peak_mb"] <= 8 * score_matrix_mb, result


def test_timeout_and_out_of_memory_become_records_shown_in_the_table(tmp_path):
    base = {**grid.load_profile("quick"), "models": ["nystromformer"], "lengths": [64], "modes": ["attention"],
            "warmup": 0, "repeats": 1}
    oom = grid.run_grid("oom", {**base, "memory_limit_mb": 1}, tmp_path)  # a fresh python passes 1 MB at once
    assert [r["status"] for r in oom] == ["oom"] * 3 and "passed the limit of 1 MB" in oom[0]["error"]
    late = grid.run_grid("late", {**base, "timeout_s": 0.05}, tmp_path)
    assert [r["status"] for r in late] == ["timeout"] * 3
    assert len(list((tmp_path / "bench").rglob("*.json"))) == 6
    report.render(tmp_path, plots=False)
    md = (tmp_path / "efficiency.md").read_text()
    assert table_row(md[md.index("Profile `oom`"):], "Steps per second", "nystromformer") == "| nystromformer | OOM |"
    assert table_row(md[md.index("Profile `late`"):], "Peak memory", "sdpa") == "| sdpa | timeout |"


def test_out_of_memory_errors_are_classified():
    assert measure.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert measure.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried..."))
    assert not measure.is_out_of_memory(RuntimeError("shape mismatch"))
    spec = {"attention": "softmax", "options": {"no_such_option": 1}, "encoder": {"dim": 64, "num_heads": 2},
            "mode": "attention", "precision": "fp32", "batch_size": 1, "seq_len": 8, "warmup": 0, "repeats": 1,
            "compile": False, "threads": None, "device": "cpu", "seed": 0}
    result = measure.run_point(spec)
    assert result["status"] == "error" and "no_such_option" in result["error"]


def test_models_resolve_as_the_training_config_does(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "model" / "windowed.yaml").write_text(
        "name: windowed\nattention: softmax\noptions:\n  dropout: ${encoder.attention_dropout}\n"
        "  window: ${data.seq_len}\n")
    composed = grid.compose_models(["windowed"], "nystrom", configs)
    options = grid.model_settings(composed["windowed"], 3072)["model"]["options"]
    assert options == {"dropout": 0.0, "window": 3072}  # as training resolves it, but the benchmark drops no weights
    assert "windowed" in grid.validate(grid.load_profile("quick", configs), configs)["models"]


def test_half_precision_points_run_the_attention_in_half_precision_and_profiles_pick_their_task():
    composed = grid.compose_models(["transformer"], "nystrom")
    blocks = grid.model_settings(composed["transformer"], 256)
    assert blocks["encoder"]["attention_fp32"] is True and blocks["encoder"]["attention_dropout"] == 0.0
    settings = grid.load_profile("gpu")
    for precision, fp32 in (("fp32", True), ("bf16", False), ("fp16", False)):
        spec = grid.point_spec(grid.Point("transformer", "train", precision, 1, 256), blocks, settings, "cuda")
        assert spec["encoder"]["attention_fp32"] is fp32
    text = grid.compose_models(["transformer"], "lra", task="text")["transformer"]
    assert text.task.name == "text" and grid.load_profile("lra-table2")["task"] == "text"
    assert grid.load_profile("quick")["device"] == "auto"


def test_every_model_config_is_benchmarked_and_references_are_added():
    settings = grid.validate(grid.load_profile("quick"))
    assert settings["models"] == option_names("model")
    assert grid.with_references(["nystromformer"]) == ["nystromformer", "transformer", "sdpa"]
    assert grid.with_references(["sdpa", "transformer"]) == ["sdpa", "transformer"]


def test_plan_order_and_gpu_only_precisions():
    settings = {**grid.load_profile("full"), "models": ["a", "b"], "lengths": [1024, 2048], "modes": ["train"],
                "precisions": ["fp32", "bf16"]}
    points, notes = grid.plan(settings, "cpu")
    assert [(p.seq_len, p.model) for p in points] == [(1024, "a"), (1024, "b"), (2048, "a"), (2048, "b")]
    assert notes == ["precision bf16 runs on GPU only: skipped on CPU"]
    assert len(grid.plan(settings, "cuda")[0]) == 8


@pytest.mark.parametrize("profile", option_names("bench"))
def test_profiles_load_and_validate(profile):
    settings = grid.validate(grid.load_profile(profile))
    assert settings["models"] and all(c["short"] in settings["lengths"] for c in settings["scaling_checks"])


def test_scaling_profile_checks_8192_over_2048():
    settings = grid.load_profile("scaling")
    assert settings["lengths"] == [2048, 8192] and settings["device"] == "cpu"
    assert settings["scaling_checks"] == [{"mode": "attention", "short": 2048, "long": 8192, "limit": 5.0}]


def test_overridden_profile_is_filed_as_custom():
    assert settings_from(parser().parse_args([]))[0] == "quick"
    label, settings = settings_from(parser().parse_args(["--lengths", "512", "--repeats", "3"]))
    assert label == "quick-custom" and settings["lengths"] == [512] and settings["repeats"] == 3


@pytest.mark.parametrize("argv,expected", [
    (["--profile", "nope"], "unknown benchmark profile 'nope'"),
    (["--models", "nope"], "unknown model(s) ['nope']"),
    (["--lengths", "0"], "give positive integers (--lengths)"),
    (["--protocol", "nope"], "Pick a protocol from configs/protocol/"),
    (["--render-only"], "bench does not exist, so there are no benchmark records to render"),
])
def test_bad_input_is_a_clear_error(capsys, tmp_path, argv, expected):
    assert main([*argv, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(grid.BenchError, match="--device cpu"):
        grid.resolve_device("cuda")


def test_plots_are_written(tmp_path, synthetic):
    """Efficiency curves per section, and accuracy against the speed of the same protocol's encoder at the task's
    length: a record at another length gets no point (it is counted in the title instead)."""
    pytest.importorskip("matplotlib")
    from lra.tables import accuracy_plots

    for model, attention, t, m in (("transformer", "softmax", 300.0, 900.0), ("sdpa", "sdpa", 200.0, 300.0),
                                   ("nystromformer", "nystromformer", 50.0, 40.0)):
        fake_record(synthetic, model, attention, 4096, t, m, mode="train")
        write_record(synthetic, {"protocol": "nystrom", "task": "listops", "model": model, "seed": 0,
                                 "status": "ok", "test_acc": 0.3 + t / 1000, "test_majority_rate": 0.17,
                                 "device": "cpu: test", "precision": "32-true",
                                 "config": {"data": {"seq_len": 4096}}})
    write_record(synthetic, {"protocol": "nystrom", "task": "text", "model": "sdpa", "seed": 0, "status": "ok",
                             "test_acc": 0.6, "device": "cpu: test", "precision": "32-true",
                             "config": {"data": {"seq_len": 1024}}})  # no train point at 1024: left out
    written = report.render(synthetic)
    names = sorted(p.name for p in written if p.suffix == ".png")
    assert names == ["accuracy_vs_speed_nystrom_cpu.png", "efficiency_quick_cpu_attention_fp32_b1.png",
                     "efficiency_quick_cpu_train_fp32_b1.png"]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls = []
    import lra.plots

    original = lra.plots.plot_accuracy_vs_speed
    lra.plots.plot_accuracy_vs_speed = lambda panels, path, title: calls.append((panels, title)) or path
    try:
        accuracy_plots(synthetic)
    finally:
        lra.plots.plot_accuracy_vs_speed = original
    ((panels, title),) = calls
    assert list(panels) == ["listops (N=4096)"] and "1 measured cell without a benchmark point" in title
    points, floor = panels["listops (N=4096)"]
    assert floor == pytest.approx(17.0)
    assert sorted(points) == [("nystromformer", pytest.approx(35.0), 20.0, 40.0),
                              ("sdpa", pytest.approx(50.0), 5.0, 300.0),
                              ("transformer", pytest.approx(60.0), 1000 / 300, 900.0)]
