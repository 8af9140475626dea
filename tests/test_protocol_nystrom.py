"""protocol=nystrom computes what the Nyströmformer harness (mlpen/Nystromformer, LRA/code) computed: the settings
it selects, with protocol.quirks=fixed correcting only the upstream bugs, and the whole ListOps model against an
independent float64 reference written from the harness's description (model.py, model_wrapper.py, attention.py,
attention_nystrom.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lra import attention
from lra.models import Encoder, build_model


def resolved(make_cfg, *overrides) -> dict:
    cfg = make_cfg("protocol=nystrom", *overrides)
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("encoder", "model", "data", "task", "trainer")}


UPSTREAM_BUGS = {  # model -> (option, as published, fixed)
    "nystromformer": [("init_scaling", "global", "per_matrix"), ("masking", "authors", "full")],
    "performer": [("variant", "harness", "favor_plus")],
    "reformer": [("redraw_hashes", "always", "train")],
}


@pytest.mark.parametrize("model", sorted(UPSTREAM_BUGS))
def test_the_protocol_selects_the_harness_behaviour_and_quirks_fixed_corrects_it(make_cfg, model):
    upstream = resolved(make_cfg, f"model={model}")
    fixed = resolved(make_cfg, f"model={model}", "protocol.quirks=fixed")
    for option, published, corrected in UPSTREAM_BUGS[model]:
        assert (upstream["model"]["options"][option], fixed["model"]["options"][option]) == (published, corrected)
    assert (upstream["encoder"]["pooling"], fixed["encoder"]["pooling"]) == ("mean_with_padding", "mean")


def test_the_fixed_performer_corrects_the_bugs_and_keeps_the_harness_settings(make_cfg):
    """Fixed is favor_plus (scaled once, padded keys masked, a stabiliser per example) with the harness's settings, W
    drawn once and never redrawn and eps 1e-4, not favor_plus's defaults (a fresh W every step, eps 1e-6)."""
    built = {}
    for quirks in ("upstream", "fixed"):
        options = resolved(make_cfg, "model=performer", f"protocol.quirks={quirks}")["model"]["options"]
        module = attention.build("performer", 64, 2, **options)
        built[quirks] = (module.variant, module.redraw, module.eps, module.num_features, module.orthogonal)
    assert built == {"upstream": ("harness", 0, 1e-4, 256, True), "fixed": ("favor_plus", 0, 1e-4, 256, True)}


def test_deliberate_harness_choices_stay_when_bugs_are_fixed(make_cfg):
    for quirks in ("upstream", "fixed"):
        linformer = resolved(make_cfg, "model=linformer", f"protocol.quirks={quirks}")["model"]["options"]
        assert (linformer["k"], linformer["share_kv"], linformer["share_layers"], linformer["share_heads"]) == (
            256, True, True, False)
        reformer = resolved(make_cfg, "model=reformer", f"protocol.quirks={quirks}")["model"]["options"]
        assert (reformer["num_hashes"], reformer["chunk_size"], reformer["qkv_bias"]) == (2, 64, False)
        text = resolved(make_cfg, "task=text", f"protocol.quirks={quirks}")
        assert (text["task"]["max_len"], text["data"]["seq_len"]) == (1000, 1024)  # LRA/datasets/text.py
        listops = resolved(make_cfg, f"protocol.quirks={quirks}")
        assert (listops["data"]["seq_len"], listops["trainer"]["val_check_interval"]) == (2048, 50)


@pytest.mark.parametrize("task", ["image", "pathfinder", "pathx"])
def test_pixel_zero_is_padding_under_the_harness_only(make_cfg, task):
    assert resolved(make_cfg, f"task={task}")["task"]["zero_pixel_is_padding"] is True
    assert resolved(make_cfg, f"task={task}", "protocol.quirks=fixed")["task"]["zero_pixel_is_padding"] is False
    assert OmegaConf.select(make_cfg(f"task={task}", "protocol=quick"), "task.zero_pixel_is_padding") is False


def test_pooling_with_padding_is_the_sum_over_real_tokens_divided_by_all_positions():
    torch.manual_seed(0)
    kwargs = {"vocab_size": 10, "max_len": 16, "attention_name": "softmax", "dim": 8, "num_heads": 2,
              "mlp_dim": 16, "dropout": 0.0}
    harness, real = Encoder(pooling="mean_with_padding", **kwargs).eval(), Encoder(pooling="mean", **kwargs).eval()
    real.load_state_dict(harness.state_dict())
    ids = torch.randint(1, 10, (3, 16))
    ids[0, 5:], ids[1, 12:] = 0, 0
    mask = ids != 0
    with torch.no_grad():
        pooled, averaged = harness(ids, mask), real(ids, mask)
    n_real = mask.sum(1, keepdim=True).float()
    torch.testing.assert_close(pooled, averaged * n_real / 16)


