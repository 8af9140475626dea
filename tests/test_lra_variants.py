"""The original LRA code's attention variants (``protocol=lra``) against float64 dense references written from
their definitions: local ``lra_exact`` (strided groups, contiguous mask, internal padding as real keys), sparse with
LRA's summary set and CLS row/column, linear attention without a padding mask; and the attention width
``qkv_dim`` / ``out_bias`` options every LRA baseline passes on."""

from __future__ import annotations

import math

import pytest
import torch

import lra.attention as attention
from tests.test_baselines_a import DH, DIM, HEADS, _batch, _build, _dense, _qkv

LRA_BASELINES = {"softmax": {}, "sdpa": {}, "local": {}, "sparse": {}, "longformer": {"num_global": 1},
                 "linformer": {"seq_len": 24}, "linear": {}, "performer": {}, "synthesizer": {"seq_len": 24,
                 "dot_product": True}, "bigbird": {"block_size": 4}, "sinkhorn": {"seq_len": 24, "block_size": 6},
                 "reformer": {"chunk_size": 8}}


@pytest.mark.parametrize("name", sorted(LRA_BASELINES))
def test_attention_width_and_no_biases(name):
    """LRA's flax attention: q/k/v kernels [emb, qkv_dim], out kernel [qkv_dim, emb], no biases."""
    attn = _build(name, qkv_dim=16, qkv_bias=False, out_bias=False, **LRA_BASELINES[name])
    assert attn.head_dim == 16 // HEADS and attn.q_proj.weight.shape == (16, DIM) and attn.q_proj.bias is None
    assert attn.out_proj.weight.shape == (DIM, 16) and attn.out_proj.bias is None
    x, mask = _batch(2, 24, pad=(5,))
    with torch.no_grad():
        y = attn(x, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()


def _project(attn, x):
    return [attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]


@pytest.mark.parametrize(("n", "w"), [(23, 5), (20, 5), (9, 4)])
def test_local_lra_exact_matches_the_definition(n, w):
    """LRA's local_attention.py: pad N to w (N // w + 1) with zero inputs; group g of position p = p mod G
    (G = N' / w), slot p // G; query slot a and key slot b of group g are allowed iff positions g w + a and
    g w + b are real (internal padding real); rows with nothing allowed are uniform over the group."""
    attn = _build("local", window_size=w, pattern="lra_exact", qkv_bias=False, out_bias=False)
    x, mask = _batch(3, n, pad=(n // 3, 0, n - 2))
    groups = n // w + 1
    length = groups * w
    with torch.no_grad():
        q, k, v = _project(attn, torch.nn.functional.pad(x, (0, 0, 0, length - n)))  # values NOT zeroed
        real = torch.nn.functional.pad(mask, (0, length - n), value=True)  # [B, N']
        p = torch.arange(length)
        group, slot = p % groups, p // groups
        same = group[:, None] == group[None, :]
        contiguous = real[:, group * w + slot]  # the mask LRA applies to each position's row / column slot
        allowed = same & contiguous[:, :, None] & contiguous[:, None, :]  # [B, N', N']
        scores = (q @ k.transpose(-1, -2) / math.sqrt(DH)).masked_fill(~allowed[:, None], float("-inf"))
        any_allowed = allowed.any(-1)[:, None, :, None]
        uniform = same.double() / w
        weights = torch.where(any_allowed, torch.softmax(scores.masked_fill(~any_allowed, 0.0), -1), uniform)
        expected = attn.out_proj(attn.merge_heads(weights @ v))[:, :n]
        torch.testing.assert_close(attn(x, mask), expected, rtol=0, atol=1e-12)
        assert not any_allowed.all() and any_allowed.any()  # both kinds of rows occur


def test_local_lra_exact_lets_padding_reach_real_outputs():
    attn = _build("local", window_size=5, pattern="lra_exact", qkv_bias=False, out_bias=False)
    x, mask = _batch(1, 23, pad=(8,))
    other = x.clone()
    other[~mask] = 4.0
    with torch.no_grad():
        assert not torch.allclose(attn(x, mask)[mask], attn(other, mask)[mask])


def _lra_sparse_allowed(n, block, c, first_global):
    """LRA's _build_mask: Fixed1 (same block) or Fixed2 (k mod l == 0 or >= l - c), each causal; with a CLS
    token the pattern is built on the N - 1 later tokens and the first row and column are all ones."""
    m = n - 1 if first_global else n
    i, j = torch.arange(m)[:, None], torch.arange(m)[None, :]
    allowed = ((i // block == j // block) | (j % block == 0) | (j % block >= block - c)) & (j <= i)
    if first_global:
        allowed = torch.nn.functional.pad(allowed, (1, 0, 1, 0), value=True)
    return allowed


@pytest.mark.parametrize("first_global", [False, True])
@pytest.mark.parametrize(("n", "block", "c"), [(61, 10, 3), (40, 8, 8), (23, 50, 10)])
def test_sparse_lra_pattern_matches_the_definition(n, block, c, first_global):
    attn = _build("sparse", block_size=block, summary_size=c, causal=True, summary_block_start=True,
                  first_token_global=first_global)
    q, k, v, mask = _qkv(2, n, pad=(n // 4, 0))
    expected = _dense(q, k, v, mask, _lra_sparse_allowed(n, block, c, first_global))
    real = mask[:, None, :].expand(-1, HEADS, -1)
    torch.testing.assert_close(attn.attend(q, k, v, mask)[real], expected[real], rtol=0, atol=1e-10)


def test_linear_without_padding_mask_is_lra():
    attn = _build("linear", mask_padding=False, qkv_bias=False, out_bias=False)
    x, mask = _batch(2, 20, pad=(7,))
    with torch.no_grad():
        q, k, v = _project(attn, x)  # padded values included
        phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        out = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2)[..., None] + 1e-6)
        torch.testing.assert_close(attn(x, mask), attn.out_proj(attn.merge_heads(out)), rtol=0, atol=1e-12)


def test_default_local_sparse_linear_stay_padding_invariant():
    """The fixed (default) variants: changing padded inputs changes no real output."""
    for name, options in (("local", {"window_size": 5}), ("sparse", {"block_size": 8, "summary_size": 2}),
                          ("linear", {})):
        attn = _build(name, **options)
        x, mask = _batch(2, 23, pad=(8, 0))
        other = x.clone()
        other[~mask] = 4.0
        with torch.no_grad():
            torch.testing.assert_close(attn(x, mask)[mask], attn(other, mask)[mask], rtol=0, atol=1e-12)


def test_unknown_pattern_lists_lra_exact():
    with pytest.raises(ValueError, match="lra_exact"):
        attention.build("local", dim=DIM, num_heads=HEADS, pattern="nope")
