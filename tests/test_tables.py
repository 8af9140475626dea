"""Accuracy tables: experiments as rows (with where they ran), averages, published figures only beside their own
recipe, deviations explained, LaTeX for papers, and plots redrawn from the records."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lra.results import create_json, floor_spread, write_record
from lra.tables import render

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
PUBLISHED = """protocol,model,task,accuracy,source,note
nystrom,nystromformer,listops,37.15,Paper A,
nystrom,nystromformer,text,65.52,Paper A,
nystrom,nystromformer,retrieval,79.56,Paper A,
nystrom,nystromformer,image,41.58,Paper A,
nystrom,nystromformer,pathfinder,70.94,Paper A,
nystrom,transformer,listops,37.10,Paper A,
ssm-papers,s4,listops,59.60,Paper S,
ssm-papers,s4,average,86.09,Paper S,
"""


def record(results: Path, task: str, acc: float, seed: int = 0, model: str = "nystromformer", quirks="upstream",
           generated=False, device="cpu: x86_64", precision="32-true", steps=(50, 100), corrections=None, data=None,
           checkpoint=None, **config):
    return write_record(results, {
        "protocol": "nystrom", "task": task, "model": model, "seed": seed, "status": "ok", "test_acc": acc / 100,
        "test_majority_rate": 0.17, "device": device, "precision": precision, "finished": 1e9 + seed,
        "data": data or {"source": "generated" if generated else "release"},
        **({"checkpoint": checkpoint} if checkpoint else {}),
        "val_history": [{"step": s, "val_acc": acc / 100 * s / steps[-1]} for s in steps],
        "config": {"protocol": {"name": "nystrom", "quirks": quirks}, "trainer": {"precision": "16-mixed"},
                   "data": {"seq_len": 2048}, **config},
        **({"corrections": corrections} if corrections else {}),
    })


@pytest.fixture
def results(tmp_path):
    results = tmp_path / "results"
    (results).mkdir()
    (results / "published.csv").write_text(PUBLISHED)
    (results / "known_deviations.csv").write_text(
        "protocol,model,task,reason\nnystrom,*,listops,whole validation split every 50 steps\n")
    return results


def test_averages_device_column_single_runs_and_notes(results):
    for task, acc in zip(TASKS, (35.0, 65.0, 79.0, 41.0, 71.0), strict=True):
        record(results, task, acc, generated=task == "listops")
    record(results, "listops", 36.0, seed=1, generated=True)
    md, csv_path, tex = render(results, plots=False)[:3]
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| nystromformer |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "CPU · fp32"
    assert "35.50 ± 0.71 (n=2)" in row and "65.00 (n=1)" in row and "± 0.00" not in row
    assert cells[-2] == f"{(35.5 + 65 + 79 + 41 + 71) / 5:.2f} (generated ListOps)"
    assert cells[-1] == f"{(37.15 + 65.52 + 79.56 + 41.58 + 70.94) / 5:.2f} [1]"
    assert "37.15 [1]" in row  # the official figure beside the generated-data cell of the same task
    note = next(line for line in text.splitlines() if line.startswith("- **nystromformer, listops [generated]**"))
    assert "35.50 measured vs 37.15 published [1], -1.65 points" in note
    for reason in ("LRA generator", "fp32 on CPU where the recipe trains with fp16 mixed",
                   "n=2 seeds: the ± is the spread of two runs",
                   "whole validation split every 50 steps"):
        assert reason in note
    assert "not yet measured" not in note
    assert "text" not in note and "- **nystromformer, text" not in text  # within one point: no note
    assert "Majority-class rate" in text and "proxyformer or cast" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["run_on"] for r in rows if r["kind"] == "measured"} == {"CPU · fp32"}
    latex = tex.read_text()
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    assert r"35.50 $\pm$ 0.71$^\dagger$ {\tiny(n=2)}" in latex and "37.15 [1]" in latex and "% [1] Paper A" in latex


def test_variants_get_their_own_rows_and_no_published_figure(results):
    record(results, "listops", 37.0)
    record(results, "listops", 38.0, quirks="fixed")
    record(results, "listops", 30.0, device="NVIDIA H100 80GB HBM3", precision="16-mixed")
    record(results, "listops", 20.0, optim={"lr": 1e-3})
    text = render(results, plots=False)[0].read_text()
    lines = {line.split("|")[1].strip() + " / " + line.split("|")[2].strip(): line for line in text.splitlines()
             if line.startswith("| nystromformer")}
    assert set(lines) == {"nystromformer / CPU · fp32", "nystromformer [bugs fixed] / CPU · fp32",
                          "nystromformer / NVIDIA H100 80GB HBM3 · fp16 mixed",
                          "nystromformer (optim.lr=0.001) / CPU · fp32"}
    assert "37.15 [1]" not in lines["nystromformer [bugs fixed] / CPU · fp32"]
    assert "37.15 [1]" not in lines["nystromformer (optim.lr=0.001) / CPU · fp32"]
    assert "37.15 [1]" in lines["nystromformer / NVIDIA H100 80GB HBM3 · fp16 mixed"]
    assert "37.15 [1]" in lines["nystromformer / CPU · fp32"]  # the recipe itself, beside its published figure


def test_a_known_reason_about_one_device_s_runs_stays_on_that_device_s_row(results):
    (results / "known_deviations.csv").write_text(
        "protocol,model,task,hardware,reason\n"
        "nystrom,nystromformer,listops,*,any device's reason\n"
        "nystrom,nystromformer,listops,CPU · fp32,the CPU run's reason\n"
        "nystrom,nystromformer,listops,NVIDIA H100 80GB HBM3 · fp16 mixed,the H100 run's reason\n"
        "nystrom,nystromformer,listops,,an empty hardware field means any device\n")
    record(results, "listops", 30.0)
    record(results, "listops", 31.0, device="NVIDIA H100 80GB HBM3", precision="16-mixed")
    text = render(results, plots=False)[0].read_text()
    notes = {line.split("(")[1].split(")")[0]: line for line in text.splitlines()
             if line.startswith("- **nystromformer, listops**")}
    assert set(notes) == {"CPU · fp32", "NVIDIA H100 80GB HBM3 · fp16 mixed"}
    for hardware, own, other in (("CPU · fp32", "the CPU run's", "the H100 run's"),
                                 ("NVIDIA H100 80GB HBM3 · fp16 mixed", "the H100 run's", "the CPU run's")):
        assert own in notes[hardware] and other not in notes[hardware]
        assert "Known reasons besides the shared ones:" in notes[hardware]
    # the reasons both rows share are said once, before their bullets, and not again in each
    (shared,) = [line for line in text.splitlines() if line.startswith("Known reasons shared by every listops cell")]
    for reason in ("any device's reason", "an empty hardware field means any device", "n=1 seed"):
        assert text.count(reason) == 1 and reason in shared
    assert text.index(shared) < min(text.index(note) for note in notes.values())


def test_a_cell_whose_reasons_are_all_shared_says_so(results):
    record(results, "listops", 30.0)
    record(results, "listops", 31.0, device="NVIDIA H100 80GB HBM3", precision="16-mixed")
    text = render(results, plots=False)[0].read_text()
    notes = [line for line in text.splitlines() if line.startswith("- **nystromformer, listops**")]
    assert len(notes) == 2
    cpu = next(n for n in notes if "CPU · fp32" in n)
    h100 = next(n for n in notes if "H100" in n)
    assert cpu.endswith("Known reasons besides the shared ones: run in fp32 on CPU where the recipe trains with "
                        "fp16 mixed on a GPU.")
    assert h100.endswith("Known reasons: only those shared above.")


def test_state_space_models_stand_in_their_own_block(results):
    record(results, "listops", 37.0)
    text = render(results, plots=False)[0].read_text()
    block = text[text.index("## Not attention"):]
    assert "| s4 |" in block and "59.60 [2]" in block and "86.09 [2]" in block
    assert "s4" not in text[:text.index("## Not attention")]


def test_validation_curves_are_drawn_from_the_records(results):
    pytest.importorskip("matplotlib")
    record(results, "listops", 37.0, steps=(50, 100, 150))
    written = render(results)
    (curve,) = [p for p in written if p.name.startswith("val_curves_")]
    assert curve.name == "val_curves_nystrom_listops_cpu.png" and curve.read_bytes()[:4] == b"\x89PNG"


def test_validation_curves_name_the_rows_whose_records_keep_no_history(results):
    from lra.tables import curve_groups, load_records

    record(results, "listops", 37.0, steps=(50, 100))
    record(results, "listops", 30.0, model="transformer", steps=())
    (curves,) = curve_groups(load_records(results)).values()
    assert curves["transformer"] == [] and curves["nystromformer"] == [(0, [(50, 18.5), (100, 37.0)])]
    record(results, "text", 60.0, steps=())
    assert len(curve_groups(load_records(results))) == 1  # nothing to draw for text: no plot


def test_validation_curves_draw_the_floor_of_the_data_the_runs_trained_on(results, monkeypatch):
    """The validation floor (always the training split's most common label of each group, pooled over the groups'
    validation rows) comes from an ``lra-eval`` or training record of the runs' own data, whatever machine made it;
    runs on two datasets, or data no record has a floor for, get no floor line."""
    pytest.importorskip("matplotlib")
    from lra import plots
    from lra.tables import load_evaluations, load_records, validation_floors

    drawn = {}

    def plot(curves, path, title, floor=None):
        drawn[path.name] = floor
        return path

    monkeypatch.setattr(plots, "plot_validation_curves", plot)
    abc = {"source": "generated", "folder": "/x/listops-abc", "generator": {"seed": 0}}
    record(results, "listops", 37.0, data=abc)
    record(results, "listops", 30.0, model="tost", data=abc, device="NVIDIA H100 80GB HBM3", precision="16-mixed")
    floor = ({"MIN": (6, 10), "MAX": (1, 10)}, {"MIN": (5, 10), "MAX": (3, 10)})
    evaluation(results, "a.json", "tost", {"MIN": (1, 10), "MAX": (0, 10)}, {"MIN": (1, 10), "MAX": (0, 10)},
               "/elsewhere/listops-abc", prior=floor)
    evaluation(results, "b.json", "tost", {"MIN": (1, 4)}, {"MIN": (1, 4)}, "/here/listops-def", generator_seed=1,
               prior=({"MIN": (4, 4)}, {"MIN": (4, 4)}))
    render(results)
    assert drawn == {"val_curves_nystrom_listops-generated_cpu.png": (35.0, "root operator"),
                     "val_curves_nystrom_listops-generated_nvidia-h100-80gb-hbm3.png": (35.0, "root operator")}
    records = load_records(results)
    with_floor = {**records[0], "by": "root operator",
                  "prior_by": {"label": {"MIN": 0}, "val": {"MIN": {"correct": 2, "rows": 5}}}}
    assert validation_floors([with_floor], []) == {("nystrom", "listops [generated]"): (40.0, "root operator")}
    record(results, "listops", 36.0, seed=1, data={**abc, "folder": "/x/listops-def"})
    assert validation_floors(load_records(results), load_evaluations(results)) == {}


def test_cells_left_to_other_hardware_say_so(results):
    (results / "not_run.csv").write_text("protocol,model,task,why\nnystrom,transformer,listops,too slow on a CPU\n")
    record(results, "listops", 37.0, generated=True)
    text = render(results, plots=False)[0].read_text()
    row = next(line for line in text.splitlines() if line.startswith("| transformer |"))
    assert "not run [1]" in row and "1. too slow on a CPU" in text


def test_records_corrected_after_their_run_are_listed_under_the_table(results):
    """A record whose provenance was corrected by hand (a recording bug, found later) keeps what it first said under
    ``corrections``; the table names it, so the reader of a cell knows to look."""
    record(results, "listops", 37.0, generated=True)
    fixed = record(results, "listops", 34.5, model="transformer", generated=True, device="NVIDIA H200",
                   precision="16-mixed", corrections=[{"field": "device", "recorded": "cpu: x86_64",
                                                        "corrected": "NVIDIA H200", "why": "a bug"}])
    text = render(results, plots=False)[0].read_text()
    lines = text.splitlines()
    at = lines.index("Records corrected after their run (each keeps what it first said, and why, under "
                     "`corrections`):")
    assert lines[at + 2].startswith("- transformer, listops [generated] (NVIDIA H200 · fp16 mixed), seed 0: device (")
    assert Path(fixed).name in lines[at + 2]
    assert not any("nystromformer" in line for line in lines[at + 1:at + 4])


def evaluation(results: Path, name: str, model: str, val: dict, test: dict, folder: str, prior=None,
               generator_seed: int = 0, kind: str = "evaluation", checkpoint: str = "/cells/x/best.ckpt") -> Path:
    """An ``lra-eval`` record; ``val``/``test``: group -> (correct, rows)."""
    def by(counts):
        return {g: {"acc": c / n, "correct": c, "rows": n} for g, (c, n) in counts.items()}

    def acc(counts):
        return sum(c for c, _ in counts.values()) / sum(n for _, n in counts.values())

    return create_json(results / "evals" / "nystrom" / "listops" / model / name, {
        "kind": kind, "protocol": "nystrom", "task": "listops", "model": model, "seed": 0, "checkpoint_step": 300,
        "checkpoint": checkpoint,
        "val_acc": acc(val), "test_acc": acc(test), "device": "cpu: x86_64", "precision": "32-true",
        "data": {"source": "generated", "folder": folder, "cache": folder + "/cache",
                 "generator": {"seed": generator_seed}},
        "by": "root operator", "val_by": by(val), "test_by": by(test),
        **({"prior_by": {"label": {"MIN": 0, "MAX": 9}, "val": by(prior[0]), "test": by(prior[1]),
                         **({"train": by(prior[2])} if len(prior) > 2 else {})}} if prior else {}),
        "config": {"protocol": {"name": "nystrom", "quirks": "upstream"},
                   "task": {"generator": {"seed": generator_seed}}},
    })


def test_checkpoint_evaluations_are_tabled_by_group_beside_their_floor(results):
    """``lra-eval`` records with a breakdown get a table per (task, data) under their protocol's table: each
    checkpoint's validation / test accuracy overall and per group, pooled from the records' counts, and the floor
    row from whichever record of the same data carries it (data compared without machine paths). A checkpoint
    evaluated on other data than it was trained on (per its training record) names its training data."""
    record(results, "listops", 37.0, generated=True)
    record(results, "listops", 20.0, model="cast", checkpoint="/there/cells/listops_cast_seed0_ab12/best.ckpt",
           data={"source": "generated", "folder": "/there/listops-abc", "generator": {"seed": 0}})
    floor = ({"MIN": (6, 10), "MAX": (7, 10)}, {"MIN": (5, 10), "MAX": (3, 10)})
    a = evaluation(results, "a.json", "nystromformer", {"MIN": (6, 10), "MAX": (8, 10)},
                   {"MIN": (5, 10), "MAX": (2, 10)}, "/here/data/generated/listops-abc", prior=floor)
    evaluation(results, "b.json", "tost", {"MIN": (1, 10), "MAX": (0, 10)}, {"MIN": (1, 10), "MAX": (0, 10)},
               "/elsewhere/listops-abc", prior=(*floor, {"MIN": (90, 200), "MAX": (54, 200)}))
    # same data, another machine: same table; its floor is the first record's, with the training split's too
    evaluation(results, "c.json", "cast", {"MIN": (1, 4)}, {"MIN": (1, 4)}, "/here/listops-def", generator_seed=1,
               checkpoint="/here/cells/listops_cast_seed0_ab12/best.ckpt")  # trained on listops-abc
    # the same model on other data: each table labels its rows within its data (the seed is in the heading)
    evaluation(results, "e.json", "nystromformer", {"MIN": (2, 4)}, {"MIN": (3, 4)}, "/here/listops-def",
               generator_seed=1)
    evaluation(results, "d.json", "cast", {"MIN": (1, 4)}, {"MIN": (1, 4)}, "/here/listops-abc", kind="benchmark")
    lines = render(results, plots=False)[0].read_text().splitlines()
    at = lines.index("### `nystrom` · listops [generated]: checkpoints evaluated by root operator (`lra-eval`, data "
                     "`listops-abc`, generator seed 0)")
    heading = next(i for i, line in enumerate(lines) if line.startswith("## Protocol `nystrom`"))
    assert heading < at and not any(line.startswith("## ") for line in lines[heading + 1:at])  # under its protocol
    assert lines[at + 4] == "| checkpoint | evaluated on | all | MIN | MAX | record |"
    assert lines[at + 6] == "| floor | – | 65.00 / 40.00 | 60.00 / 50.00 → 0 | 70.00 / 30.00 → 9 | – |"
    assert lines[at + 7] == ("| nystromformer, seed 0, step 300 | CPU · fp32 | 70.00 / 35.00 | 60.00 / 50.00 | "
                             f"80.00 / 20.00 | `{a.relative_to(results)}` |")
    assert lines[at + 8].startswith("| tost, seed 0, step 300 | CPU · fp32 | 5.00 / 5.00 | 10.00 / 10.00 | "
                                    "0.00 / 0.00 |")
    assert lines[at + 9] == ""
    # the training split's floor is 144 / 400 = 0.36; one standard error at 20 rows: sqrt(0.36 * 0.64 / 20) = 0.1073
    assert lines[at + 10] == ("The floor on the training split (400 rows) is 36.00; drawn the same way, a split's "
                              "floor differs from it by sampling error alone: validation 65.00 is +2.7 standard "
                              "errors (10.73 at 20 rows) from it, test 40.00 is +0.4 standard errors (10.73 at 20 "
                              "rows) from it.")
    assert lines[at + 11] == "" and sum(line.startswith("| floor |") for line in lines) == 1
    other = lines.index("### `nystrom` · listops [generated]: checkpoints evaluated by root operator (`lra-eval`, "
                        "data `listops-def`, generator seed 1)")
    assert lines[other + 6].startswith("| cast (trained on `listops-abc`), seed 0, step 300 | CPU · fp32 | 25.00 / "
                                       "25.00 | 25.00 / 25.00 | `")
    assert lines[other + 7].startswith("| nystromformer, seed 0, step 300 | CPU · fp32 | 50.00 / 75.00 |")
    assert lines[other + 8] == ""
    assert sum(line.startswith("| cast") and "step 300" in line for line in lines) == 1  # d.json: no evaluation


def test_trained_on_matches_a_checkpoint_by_its_run_folder_not_by_the_shared_checkpoints_folder_name(results):
    """Runs without ``resume=true`` keep checkpoints in ``<run dir>/checkpoints/``: two such runs on different data
    must not be confused, and a multirun's run folders (same names in every multirun) are told apart by their
    parent; an evaluation record without a checkpoint path is tabled without the note."""
    seed0 = {"source": "generated", "folder": "/x/listops-abc", "generator": {"seed": 0}}
    seed1 = {"source": "generated", "folder": "/x/listops-def", "generator": {"seed": 1}}
    record(results, "listops", 30.0, model="cast", data=seed0,
           checkpoint="/x/outputs/multirun/2026-01-01_a/0_listops_nystrom_cast_seed0/checkpoints/best.ckpt")
    record(results, "listops", 30.0, model="cast", seed=1, data=seed1,
           checkpoint="/x/outputs/multirun/2026-01-02_b/0_listops_nystrom_cast_seed0/checkpoints/best.ckpt")
    evaluation(results, "a.json", "cast", {"MIN": (1, 4)}, {"MIN": (1, 4)}, "/y/listops-def", generator_seed=1,
               checkpoint="/y/outputs/multirun/2026-01-01_a/0_listops_nystrom_cast_seed0/checkpoints/best.ckpt")
    evaluation(results, "b.json", "tost", {"MIN": (1, 4)}, {"MIN": (1, 4)}, "/y/listops-def", generator_seed=1,
               checkpoint="")
    lines = render(results, plots=False)[0].read_text().splitlines()
    assert any(line.startswith("| cast (trained on `listops-abc`), seed 0, step 300 |") for line in lines)
    assert any(line.startswith("| tost, seed 0, step 300 |") for line in lines)


def test_floor_spread_of_a_training_floor_without_variance_is_stated_not_divided_by_zero():
    prior = {split: {"MIN": {"correct": c, "rows": 10}} for split, c in (("train", 10), ("val", 9), ("test", 10))}
    assert floor_spread(prior) == (
        "the floor on the training split (10 rows) is 100.00; drawn the same way, a split's floor differs from it by "
        "sampling error alone: validation 90.00 (no spread about a floor of 0 or 100), test 100.00 (no spread about a "
        "floor of 0 or 100)")
    assert floor_spread({k: v for k, v in prior.items() if k != "train"}) is None


def test_a_results_folder_without_the_hand_kept_files_uses_the_repository_s(tmp_path, capsys):
    """``RESULTS_DIR=elsewhere``: the tables still set the suite's published figures and known reasons beside the
    cells, and ``lra-tables`` says which files it used; a missing folder or published CSV is an error, not empty
    tables."""
    from lra.tables import REFERENCE, main

    elsewhere = tmp_path / "elsewhere"
    record(elsewhere, "listops", 30.0, generated=True)
    assert main(["--results-dir", str(elsewhere), "--no-plots"]) == 0
    assert f"[lra] published figures and reasons: {REFERENCE / 'published.csv'}, " in capsys.readouterr().out
    text = (elsewhere / "accuracy.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| nystromformer |"))
    assert "37.15 [" in row  # the Nyströmformer paper's ListOps figure, from the repository's published.csv
    assert "whole validation split" in text  # a known reason from the repository's known_deviations.csv

    assert main(["--results-dir", str(tmp_path / "typo")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--results-dir", str(elsewhere), "--published", str(tmp_path / "none.csv")]) == 2
    assert f"the published figures {tmp_path / 'none.csv'} do not exist" in capsys.readouterr().err