# ---- the whole model against a reference written from the harness ------------------------------------------------
def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _heads(t, h):
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def _iterative_inv_harness(mat, n_iter=6):
    """attention_nystrom.py iterative_inv ("original" init): V0 = Kᵀ / max over the whole batch of column sums."""
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype)
    v = mat.transpose(-1, -2) / mat.sum(-2).max()
    for _ in range(n_iter):
        kv = mat @ v
        v = (0.25 * v) @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return v


def _nystrom_harness(q, k, v, mask, m, conv_weight):
    """attention_nystrom.py forward: Q, K masked and scaled by d^-1/4, segment means over N/m positions (zeros
    included), kernel_3 alone masks padded keys, conv of V * mask."""
    b, h, n, d = q.shape
    q = q * mask[:, None, :, None] / math.sqrt(math.sqrt(d))
    k = k * mask[:, None, :, None] / math.sqrt(math.sqrt(d))
    q_l = q.reshape(b, h, m, n // m, d).mean(-2)
    k_l = k.reshape(b, h, m, n // m, d).mean(-2)
    k1 = torch.softmax(q @ k_l.transpose(-1, -2), -1)
    k2 = torch.softmax(q_l @ k_l.transpose(-1, -2), -1)
    k3 = torch.softmax(q_l @ k.transpose(-1, -2) - 1e9 * (1 - mask[:, None, None, :]), -1)
    out = (k1 @ _iterative_inv_harness(k2)) @ (k3 @ v)
    kernel = conv_weight.shape[-1]
    conv = F.conv2d(v * mask[:, None, :, None], conv_weight[:, None, :, None], padding=(kernel // 2, 0), groups=h)
    return out + conv


def harness_logits(model, ids):
    """model.py Model + model_wrapper.py ModelForSC (MEAN pooling) with attention.py's softmax or attention_nystrom.py,
    computed from the suite model's parameters (float64)."""
    enc, heads = model.encoder, model.encoder.blocks[0].attention.num_heads
    mask = (ids != 0).to(torch.float64)
    x = enc.token_embedding.weight[ids] + enc.position_embedding[: ids.shape[1]]
    for block in enc.blocks:
        a = block.attention
        h = _ln(x, block.norm1)
        q, k, v = (_heads(F.linear(h, p.weight, p.bias), heads) for p in (a.q_proj, a.k_proj, a.v_proj))
        if a.registry_name == "softmax":
            dot = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) - 1e6 * (1 - mask[:, None, None, :])
            out = torch.softmax(dot, -1) @ v
        else:
            out = _nystrom_harness(q, k, v, mask, a.num_landmarks, a.conv.weight)
        out = out.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, a.out_proj.weight, a.out_proj.bias)
        first, second = block.mlp[0], block.mlp[3]  # model.py's mlpblock: Linear, GELU (exact), Dropout, Linear
        x = x + F.linear(F.gelu(F.linear(_ln(x, block.norm2), first.weight, first.bias)), second.weight, second.bias)
    pooled = (_ln(x, enc.norm) * mask[..., None]).mean(1)
    first, second = model.head.net[0], model.head.net[2]  # model_wrapper.py's SCHead: Linear, ReLU, Linear
    return F.linear(F.relu(F.linear(pooled, first.weight, first.bias)), second.weight, second.bias)


@pytest.mark.parametrize("model_name", ["transformer", "nystromformer"])
def test_listops_model_equals_the_harness_reference_on_a_padded_batch(make_cfg, model_name):
    cfg = make_cfg("protocol=nystrom", f"model={model_name}", "data.seq_len=256")
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.encoder, resolve=True), cfg.model.attention,
                        OmegaConf.to_container(cfg.model.options, resolve=True), 18, 256, 10).double().eval()
    ids = torch.zeros(4, 256, dtype=torch.long)
    for i, length in enumerate((256, 200, 77, 5)):
        ids[i, :length] = torch.randint(1, 18, (length,), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        suite = model({"input_ids": ids, "mask": ids != 0})
        reference = harness_logits(model, ids)
    torch.testing.assert_close(suite, reference, rtol=0, atol=1e-10)
    fixed = make_cfg("protocol=nystrom", f"model={model_name}", "data.seq_len=256", "protocol.quirks=fixed")
    torch.manual_seed(0)
    corrected = build_model(OmegaConf.to_container(fixed.encoder, resolve=True), fixed.model.attention,
                            OmegaConf.to_container(fixed.model.options, resolve=True), 18, 256, 10).double().eval()
    with torch.no_grad():
        assert (corrected({"input_ids": ids, "mask": ids != 0}) - reference).abs().max() > 1e-3
