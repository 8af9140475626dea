"""Linformer: the identity-projection limit (= softmax), sharing options (layerwise: one tensor in the encoder),
the harnesses' formulas, lengths, 16k tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lra.attention as attention
from lra.models.encoder import Encoder
from tests.memory import LivePeak

DIM, HEADS = 32, 2


def _build(name="linformer", seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    return attention.build(name, dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def _batch(b, n, pad, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, DIM, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, n - p :] = False
    return x, mask


@pytest.mark.parametrize("share_kv", [False, True])
def test_identity_projections_equal_softmax_with_padding(share_kv):
    """k = n and E = F = I: the projected keys are the keys; rows reaching only padding are masked."""
    n = 24
    soft = _build("softmax", dtype=torch.float64)
    lin = _build(k=n, seq_len=n, share_kv=share_kv, dtype=torch.float64, seed=3)
    result = lin.load_state_dict(soft.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(name for name, _ in lin.named_parameters() if "projection" in name)
    with torch.no_grad():
        for p in (lin.key_projection, lin.value_projection):
            if p is not None:
                p.copy_(torch.eye(n, dtype=torch.float64).expand_as(p))
    x, mask = _batch(3, n, pad=(7, 0, 19), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x, mask)[mask], soft(x, mask)[mask], rtol=0, atol=1e-12)


def test_projections_per_head_and_sharing_options():
    default = _build(k=8, seq_len=32)
    assert default.key_projection.shape == default.value_projection.shape == (HEADS, 8, 32)
    assert not torch.equal(default.key_projection, default.value_projection)
    shared = _build(k=8, seq_len=32, share_kv=True, share_heads=True)
    assert shared.value_projection is None and shared.key_projection.shape == (1, 8, 32)
    assert [n for n, _ in shared.named_parameters() if "projection" in n] == ["key_projection"]


def test_share_kv_uses_e_for_the_values():
    separate = _build(k=8, seq_len=32)
    shared = _build(k=8, seq_len=32, share_kv=True, seed=5)
    shared.load_state_dict({k: v for k, v in separate.state_dict().items() if k != "value_projection"})
    with torch.no_grad():
        separate.value_projection.copy_(separate.key_projection)
    x, mask = _batch(2, 32, pad=(9,))
    with torch.no_grad():
        torch.testing.assert_close(shared(x, mask), separate(x, mask), rtol=0, atol=0)


def test_shorter_input_equals_padding_it_to_seq_len():
    attn = _build(k=16, seq_len=64)
    x, mask = _batch(2, 40, pad=(11,))
    padded, padded_mask = torch.cat([x, torch.randn(2, 24, DIM)], 1), F.pad(mask, (0, 24))
    with torch.no_grad():
        torch.testing.assert_close(attn(padded, padded_mask)[:, :40][mask], attn(x, mask)[mask],
                                   rtol=1e-5, atol=1e-6)


def _encoder(share_layers, depth=3, n=24):
    torch.manual_seed(0)
    options = {"k": 8, "seq_len": n, "share_kv": True, "share_layers": share_layers}
    return Encoder(20, n, "linformer", options, depth=depth, dim=DIM, num_heads=HEADS, dropout=0.0).double()


def test_share_layers_is_one_tensor_in_the_encoder_and_its_gradient_sums_every_layer():
    tied, untied = _encoder(True), _encoder(False)
    projections = [block.attention.key_projection for block in tied.blocks]
    assert all(p is projections[0] for p in projections)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 2 * HEADS * 8 * 24
    untied.load_state_dict(tied.state_dict())  # every layer gets the one shared matrix
    ids = torch.randint(1, 20, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 15:] = False
    tied(ids, mask).sum().backward()
    untied(ids, mask).sum().backward()
    per_layer = [block.attention.key_projection.grad for block in untied.blocks]
    assert all(g.abs().sum() > 0 for g in per_layer)
    torch.testing.assert_close(projections[0].grad, sum(per_layer), rtol=1e-12, atol=1e-14)
    restored = _encoder(True)
    restored.load_state_dict(tied.state_dict())
    assert all(b.attention.key_projection is restored.blocks[0].attention.key_projection for b in restored.blocks)


def test_nystrom_harness_formula():
    """LRA/code/attention_linformer.py: K and V masked, both projected by the one E (per head), no softmax mask."""
    attn = _build(k=8, seq_len=32, share_kv=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, HEADS, 32, DIM // HEADS, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    keep = mask[:, None, :, None].double()
    e = attn.key_projection
    scores = q @ (e @ (k * keep)).transpose(-1, -2) / math.sqrt(DIM // HEADS)
    expected = torch.softmax(scores, -1) @ (e @ (v * keep))
    with torch.no_grad():
        torch.testing.assert_close(attn.attend(q, k, v * keep, mask), expected, rtol=1e-12, atol=1e-14)


def test_lra_variant_no_padding_mask_one_xavier_kernel():
    """LRA's Linformer: one [seq_len, 16] kernel (xavier) for keys, values and heads; padded keys and values
    mixed in as projected; no biases."""
    n, k = 40, 16
    attn = _build(k=k, seq_len=n, share_kv=True, share_heads=True, init="xavier", mask_padding=False,
                  qkv_bias=False, out_bias=False, dtype=torch.float64)
    e = attn.key_projection
    bound = math.sqrt(6 / (n + k))
    assert e.shape == (1, k, n) and e.abs().max() <= bound and e.abs().max() > 0.9 * bound
    x, mask = _batch(2, n, pad=(13,), dtype=torch.float64)
    with torch.no_grad():
        q, kk, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = torch.softmax(q @ (e @ kk).transpose(-1, -2) / math.sqrt(DIM // HEADS), -1) @ (e @ v)
        torch.testing.assert_close(attn(x, mask), attn.out_proj(attn.merge_heads(out)), rtol=1e-12, atol=1e-14)
        other = x.clone()
        other[~mask] = 5.0
        assert not torch.allclose(attn(other, mask)[mask], attn(x, mask)[mask])  # padding reaches real outputs


def test_longer_input_than_seq_len_is_a_clear_error():
    attn = _build(k=16, seq_len=32)
    x, mask = _batch(1, 33, pad=(0,))
    with pytest.raises(ValueError, match=r"33 positions .* seq_len=32.*model\.options\.seq_len"):
        attn(x, mask)


def test_16k_tokens_finite_and_memory_linear():
    n = 16384
    attn = _build(seq_len=n)
    x, mask = _batch(1, n, pad=(1000,))
    with torch.no_grad(), LivePeak() as tracker:
        y = attn(x, mask)
    assert torch.isfinite(y).all()
    assert tracker.largest <= HEADS * 256 * n  # the scores [1, H, N, k] (and E itself)
    assert tracker.peak < HEADS * n * n * 4 / 10, f"peak {tracker.peak / 2**20:.1f} MiB"
