"""Every task x model x protocol composes and resolves; bad names get Hydra's list of valid options."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import lra.attention as attention
from tests.conftest import option_names


@pytest.mark.parametrize("protocol", option_names("protocol"))
@pytest.mark.parametrize("task", option_names("task"))
def test_every_combination_composes(make_cfg, task, protocol):
    for model in option_names("model"):
        cfg = make_cfg(f"task={task}", f"model={model}", f"protocol={protocol}")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["task"]["name"] == task and resolved["protocol"]["name"] == protocol
        assert cfg.model.attention in attention.available()
        assert cfg.data.seq_len >= 1 and cfg.trainer.max_steps >= 1


def test_every_registered_attention_has_a_model_config(make_cfg):
    used = {make_cfg(f"model={m}").model.attention for m in option_names("model")}
    assert set(attention.available()) <= used


def test_protocol_numbers(make_cfg):
    nys = make_cfg("protocol=nystrom")
    assert (nys.encoder.depth, nys.encoder.dim, nys.encoder.num_heads, nys.encoder.mlp_dim) == (2, 64, 2, 128)
    assert (nys.data.batch_size, nys.optim.warmup_steps, nys.trainer.max_steps) == (32, 1000, 5000)
    assert nys.data.seq_len == 2048
    assert nys.optim.lr == 1e-4 and nys.optim.eps == 1e-6 and nys.optim.weight_decay == 0
    lra = make_cfg("protocol=lra")
    assert (lra.encoder.depth, lra.encoder.dim, lra.encoder.num_heads, lra.encoder.mlp_dim) == (4, 512, 8, 1024)
    assert (lra.optim.lr, lra.optim.weight_decay, lra.data.seq_len, lra.encoder.pooling) == (0.05, 0.1, 2000, "cls")


@pytest.mark.parametrize("override,valid", [("task=nope", "listops"), ("model=nope", "transformer")])
def test_unknown_group_option_lists_valid_ones(tmp_path, override, valid):
    proc = subprocess.run([sys.executable, "-m", "lra.train", override], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find" in proc.stderr and valid in proc.stderr
