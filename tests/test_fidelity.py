"""Fidelity report: exact reference, error measure, weight transfer, exact limit, inputs, report files, bad input."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

import lra.attention as attention
import lra.fidelity as fidelity
from lra.fidelity import (
    CSV_COLUMNS,
    Method,
    NotComparable,
    Reference,
    attention_heads,
    chunked_softmax_attention,
    compose_config,
    default_models,
    measure,
    method_variants,
    relative_error,
    task_batches,
    transfer_weights,
    uniform_attention,
    uniform_results,
)
from tests.conftest import CONFIGS, option_names

DIM, HEADS = 32, 2


def _tiny(tmp_path, *args, overrides=()):
    """CLI arguments of a run at width 32, lengths 64 and 128, with its data and results under ``tmp_path``."""
    return ["--lengths", "64", "128", "--out", str(tmp_path / "results"), *args,
            "--override", f"encoder.dim={DIM}", f"paths.data_dir={tmp_path / 'data'}", *overrides]


def _padded_batch(b=3, n=50, dtype=torch.float64):
    x = torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(0), dtype=dtype)
    mask = torch.arange(n)[None] < torch.tensor([31, n, 7][:b])[:, None]
    return x, mask


def test_chunked_reference_equals_softmax_module():
    torch.manual_seed(0)
    soft = attention.build("softmax", dim=DIM, num_heads=HEADS).double().eval()
    x, mask = _padded_batch()
    with torch.no_grad():
        expected = soft(x, mask)
        for chunk in (16, 50, 64):  # not dividing N, = N, > N
            heads, entropy = chunked_softmax_attention(soft, x, mask, chunk)
            torch.testing.assert_close(soft.out_proj(heads), expected, rtol=0, atol=1e-12)
            torch.testing.assert_close(heads, attention_heads(soft, x, mask), rtol=0, atol=1e-12)
            assert entropy.shape == (3, HEADS, 50) and ((entropy > 0.5) & (entropy < 1)).all()


def test_constant_scores_give_uniform_attention_and_entropy_one():
    torch.manual_seed(0)
    soft = attention.build("softmax", dim=DIM, num_heads=HEADS).double().eval()
    with torch.no_grad():
        soft.q_proj.weight.zero_()
        soft.q_proj.bias.zero_()
        x, mask = _padded_batch()
        heads, entropy = chunked_softmax_attention(soft, x, mask, 16)
        torch.testing.assert_close(uniform_attention(soft, x, mask), heads, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, torch.ones_like(entropy), rtol=0, atol=1e-12)


def test_relative_error_counts_real_positions_only():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(2, 10, 4, generator=g, dtype=torch.float64)
    mask = torch.arange(10)[None] < torch.tensor([[6], [9]])
    approx = torch.where(mask[..., None], 1.1 * exact, torch.full_like(exact, 1e6))  # garbage at padding
    assert relative_error(approx, exact, mask) == pytest.approx(0.1, rel=1e-12)
    assert relative_error(exact, exact, mask) == 0.0


def test_transfer_weights_shares_projections_and_lists_own_parameters():
    torch.manual_seed(0)
    soft = attention.build("softmax", dim=DIM, num_heads=HEADS)
    torch.manual_seed(1)
    nys = attention.build("nystromformer", dim=DIM, num_heads=HEADS)
    assert transfer_weights(soft, nys) == ["conv.weight"]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert torch.equal(getattr(nys, name).weight, getattr(soft, name).weight)


def test_method_without_softmax_projections_is_not_comparable():
    soft = attention.build("softmax", dim=DIM, num_heads=HEADS)
    with pytest.raises(NotComparable, match="q_proj.weight"):
        transfer_weights(soft, attention.build("tost", dim=DIM, num_heads=HEADS))
    with pytest.raises(NotComparable, match="q_proj.bias"):  # a reference with biases the method lacks
        transfer_weights(soft, attention.build("nystromformer", dim=DIM, num_heads=HEADS, qkv_bias=False))


def _reference(compare="heads", qk_scale=1.0, n=24):
    x, mask = _padded_batch(n=n)
    args = argparse.Namespace(seed=0, dtype="float64", device="cpu", chunk=16, qk_scale=qk_scale, compare=compare)
    return Reference(DIM, HEADS, {"padded": [(x, mask), (x[:2], mask[:2])]}, args), x, mask


@pytest.mark.parametrize("compare", ["heads", "projected"])
def test_exact_limit_measures_zero_and_uniform_row_is_the_values_mean(compare):
    reference, x, mask = _reference(compare)
    exact = Method("nystromformer", "nystromformer", "pure",
                   {"num_landmarks": 64, "pinv_iterations": 30, "conv_kernel": 0}, {"conv_kernel": 0})
    result = measure(exact, reference)["padded"]
    assert result["status"] == "ok" and len(result["errors"]) == 2 and max(result["errors"]) < 1e-9
    soft = reference.module()
    with torch.no_grad():
        target = soft(x, mask) if compare == "projected" else chunked_softmax_attention(soft, x, mask)[0]
        mean = uniform_attention(soft, x, mask)
        approx = soft.out_proj(mean) if compare == "projected" else mean
    uniform = uniform_results(reference)["padded"]
    assert uniform["errors"][0] == pytest.approx(relative_error(approx, target, mask), rel=1e-12)
    assert 0 < uniform["entropy"] < 1 and uniform["entropy"] == result["entropy"]


def test_qk_scale_multiplies_the_scores():
    base, sharp = _reference(qk_scale=1.0)[0].module(), _reference(qk_scale=4.0)[0].module()
    for name in ("q_proj", "k_proj"):  # q and k each by sqrt(4), biases too: every score q . k by 4
        torch.testing.assert_close(getattr(sharp, name).weight, 2 * getattr(base, name).weight)
        torch.testing.assert_close(getattr(sharp, name).bias, 2 * getattr(base, name).bias)
    assert torch.equal(sharp.v_proj.weight, base.v_proj.weight) and torch.equal(sharp.v_proj.bias, base.v_proj.bias)
    assert _reference(qk_scale=4.0)[0].exact(True, "padded")[1] < _reference()[0].exact(True, "padded")[1]


def test_default_models_are_every_non_exact_config():
    exact = {"transformer", "sdpa"}  # the model configs whose attention is softmax or sdpa
    assert {m for m in option_names("model")
            if OmegaConf.load(CONFIGS / "model" / f"{m}.yaml").attention in ("softmax", "sdpa")} == exact
    assert default_models() == sorted(set(option_names("model")) - exact)
    assert {"nystromformer", "proxyformer", "cast", "tost"} <= set(default_models())


def test_pure_variant_exists_only_where_an_option_adds_to_the_approximation():
    def variants(*overrides):
        cfg = compose_config(["protocol=nystrom", *overrides])
        return [(m.variant, m.changed, m.options.get("conv_kernel")) for m in
                method_variants(cfg.model.name, cfg, ("configured", "pure"))]

    assert variants("model=nystromformer") == [("configured", {}, 35), ("pure", {"conv_kernel": 0}, 0)]
    assert variants("model=nystromformer", "model.options.conv_kernel=0") == [("configured", {}, 0)]
    assert variants("model=cast") == [("configured", {}, None)]


def test_listops_inputs_have_lengths_near_n_and_their_padding_mask(tmp_path):
    overrides = ["protocol=nystrom", "task=listops", "data.seq_len=64", "data.batch_size=3", f"encoder.dim={DIM}",
                 f"paths.data_dir={tmp_path}", *fidelity.task_input_overrides("listops", 64, 6)]
    batches, source = task_batches(compose_config(overrides), batches=2, seed=0)
    assert source["source"] == "generated" and len(batches) == 2
    for x, mask in batches:
        assert x.shape == (3, 64, DIM) and mask.shape == (3, 64)
        lengths = mask.sum(1)
        assert ((lengths > 32) & (lengths <= 64)).all()
        assert torch.equal(mask, torch.arange(64)[None] < lengths[:, None])  # real tokens first, then padding
        real = x[mask]  # LayerNorm'd embeddings: zero mean, unit variance per token (up to LayerNorm's eps)
        torch.testing.assert_close(real.mean(-1), torch.zeros(len(real)), rtol=0, atol=1e-5)
        torch.testing.assert_close(real.var(-1, unbiased=False), torch.ones(len(real)), rtol=0, atol=0.05)


@pytest.mark.parametrize(
    "options,low,high",
    [  # one landmark per token and a converged pseudo-inverse: the exact limit; a crude setting is far from it
        (["model.options.num_landmarks=128", "model.options.pinv_iterations=30"], 0.0, 1e-6),
        (["model.options.num_landmarks=4", "model.options.pinv_iterations=1"], 0.05, 1.0),
    ],
)
def test_nystromformer_error_bounds(tmp_path, options, low, high):
    args = fidelity.parse_args(_tiny(tmp_path, "--models", "nystromformer", "--dtype", "float64",
                                     "--variants", "pure", "--batches", "1", overrides=options))
    rows = fidelity.run(args)["rows"]
    uniform = [r for r in rows if r["method"] == "uniform"]
    rows = [r for r in rows if r["method"] == "nystromformer"]
    assert len(uniform) + len(rows) == 8
    assert {(r["length"], r["input"]) for r in rows} == {(n, k) for n in (64, 128) for k in ("random", "listops")}
    for r in rows:
        assert r["status"] == "ok" and r["variant_options"] == "conv_kernel=0" and r["batches"] == 1
        assert low < r["rel_error_max"] < high, r


def test_report_files_one_row_per_method_variant_length_input(tmp_path, capsys):
    argv = _tiny(tmp_path, "--models", "nystromformer", "tost", "--batches", "1", "--compare", "projected")
    assert fidelity.main(argv) == 0
    out = tmp_path / "results"
    assert not (out / "fidelity.md").exists()  # an exploratory run never replaces the default report
    (table,) = out.glob("fidelity-custom-*.csv")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    keys = [(r["method"], r["variant"], r["length"], r["input"]) for r in rows]
    families = [("uniform", "reference point"), ("nystromformer", "configured"), ("nystromformer", "pure"),
                ("tost", "configured")]
    assert sorted(keys) == sorted((*f, n, k) for f in families for n in ("64", "128") for k in ("random", "listops"))
    for r in rows:
        if r["method"] == "tost":
            assert r["status"] == "skipped" and r["reason"].startswith("not comparable") and r["rel_error_mean"] == ""
        elif r["method"] == "uniform":
            assert r["status"] == "ok" and 0 < float(r["rel_error_mean"]) and r["options"] == "{}"
        else:
            assert r["status"] == "ok" and float(r["rel_error_mean"]) > 0 and r["dtype"] == "float32"
            assert r["compare"] == "projected" and 0 < float(r["exact_entropy"]) < 1
            assert r["untrained_parameters"] == ("conv.weight" if r["variant"] == "configured" else "")
            assert json.loads(r["options"])["conv_kernel"] == (35 if r["variant"] == "configured" else 0)
            assert (float(r["real_fraction"]) == 1.0) == (r["input"] == "random")
    records = list((out / "fidelity").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["command"].startswith("python -m lra.fidelity --lengths 64 128") and len(record["rows"]) == len(rows)
    assert {(r["commit"], r["record"], r["seed"]) for r in rows} == {(record["git"]["commit"], str(records[0]), "0")}
    assert table.name == f"fidelity-custom-{records[0].stem}.csv" and record["custom"] is True
    md = table.with_suffix(".md").read_text()
    assert record["git"]["commit"] in md and records[0].name in md and "untrained" in md
    assert "| nystromformer | pure (conv_kernel=0) |" in md and "| uniform | reference point |" in md
    assert "| tost | configured | skipped [1] | skipped [1] |" in md
    assert str(table.with_suffix(".md")) in capsys.readouterr().out


def test_the_default_run_writes_the_report_and_not_comparable_methods_are_marked(tmp_path):
    row = {"method": "skyformer", "attention": "skyformer", "variant": "configured", "variant_options": "",
           "length": 64, "input": "random", "status": "ok", "rel_error_mean": 160.0, "rel_error_std": 2.0}
    record = {"command": "python -m lra.fidelity", "started": "t", "runtime_s": 0, "custom": False,
              "git": {"commit": "abc", "dirty": False}, "device": "cpu", "torch": "x", "sources": {},
              "rows": [{**row, **{c: None for c in CSV_COLUMNS if c not in row}}],
              "settings": {"dtype": "float32", "seed": 0, "protocol": "nystrom", "batches": 1, "batch_size": 1,
                           "compare": "heads", "qk_scale": 1.0}}
    _, md, table = fidelity.write_outputs(record, tmp_path)
    assert (md.name, table.name) == ("fidelity.md", "fidelity.csv")
    text = md.read_text()
    assert "| skyformer | configured | not comparable [1] |" in text and "unnormalised Gaussian-kernel" in text
    assert "160" in table.read_text()  # the error itself stays in the CSV


def test_run_records_are_never_overwritten(tmp_path, monkeypatch):
    record = {"command": "c", "started": "t", "runtime_s": 0, "git": {"commit": "abc", "dirty": False},
              "device": "cpu", "torch": "x", "sources": {}, "rows": [],
              "settings": {"dtype": "float32", "seed": 0, "protocol": "nystrom", "batches": 1, "batch_size": 1,
                           "compare": "heads", "qk_scale": 1.0}}
    first = fidelity.write_outputs(record, tmp_path)[0]
    monkeypatch.setattr(fidelity.secrets, "token_hex", lambda n: first.stem.split("_")[-1])
    monkeypatch.setattr(fidelity.time, "strftime", lambda fmt: first.stem.split("_")[0])
    with pytest.raises(FileExistsError):
        fidelity.write_outputs(record, tmp_path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "nope"], "valid: "),
        (["--task", "nope"], "configs/task/"),
        (["--lengths", "8"], "at least 16"),
        (["--batches", "0"], "--batches must be at least 1"),
        (["--qk-scale", "0"], "--qk-scale must be positive"),
        (["--override", "protocol=nope"], "--override"),
    ],
)
def test_bad_options_get_one_clear_message(tmp_path, capsys, argv, message):
    assert fidelity.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "fidelity.md").exists()
