"""Records, resumes and parallel runs never lose, corrupt or double-count a result; bad settings are refused before
training with a clear message (no failure record: they are not the experiment's failures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lra.results
import lra.train
from lra.preflight import CellLock, ConfigError
from lra.results import cell_key, load_records, write_record
from lra.tables import measured_cells, render
from lra.train import run
from tests.conftest import TINY, Killed, kill_at_step

REPO = Path(__file__).resolve().parent.parent
STEPS = ["trainer.max_steps=24", "trainer.val_check_interval=6", "trainer.deterministic=true"]


def test_torn_and_foreign_json_are_skipped_and_named(make_cfg, capsys):
    cfg = make_cfg(*TINY)
    record = run(cfg)
    results = Path(cfg.paths.results_dir)
    folder = Path(record["_path"]).parent
    (folder / "seed0_torn.json").write_text('{"status": "ok", "test_acc": 0.')  # a record cut by a kill
    (folder / "notes.json").write_text('{"hello": "world"}')  # not a record of this suite
    (results / "runs" / "stray.json").write_bytes(b"\xff\xfe not utf-8")
    md, _, _ = render(results, REPO / "results" / "published.csv", plots=False)
    err = capsys.readouterr().err
    for name in ("seed0_torn.json", "notes.json", "stray.json"):
        assert name in err and name in md.read_text()
    assert "(n=1)" in md.read_text()
    again = run(make_cfg(*TINY, "resume=true", run_dir="again"))  # the lookup reads past them: finished, skipped
    assert again["_path"] == record["_path"] and len(load_records(results)) == 1


def test_records_are_written_atomically(tmp_path, monkeypatch):
    """A kill while a record is written leaves no file at all (the data goes to a hidden temporary first)."""
    def killed_mid_write(obj, f, **kw):
        f.write('{"status": "ok", "test_')
        raise KeyboardInterrupt

    monkeypatch.setattr(lra.results.json, "dump", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        write_record(tmp_path, {"protocol": "quick", "task": "listops", "model": "m", "seed": 0})
    assert list(tmp_path.rglob("*")) == [tmp_path / "runs", tmp_path / "runs" / "quick",
                                         tmp_path / "runs" / "quick" / "listops", tmp_path / "runs" / "quick" /
                                         "listops" / "m"]


def test_ckpt_path_resume_reports_the_figures_of_an_uninterrupted_run(make_cfg, monkeypatch):
    """Killed at step 12 of 24 and continued with ckpt_path=<its last.ckpt> in a new run folder: the best-validation
    checkpoint and score from before the kill stay in the race, so validation and test figures equal those of a run
    that was never interrupted."""
    straight = run(make_cfg(*TINY, *STEPS, "record=false", run_dir="straight"))
    kill_at_step(monkeypatch, 12)
    with pytest.raises(Killed):
        run(make_cfg(*TINY, *STEPS, "record=false", run_dir="killed"))
    monkeypatch.undo()
    last = Path(make_cfg().paths.log_dir).parent / "killed" / "checkpoints" / "last.ckpt"
    resumed = run(make_cfg(*TINY, *STEPS, "record=false", f"ckpt_path={last}", run_dir="resumed"))
    for key in ("val_acc", "test_acc", "test_loss", "steps"):
        assert resumed[key] == straight[key], key
    assert [h["val_acc"] for h in resumed["val_history"]] == [h["val_acc"] for h in straight["val_history"]]


def test_a_seed_trained_twice_counts_once(make_cfg):
    run(make_cfg(*TINY, run_dir="a"))
    run(make_cfg(*TINY, run_dir="b"))
    run(make_cfg(*TINY, "seed=1", run_dir="c"))
    cells = measured_cells(load_records(make_cfg().paths.results_dir))
    (cell,) = cells.values()
    assert cell["n"] == 2 and cell["seeds"] == [0, 1] and cell["repeats"] == 1
    md, _, _ = render(make_cfg().paths.results_dir, REPO / "results" / "published.csv", plots=False)
    assert "(n=2; +1 repeat)" in md.read_text()


def test_a_claimed_experiment_is_skipped_by_a_second_sweep(make_cfg):
    cfg = make_cfg(*TINY, "resume=true")
    lra.train.resolve_hardware(cfg)
    cell = cell_key(lra.preflight.resolved(cfg))
    lock = CellLock(lra.train._cell_dir(cfg, cell))  # another process (here: this test) is training it
    try:
        outcome = run(make_cfg(*TINY, "resume=true", run_dir="second"))
    finally:
        lock.release()
    assert outcome["status"] == "skipped" and outcome["reason"] == "running in another process"
    assert load_records(cfg.paths.results_dir) == []
    assert run(make_cfg(*TINY, "resume=true", run_dir="third"))["status"] == "ok"  # released: it trains


def test_runs_started_in_the_same_second_get_their_own_folders():
    code = "import lra, lra.config; print(lra.config.RUN_ID)"
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
           for _ in range(2)}
    assert len(ids) == 2
    text = (REPO / "configs" / "train.yaml").read_text()
    assert text.count("${now:%Y-%m-%d_%H-%M-%S}_${run_id:}") == 2  # the run folder and the sweep folder


def test_a_corrupt_last_checkpoint_falls_back_to_the_best_one(make_cfg, monkeypatch, capsys):
    kill_at_step(monkeypatch, 13)
    with pytest.raises(Killed):
        run(make_cfg(*TINY, *STEPS, "resume=true", run_dir="killed"))
    monkeypatch.undo()
    (failure,) = load_records(make_cfg().paths.results_dir)
    last = Path(failure["last_checkpoint"])
    last.write_bytes(last.read_bytes()[:100])  # torn by a full disk, say
    resumed = run(make_cfg(*TINY, *STEPS, "resume=true", run_dir="resumed"))
    out = capsys.readouterr().out
    assert "last.ckpt is unreadable" in out and "continuing from best-step" in out
    assert resumed["steps"] == 24 and resumed["resumed_from"].split("/")[-1].startswith("best-step")
    assert any(p.name.startswith("last.ckpt.unreadable-") for p in last.parent.iterdir())


def test_an_unreadable_last_checkpoint_with_nothing_else_starts_over(make_cfg, capsys):
    cfg = make_cfg(*TINY, "resume=true")
    lra.train.resolve_hardware(cfg)
    folder = lra.train._cell_dir(cfg, cell_key(lra.preflight.resolved(cfg)))
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    record = run(make_cfg(*TINY, "resume=true", run_dir="fresh"))
    assert "no other checkpoint loads: starting over" in capsys.readouterr().out
    assert record["steps"] == 6 and record["resumed_from"] is None


def test_an_unwritable_results_folder_is_found_before_training(make_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write run records into"):
        run(make_cfg(*TINY, f"paths.results_dir={blocker / 'results'}"))


def test_a_record_that_cannot_be_written_at_the_end_is_kept_beside_the_checkpoints(make_cfg, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lra.train, "write_record", disk_full)
    record = run(make_cfg(*TINY))
    kept = Path(record["_path"])
    assert kept.is_file() and kept.parent.name == "checkpoints" and "No space left" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["+optim.learning_rate=1e-3", "+data.batchsize=4", "+task.max_lenght=64",
                                      "++encoder.dropuot=0.2", "+trainer.no_such_argument=1"])
def test_added_keys_nothing_reads_are_refused_naming_the_valid_ones(make_cfg, override):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"has no key '{key}'.*Valid keys of {key.rsplit('.', 1)[0]}: "):
        run(make_cfg(*TINY, override))
    assert load_records(make_cfg().paths.results_dir) == []


def test_added_keys_that_are_read_are_accepted(make_cfg):
    record = run(make_cfg(*TINY, "+trainer.accumulate_grad_batches=2", "++optim.lr=1e-3", "record=false"))
    assert record["config"]["trainer"]["accumulate_grad_batches"] == 2 and record["config"]["optim"]["lr"] == 1e-3


@pytest.mark.parametrize("override,message", [
    ("task.max_len=0", "task.max_len=0: must be an integer >= 1"),
    ("data.seq_len=0", "data.seq_len=0: must be an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("optim.lr=0", "optim.lr=0: the learning rate must be a positive"),
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("seed=-1", "seed=-1"),
    ("optim.schedule=sawtooth", "optim.schedule='sawtooth': valid schedules are"),
    ("trainer.val_check_interval=100", "past trainer.max_steps=6"),
])
def test_nonsense_settings_are_refused(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(make_cfg(*TINY, override))
    assert load_records(make_cfg().paths.results_dir) == []


def test_a_checkpoint_of_another_model_is_a_clear_error(make_cfg):
    other = run(make_cfg(*TINY, "model=tost", "record=false", run_dir="tost"))
    last = Path(other["output_dir"]) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="holds another model's weights"):
        run(make_cfg(*TINY, f"ckpt_path={last}", run_dir="transformer"))


def test_failures_that_are_not_the_experiments_leave_no_record(make_cfg, monkeypatch):
    with pytest.raises(lra.train.DataError):  # no LRA release on disk
        run(make_cfg(*TINY, "task.source=release"))
    real = lra.train.hydra.utils.instantiate

    def no_wandb(config, *args, **kwargs):
        if "WandbLogger" in str(config.get("_target_", "")):
            raise ImportError("No module named 'wandb'")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(lra.train.hydra.utils, "instantiate", no_wandb)
    with pytest.raises(ConfigError, match="logger .*WandbLogger could not be created.*logger=csv"):
        run(make_cfg(*TINY, "logger=wandb"))
    assert load_records(make_cfg().paths.results_dir) == []


def test_an_unresolvable_interpolation_is_a_clear_error(make_cfg, monkeypatch):
    monkeypatch.delenv("LRA_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match="does not resolve.*LRA_NO_SUCH_VARIABLE"):
        run(make_cfg(*TINY, "optim.lr=${oc.env:LRA_NO_SUCH_VARIABLE}"))


def test_records_from_before_an_option_existed_are_the_variant_they_ran():
    """A Proxyformer record written before ``landmark_dropout_on`` existed dropped columns of pinv(K2): it is
    that experiment, not today's default, and other models' records gain no such setting."""
    from lra.results import experiment

    old = {"seed": 0, "model": {"attention": "proxyformer", "options": {"landmark_dropout": 0.1}}}
    new = {"seed": 0, "model": {"attention": "proxyformer",
                                "options": {"landmark_dropout": 0.1, "landmark_dropout_on": "k2"}}}
    assert experiment(old)["model.options.landmark_dropout_on"] == "pinv"
    assert cell_key(old) != cell_key(new)
    assert cell_key(old) == cell_key({**new, "model": {**new["model"], "options": {
        "landmark_dropout": 0.1, "landmark_dropout_on": "pinv"}}})
    other = {"seed": 0, "model": {"attention": "nystromformer", "options": {}}}
    assert "model.options.landmark_dropout_on" not in experiment(other)
