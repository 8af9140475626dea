"""protocol=lra computes what google-research/long-range-arena (lra_benchmarks/, HEAD cd31e5c) computed.

References are written here from the upstream code's semantics (flax 0.3.6 ``flax.deprecated.nn``, jax): the
per-task sizes of the HEAD configs, flax's initialisers, LayerNorm epsilon 1e-6, jax's tanh GELU, the float64
sinusoid table, the ``inputs > 0`` padding mask with its outer-product attention mask, the CLS mask copied from
token 0, MEAN pooling over every row, the Retrieval dual encoder (no CLS token, ``[u, v]`` three-layer head), and
testing the last checkpoint. The other protocols keep their behaviour (checked here too).
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import lra.attention as attention
import lra.train
from lra.data.base import ArrayDataset
from lra.data.listops import ListOpsDataModule
from lra.data.pathfinder import PathfinderDataModule
from lra.models import Encoder, build_model
from lra.models.encoder import sinusoidal_table
from tests.conftest import TINY


def lra_model(make_cfg, task: str, *overrides, vocab_size: int, num_classes: int, dual: bool = False,
              max_len: int | None = None, seed: int = 0):
    cfg = make_cfg(f"task={task}", "protocol=lra", *overrides)
    torch.manual_seed(seed)
    model = build_model(OmegaConf.to_container(cfg.encoder, resolve=True), cfg.model.attention,
                        OmegaConf.to_container(cfg.model.options, resolve=True), vocab_size=vocab_size,
                        max_len=max_len or cfg.data.seq_len, num_classes=num_classes, dual=dual)
    return cfg, model.eval()


def final_states(model, batch: dict) -> torch.Tensor:
    """The encoder's final LayerNorm output ``[B, N(+1), D]`` of one forward."""
    seen = []
    handle = model.encoder.norm.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(batch)
    handle.remove()
    return seen[0], logits


# ---- sizes ------------------------------------------------------------------------------------------------------
# (depth, emb, qkv (None = emb), heads, mlp = head hidden, dropout, attention dropout, pooling, positions, length,
# evaluation interval), from the §2 table of HEAD's per-task configs.
SIZES = {
    "listops": (4, 512, None, 8, 1024, 0.1, 0.1, "cls", "sinusoidal", 2000, 50),
    "text": (4, 256, None, 4, 1024, 0.1, 0.1, "cls", "sinusoidal", 1000, 100),
    "retrieval": (4, 128, None, 4, 512, 0.1, 0.1, "first", "sinusoidal", 4000, 100),
    "image": (1, 128, 64, 8, 128, 0.3, 0.2, "cls", "learned", 1024, 175),
    "pathfinder": (4, 32, 16, 4, 32, 0.2, 0.1, "mean_all", "sinusoidal", 1024, 312),
    "pathx": (1, 32, 16, 2, 32, 0.1, 0.1, "mean_all", "learned", 16384, 2500),
}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_per_task_sizes_at_head(make_cfg, task):
    depth, dim, qkv, heads, mlp, drop, attn_drop, pooling, pos, length, every = SIZES[task]
    cfg = make_cfg(f"task={task}", "protocol=lra")
    enc = cfg.encoder
    assert (enc.depth, enc.dim, enc.qkv_dim, enc.num_heads, enc.mlp_dim, enc.head_hidden) == (
        depth, dim, qkv, heads, mlp, mlp)
    assert (enc.dropout, enc.attention_dropout, enc.pooling, enc.pos_emb) == (drop, attn_drop, pooling, pos)
    assert cfg.model.options.dropout == attn_drop
    assert (cfg.task.max_len, cfg.data.seq_len, cfg.trainer.val_check_interval) == (length, length, every)
    assert (enc.ln_eps, enc.gelu, enc.init, enc.embed_init_std) == (1e-6, "tanh", "lra", 1.0)
    assert OmegaConf.to_container(cfg.model.options, resolve=True) == {
        "dropout": attn_drop, "qkv_bias": False, "out_bias": False, "mask_rule": "outer"}
    assert cfg.protocol.test_checkpoint == "last"


