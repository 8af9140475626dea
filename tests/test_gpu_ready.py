"""What a first GPU run relies on, checked on the CPU: the install command line, precisions with fp32 attention,
autocast, experiment identity by device and precision, the TF32 policy. CUDA-only checks are marked ``cuda``
(skipped without a GPU; ``scripts/gpu_check.sh`` runs them)."""

from __future__ import annotations

import math
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lra.train
from lra.attention.nystromformer import iterative_pinv, true_fp32_matmuls
from lra.callbacks import Throughput
from lra.results import cell_key, finished_record, write_record
from lra.train import ConfigError, resolve_hardware, run
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
SEED_METHODS = ("nystromformer", "proxyformer", "cast", "tost")


def test_make_passes_the_torch_index_as_its_own_argument():
    out = subprocess.run(["make", "-n", "-B", "install", "TORCH=torch==2.6.0",
                          "TORCH_INDEX=https://download.pytorch.org/whl/cu124"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    (line,) = [x for x in out.splitlines() if "torch==" in x]
    args = shlex.split(line)
    assert args[args.index("install") + 1:] == ["-q", "torch==2.6.0", "--index-url",
                                                "https://download.pytorch.org/whl/cu124"]
    default = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True, text=True).stdout
    assert any(shlex.split(x)[-1] == "torch==2.13.0" for x in default.splitlines() if "torch==" in x)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("model", SEED_METHODS)
def test_seed_methods_train_in_bf16_with_fp32_attention(make_cfg, model, precision):
    """bf16 weights (``-true``) or bf16 autocast (``-mixed``, autocast on the CPU) with ``encoder.attention_fp32``:
    a training step, a validation and a test step run, and the loss is finite."""
    cfg = make_cfg(*TINY, f"model={model}", "encoder.attention_fp32=true", f"trainer.precision={precision}",
                   "trainer.fast_dev_run=true", "logger=none")
    record = run(cfg)
    assert record["precision"] == precision and 0.0 <= record["test_acc"] <= 1.0
    assert math.isfinite(record["test_loss"])


@pytest.mark.parametrize("model_name,options", [("nystromformer", {"num_landmarks": 4, "conv_kernel": 3}),
                                                ("proxyformer", {"num_proxies": 4, "conv_kernel": 3}),
                                                ("cast", {"num_clusters": 3}), ("tost", {})])
def test_attention_core_runs_in_fp32_under_bf16_weights(model_name, options):
    """``attention_fp32``: a query/key/value attention's core (``attend``) sees float32 q, k, v; an attention with
    projections of its own (ToST) runs whole in float32; the model's output stays bfloat16."""
    import lra.attention as attention
    from lra.models import build_model

    seen = []
    model = build_model({"depth": 1, "dim": 16, "num_heads": 2, "mlp_dim": 32, "dropout": 0.0, "pooling": "mean",
                         "pos_emb": "learned", "embed_init_std": 0.02, "attention_fp32": True, "head_hidden": 8},
                        model_name, options, 10, 12, 3).to(torch.bfloat16).eval()
    attn = model.encoder.blocks[0].attention
    if isinstance(attn, attention.QKVAttention):
        attend = attn.attend
        attn.attend = lambda q, k, v, mask: seen.append(q.dtype) or attend(q, k, v, mask)
    else:
        attn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.randint(1, 10, (2, 12))
    with torch.no_grad():
        logits = model({"input_ids": ids, "mask": ids > 0})
    assert seen == [torch.float32] and logits.dtype == torch.bfloat16


def _resolved(make_cfg, *overrides):
    cfg = make_cfg(*TINY, *overrides)
    resolve_hardware(cfg)
    return cfg


def test_fp16_precisions_fall_back_on_cpu_and_the_key_knows_the_hardware(make_cfg, monkeypatch, capsys):
    for asked in ("16-mixed", "16-true"):
        cfg = _resolved(make_cfg, f"trainer.precision={asked}")
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("cpu", "32-true")
        assert f"trainer.precision={asked} is a GPU setting" in capsys.readouterr().out
    assert _resolved(make_cfg, "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    cpu = _resolved(make_cfg, "trainer.precision=16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = _resolved(make_cfg, "trainer.precision=16-mixed")
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "16-mixed")
    cpu_key, gpu_key = (cell_key(OmegaConf.to_container(c, resolve=True)) for c in (cpu, gpu))
    assert cpu_key != gpu_key


def test_a_cpu_record_never_makes_a_gpu_run_skip(make_cfg, monkeypatch):
    cpu = _resolved(make_cfg)
    record = {"status": "ok", "protocol": "quick", "task": "listops", "model": "transformer", "seed": 0,
              "test_acc": 0.5, "cell": cell_key(OmegaConf.to_container(cpu, resolve=True)),
              "config": OmegaConf.to_container(cpu, resolve=True)}
    write_record(cpu.paths.results_dir, record)
    assert finished_record(cpu.paths.results_dir, "quick", "listops", "transformer", record["cell"]) is not None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = _resolved(make_cfg)
    gpu_cell = cell_key(OmegaConf.to_container(gpu, resolve=True))
    assert finished_record(cpu.paths.results_dir, "quick", "listops", "transformer", gpu_cell) is None


def test_trainer_gpu_without_cuda_is_a_clear_error(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer=gpu.*no CUDA device.*trainer=cpu"):
        run(make_cfg(*TINY, "trainer=gpu"))


def test_pseudo_inverse_matmuls_stay_true_fp32_whatever_the_policy():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with true_fp32_matmuls():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
        seen = []
        original = torch.Tensor.__matmul__

        def spy(a, b):
            seen.append(torch.get_float32_matmul_precision())
            return original(a, b)

        torch.Tensor.__matmul__ = spy
        try:
            iterative_pinv(torch.eye(4).expand(2, 4, 4), 2)
        finally:
            torch.Tensor.__matmul__ = original
        assert seen and set(seen) == {"highest"}
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_run_sets_the_configured_matmul_precision(make_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(lra.train.torch, "set_float32_matmul_precision", calls.append)
    run(make_cfg(*TINY, "trainer.float32_matmul_precision=high", "trainer.fast_dev_run=true", "logger=none"))
    assert calls == ["high"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("model", SEED_METHODS)
def test_cuda_mixed_precision_training_of_seed_methods(make_cfg, model):
    record = run(make_cfg(*TINY, f"model={model}", "protocol=nystrom", "task.source=generate",
                          "trainer.precision=16-mixed", "trainer.fast_dev_run=true", "logger=none",
                          "data.seq_len=40", "data.batch_size=16"))
    # the device and the memory figure are the GPU's (Lightning moves the module back to the CPU after fitting)
    assert record["precision"] == "16-mixed" and record["device"] == torch.cuda.get_device_name()
    assert record["peak_memory_kind"] == Throughput.CUDA_KIND
    assert 0.0 <= record["test_acc"] <= 1.0


@cuda
@pytest.mark.cuda
def test_cuda_sdpa_reaches_a_fused_kernel_in_half_precision():
    """Unpadded fp16 input: PyTorch's dispatcher picks a fused kernel (FlashAttention; cuDNN's, which PyTorch 2.11
    prefers on an H200; or the memory-efficient one), never the math fallback that materialises the N x N scores."""
    import lra.attention as attention

    attn = attention.build("sdpa", dim=64, num_heads=2).cuda().half().eval()
    x = torch.randn(2, 1024, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        attn(x, torch.ones(2, 1024, dtype=torch.bool, device="cuda"))
    assert attn.backends_used and attn.backends_used <= {"FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"}
