"""The command lines as a new user meets them: every console script's usage line names it, lra-train --help lists
the groups a user picks from (not the internal recipe groups), lra-data looks at the data make reproduce needs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = dict(  # pyproject.toml's [project.scripts]: name = "module:function"
    line.replace('"', "").replace(" ", "").split("=")
    for line in (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0].splitlines()
    if "=" in line
)


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"lra-train"}))
def test_every_console_script_usage_names_it(name, capsys):
    module, function = SCRIPTS[name].split(":")
    try:
        code = getattr(importlib.import_module(module), function)(["--help"])
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    assert code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name} ")


def test_lra_train_help_lists_the_groups_to_pick_from():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lra.train", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lra-train ")
    groups = {line.split(":")[0] for line in proc.stdout.split("== Config ==")[0].splitlines() if ": " in line}
    assert {"task", "model", "protocol", "trainer", "logger"} <= groups
    assert not {"recipe", "recipe_model", "bench"} & groups
    assert "logger: csv, many, none, tensorboard, wandb" in proc.stdout and "trainer: cpu, ddp, default, gpu" in \
        proc.stdout


def test_lra_data_uses_the_protocol_of_make_reproduce(tmp_path, capsys):
    from lra.data import cli

    args = ["--data-dir", str(tmp_path / "data"), "--lra-release", str(tmp_path / "rel")]
    assert cli.main(["status", "listops", *args]) == 0
    out = capsys.readouterr().out
    assert "protocol nystrom" in out and f"missing  {tmp_path / 'rel' / 'listops-1000' / 'basic_train.tsv'}" in out
    assert cli.main(["status", "listops", "protocol=quick", *args]) == 0
    assert "protocol quick" in capsys.readouterr().out
    makefile = (REPO / "Makefile").read_text()
    assert "PROTOCOL ?= nystrom" in makefile and "lra-data prepare $(TASK) protocol=$(PROTOCOL)" in makefile