def test_text_length_per_protocol(make_cfg):
    cfgs = {p: make_cfg("task=text", f"protocol={p}") for p in ("lra", "nystrom", "quick")}
    lengths = {p: (cfg.task.max_len, cfg.data.seq_len) for p, cfg in cfgs.items()}
    assert lengths == {"lra": (1000, 1000), "nystrom": (1000, 1024), "quick": (512, 512)}


def test_quirks_fixed_restores_the_corrected_choices(make_cfg):
    cfg = make_cfg("task=pathfinder", "protocol=lra", "protocol.quirks=fixed")
    assert (cfg.encoder.pooling, cfg.encoder.cls_mask, cfg.task.zero_pixel_is_padding) == ("mean", "real", False)
    assert cfg.model.options.mask_rule == "keys"
    assert make_cfg("task=image", "protocol=lra", "protocol.quirks=fixed").encoder.pooling == "cls"


# ---- the ListOps model: parameters and initialisation -------------------------------------------------------------
def test_listops_model_parameter_count_and_lra_initialisation(make_cfg):
    vocab = ListOpsDataModule.vocab_size  # 18: LRA's 15 tokens + [FIRST, [LAST, padding 0 (one unused row vs LRA)
    _, model = lra_model(make_cfg, "listops", vocab_size=vocab, num_classes=10)
    d, mlp, layers, classes = 512, 1024, 4, 10
    block = 2 * 2 * d + 4 * d * d + (d * mlp + mlp) + (mlp * d + d)  # 2 LNs, q/k/v/out without biases, MLP
    expected = vocab * d + d + layers * block + 2 * d + (d * mlp + mlp) + (mlp * classes + classes)
    assert sum(p.numel() for p in model.parameters()) == expected == 8_949_258
    enc = model.encoder
    assert enc.cls is not None and torch.equal(enc.cls, torch.zeros(1, 1, d))
    assert abs(enc.token_embedding.weight.std().item() - 1.0) < 0.03  # normal(stddev=1.0)
    xavier_std = math.sqrt(6 / (d + d)) / math.sqrt(3)  # U(±√(6/(fan_in+fan_out))) has std bound/√3
    for blk in enc.blocks:
        attn = blk.attention
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            assert proj.bias is None
            w = proj.weight
            assert w.abs().max() <= math.sqrt(6 / (d + d)) and abs(w.std().item() / xavier_std - 1) < 0.01
        for lin, (fan_in, fan_out) in ((blk.mlp[0], (d, mlp)), (blk.mlp[3], (mlp, d))):
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert lin.weight.abs().max() <= bound
            assert abs(lin.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
            assert 0.5e-6 < lin.bias.std().item() < 1.5e-6  # normal(stddev=1e-6)
        for norm in (blk.norm1, blk.norm2):
            assert torch.equal(norm.weight, torch.ones(d)) and torch.equal(norm.bias, torch.zeros(d))
    for lin, fan_in in ((model.head.net[0], d), (model.head.net[2], mlp)):
        std = 1 / math.sqrt(fan_in)  # lecun_normal: truncated normal with std 1/√fan_in after jax's correction
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert lin.weight.abs().max() <= 2 * std / 0.87962566103423978 + 1e-7
        assert abs(lin.weight.std().item() / std - 1) < (0.02 if fan_in == d else 0.1)


def test_learned_positions_are_normal_002_under_lra(make_cfg):
    _, model = lra_model(make_cfg, "image", vocab_size=256, num_classes=10)
    pos = model.encoder.position_embedding
    assert pos.shape == (1025, 128) and abs(pos.std().item() / 0.02 - 1) < 0.02  # 1024 pixels + CLS


def test_torch_defaults_elsewhere(make_cfg):
    """quick/nystrom keep PyTorch's LayerNorm eps, exact GELU, biased projections and default init."""
    for protocol in ("quick", "nystrom"):
        cfg = make_cfg("task=listops", f"protocol={protocol}")
        model = build_model(OmegaConf.to_container(cfg.encoder, resolve=True), "softmax",
                            OmegaConf.to_container(cfg.model.options, resolve=True), 18, 64, 10)
        blk = model.encoder.blocks[0]
        assert blk.norm1.eps == 1e-5 and model.encoder.norm.eps == 1e-5 and blk.mlp[1].approximate == "none"
        assert blk.attention.q_proj.bias is not None and blk.attention.out_proj.bias is not None
        assert blk.attention.mask_rule == "keys" and cfg.protocol.test_checkpoint == "best"
        bound = 1 / math.sqrt(64)  # torch Linear: U(±1/√fan_in) for weight and bias
        assert blk.mlp[0].bias.abs().max() <= bound and blk.mlp[0].bias.std() > 1e-2


# ---- numerics ------------------------------------------------------------------------------------------------------
def test_layer_norm_epsilon_and_tanh_gelu_values():
    enc = Encoder(vocab_size=8, max_len=4, attention_name="softmax", depth=1, dim=4, num_heads=1, mlp_dim=4,
                  ln_eps=1e-6, gelu="tanh").eval()
    x = torch.tensor([[0.0, 1e-3, 2e-3, 3e-3]])  # variance 1.25e-6: the epsilon matters
    mean, var = 1.5e-3, 1.25e-6
    ref = (x - mean) / math.sqrt(var + 1e-6)  # flax: (x - E[x]) * rsqrt(Var[x] + 1e-6)
    torch.testing.assert_close(enc.norm(x), ref, rtol=1e-4, atol=1e-5)
    assert (enc.norm(x) - (x - mean) / math.sqrt(var + 1e-5)).abs().max() > 0.1  # torch's 1e-5 would differ
    v = torch.tensor([-3.0, -1.0, -0.5, 0.3, 1.0, 2.5])
    gelu = enc.blocks[0].mlp[1](v)
    tanh_ref = [0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))) for t in v.tolist()]
    torch.testing.assert_close(gelu, torch.tensor(tanh_ref), rtol=0, atol=1e-7)
    erf_ref = torch.tensor([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in v.tolist()])
    assert (gelu - erf_ref).abs().max() > 1e-4  # the exact GELU is another function


def test_sinusoid_table_is_computed_in_float64():
    length, dim = 4001, 8
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, dim, 2) * -(np.log(10000.0) / dim))  # float64, as numpy computes it
    ref = np.zeros((length, dim), np.float32)
    ref[:, 0::2], ref[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    np.testing.assert_array_equal(sinusoidal_table(length, dim).numpy(), ref)


# ---- masks and pooling ---------------------------------------------------------------------------------------------
def _qkv_batch(n=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, dim, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 1] = mask[0, 4:] = False
    return x, mask


@pytest.mark.parametrize("name", ["softmax", "sdpa"])
def test_outer_mask_rule_padded_queries_attend_uniformly(name):
    torch.manual_seed(0)
    attn = attention.build(name, dim=8, num_heads=2, qkv_bias=False, out_bias=False, mask_rule="outer").eval()
    keys = attention.build(name, dim=8, num_heads=2, qkv_bias=False, out_bias=False).eval()
    keys.load_state_dict(attn.state_dict())
    x, mask = _qkv_batch()
    with torch.no_grad():
        out, ref_keys = attn(x, mask), keys(x, mask)
        uniform = attn.out_proj(attn.v_proj(x).mean(1, keepdim=True))  # mean of every value, padded ones too
    torch.testing.assert_close(out[mask], ref_keys[mask], rtol=1e-5, atol=1e-6)  # real rows: the usual result
    torch.testing.assert_close(out[0, ~mask[0]], uniform[0].expand(int((~mask[0]).sum()), -1), rtol=1e-5, atol=1e-6)
    assert (out[0, ~mask[0]] - ref_keys[0, ~mask[0]]).abs().max() > 1e-3  # the default rule differs there
    other = x.clone()
    other[~mask] = 100 * torch.randn_like(other[~mask])
    with torch.no_grad():
        torch.testing.assert_close(attn(other, mask)[mask], out[mask], rtol=1e-5, atol=1e-5)  # no leak into real rows


def test_cls_mask_copies_the_first_tokens_mask():
    masks = []
    enc = Encoder(vocab_size=8, max_len=6, attention_name="softmax", depth=1, dim=8, num_heads=2, mlp_dim=8,
                  pooling="cls", cls_mask="first_token").eval()
    enc.blocks[0].attention.register_forward_pre_hook(lambda mod, args: masks.append(args[1].clone()))
    ids = torch.tensor([[0, 3, 0, 5, 0, 0], [2, 3, 4, 0, 0, 0]])
    with torch.no_grad():
        enc(ids, ids != 0)
    assert masks[0][:, 0].tolist() == [False, True] and torch.equal(masks[0][:, 1:], ids != 0)
    enc.cls_mask = "real"
    with torch.no_grad():
        enc(ids, ids != 0)
    assert masks[1][:, 0].tolist() == [True, True]


def test_masked_cls_attends_uniformly_under_lra(make_cfg):
    """CIFAR with a black first pixel: LRA masks the CLS row, which then averages every position's value."""
    cfg, model = lra_model(make_cfg, "image", "encoder.depth=1", vocab_size=256, num_classes=10)
    attn = model.encoder.blocks[0].attention
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], mask=args[1], out=out))
    ids = torch.randint(0, 256, (2, 1024), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[1, 0] = 0, 7
    with torch.no_grad():
        model({"input_ids": ids, "mask": ids != 0})
        uniform = attn.out_proj(attn.v_proj(seen["x"][0]).mean(0))
    assert seen["mask"][:, 0].tolist() == [False, True]
    torch.testing.assert_close(seen["out"][0, 0], uniform, rtol=1e-4, atol=1e-6)


def test_lra_mean_pooling_is_the_plain_mean_over_every_row(make_cfg):
    _, model = lra_model(make_cfg, "pathfinder", vocab_size=256, num_classes=2)
    ids = torch.randint(0, 256, (2, 1024), generator=torch.Generator().manual_seed(0))
    ids[0, :700] = 0  # a mostly black image: padding under LRA
    batch = {"input_ids": ids, "mask": ids != 0}
    states, logits = final_states(model, batch)
    pooled = model.encoder(ids, ids != 0)
    torch.testing.assert_close(pooled, states.mean(1), rtol=0, atol=1e-7)
    real = batch["mask"][..., None].float()
    assert (pooled[0] - (states * real).sum(1)[0] / 1024).abs().max() > 1e-3  # not mean_with_padding
    assert (pooled[0] - (states * real).sum(1)[0] / real[0].sum()).abs().max() > 1e-3  # not mean over real rows
    torch.testing.assert_close(logits, model.head(pooled))


# ---- pixel value 0 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["image", "pathfinder", "pathx"])
def test_pixel_zero_is_padding_under_lra_and_nystrom_only(make_cfg, task):
    flags = {p: make_cfg(f"task={task}", f"protocol={p}").task.zero_pixel_is_padding
             for p in ("lra", "nystrom", "quick")}
    assert flags == {"lra": True, "nystrom": True, "quick": False}
    for protocol in ("lra", "nystrom"):
        assert make_cfg(f"task={task}", f"protocol={protocol}", "protocol.quirks=fixed").task.zero_pixel_is_padding \
            is False


def test_pixel_zero_mask_in_batches_and_same_cache(make_cfg, tmp_path):
    from tests.test_image import cifar_like, save_cifar_like

    save_cifar_like(tmp_path / "hub", cifar_like(10, seed=0), cifar_like(4, seed=1))
    made = {}
    for protocol, quirks in (("lra", "upstream"), ("nystrom", "upstream"), ("quick", "fixed"), ("lra", "fixed")):
        cfg = make_cfg("task=image", f"protocol={protocol}", f"++protocol.quirks={quirks}",
                       f"task.hub_path={tmp_path / 'hub'}")
        dm = hydra.utils.instantiate(cfg.task.datamodule)
        dm.prepare_data()
        dm.setup()
        made[protocol, quirks] = dm
        batch = dm.datasets["test"].__getitems__([0, 1, 2, 3])
        ids, mask = batch["input_ids"], batch["mask"]
        assert (ids[:, 0] == 0).all()  # cifar_like makes pixel 0 black
        assert torch.equal(mask, ids != 0 if quirks == "upstream" else torch.ones_like(mask))
    # masks are built at batch time: the quirk does not change the prepared arrays or their cache
    assert made["lra", "upstream"].cache_dir == made["lra", "fixed"].cache_dir


def test_pathfinder_pixel_zero_mask_at_batch_time():
    arrays = {"input_ids": np.array([[0, 5, 0, 9]], dtype=np.uint8), "label": np.array([1])}
    kw = dict(lra_release="/nonexistent", data_dir="/nonexistent", cache_dir="/nonexistent", batch_size=1,
              seq_len=1024, max_len=1024)
    for flag, expected in ((True, [[False, True, False, True]]), (False, [[True] * 4])):
        dm = PathfinderDataModule(zero_pixel_is_padding=flag, **kw)
        assert ArrayDataset(arrays, 4, dm.pad_id).__getitems__([0])["mask"].tolist() == expected


# ---- Retrieval dual encoder ----------------------------------------------------------------------------------------
def test_retrieval_dual_encoder_without_cls_and_concat_head(make_cfg):
    cfg, model = lra_model(make_cfg, "retrieval", vocab_size=257, num_classes=2, dual=True, max_len=32)
    enc, head = model.encoder, model.head.net
    assert enc.cls is None and enc.position_embedding.shape == (32, 128)  # no CLS token, no extra position
    shapes = [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)]
    assert shapes == [(512, 256), (256, 512), (2, 256)]  # [u, v] (2·128) -> 512 -> 256 -> 2
    ids = torch.randint(1, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    ids2 = torch.randint(1, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    ids[0, 20:] = ids2[1, 10:] = 0
    batch = {"input_ids": ids, "mask": ids != 0, "input_ids_2": ids2, "mask_2": ids2 != 0}
    seen = []
    handle = enc.norm.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(batch)
    handle.remove()
    u, v = seen[0][:, 0], seen[1][:, 0]  # the first byte's output
    h = torch.relu(head[0](torch.cat([u, v], -1)))
    torch.testing.assert_close(logits, head[4](torch.relu(head[2](h))))
    nys = make_cfg("task=retrieval", "protocol=nystrom")
    other = build_model(OmegaConf.to_container(nys.encoder, resolve=True), "softmax", {}, 257, 32, 2, dual=True)
    assert other.head.net[0].in_features == 4 * nys.encoder.dim  # the harness's [u, v, u*v, u-v] head stays


# ---- qkv_dim -------------------------------------------------------------------------------------------------------
def test_qkv_dim_reaches_the_attention_and_is_refused_where_unsupported(make_cfg, monkeypatch):
    _, model = lra_model(make_cfg, "pathfinder", vocab_size=256, num_classes=2)
    attn = model.encoder.blocks[0].attention
    assert (attn.q_proj.weight.shape, attn.out_proj.weight.shape, attn.head_dim) == ((16, 32), (32, 16), 4)
    for name in ("nystromformer", "proxyformer", "cast", "tost", "linear"):  # every method can run at width 16
        block = Encoder(vocab_size=8, max_len=64, attention_name=name, dim=32, num_heads=4, qkv_dim=16).blocks[0]
        assert block.attention.head_dim == 4 and block(torch.randn(1, 64, 32), torch.ones(1, 64, dtype=bool)).shape \
            == (1, 64, 32)

    class NoWidth(attention.QKVAttention):  # an attention that runs at the model width only
        def __init__(self, dim: int, num_heads: int):
            super().__init__(dim, num_heads)

    monkeypatch.setitem(attention._REGISTRY, "no_width", NoWidth)
    with pytest.raises(ValueError, match="has no qkv_dim option"):
        Encoder(vocab_size=8, max_len=8, attention_name="no_width", dim=32, num_heads=4, qkv_dim=16)


# ---- which checkpoint is tested ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["last", "best"])
def test_tested_checkpoint_is_recorded(make_cfg, which):
    """``last`` tests the weights training ended with (LRA: the final step's), ``best`` the best-validation
    checkpoint: each record's test accuracy is ``lra-eval``'s of that checkpoint. At these settings the best
    validation is at step 3 and training ends at step 6, so the two are different weights."""
    import lra.eval

    cfg = make_cfg(*TINY, f"protocol.test_checkpoint={which}", "logger=none")
    record = lra.train.run(cfg)
    assert record["test_checkpoint"] == which
    folder = Path(record["output_dir"]) / "checkpoints"
    (folder.parent / ".hydra").mkdir()
    OmegaConf.save(cfg, folder.parent / ".hydra" / "config.yaml")  # what lra-train's Hydra run folder holds
    (best,) = folder.glob("best-*.ckpt")
    assert best.name.startswith("best-step3-")  # not the final weights (step 6, last.ckpt)
    if which == "last":
        assert record["checkpoint"] is None
        tested = folder / "last.ckpt"
    else:
        tested = best
        assert Path(record["checkpoint"]) == best
    evaluation = {name: lra.eval.evaluate(lra.eval.compose([f"ckpt_path={ckpt}"])[0])["test_acc"]
                  for name, ckpt in (("tested", tested), ("other", folder / "last.ckpt" if which == "best" else best))}
    assert record["test_acc"] == pytest.approx(evaluation["tested"], abs=1e-6)
    assert evaluation["tested"] != pytest.approx(evaluation["other"], abs=1e-6)  # the choice shows in the figure


def test_bad_test_checkpoint_is_a_config_error(make_cfg):
    with pytest.raises(lra.train.ConfigError, match="test_checkpoint"):
        lra.train.run(make_cfg(*TINY, "protocol.test_checkpoint=first", "logger=none"))


# ---- end to end ----------------------------------------------------------------------------------------------------
SHRUNK = ["encoder.depth=1", "encoder.dim=16", "encoder.num_heads=2", "encoder.mlp_dim=16", "encoder.head_hidden=16",
          "trainer.fast_dev_run=true", "logger=none"]


def test_smoke_run_of_the_lra_protocol_on_tiny_listops(make_cfg):
    tiny = [o for o in TINY if not o.startswith("protocol=")]
    record = lra.train.run(make_cfg(*tiny, "protocol=lra", "task.source=generate", *SHRUNK))
    assert record["protocol"] == "lra" and 0 <= record["test_acc"] <= 1 and record["test_checkpoint"] == "last"


def test_smoke_run_of_the_lra_dual_encoder_on_tiny_retrieval(make_cfg, tmp_path):
    from tests.test_retrieval import write_release

    write_release(tmp_path / "lra_release")
    cfg = make_cfg("task=retrieval", f"paths.lra_release={tmp_path / 'lra_release'}", "protocol=lra",
                   "task.max_len=16", "data.seq_len=16", "data.batch_size=2", *SHRUNK)
    assert (cfg.encoder.pooling, cfg.encoder.dual_head) == ("first", "concat")
    record = lra.train.run(cfg)
    assert record["task"] == "retrieval" and 0 <= record["test_acc"] <= 1
