"""LRA baselines, batch A: local, sparse (fixed pattern), Longformer, BigBird and Sinkhorn attention.

Each method is checked against a dense masked-softmax reference built here from its pattern's definition
(float64), against ``softmax`` at its exact limit (same weights), for clear option errors, and at 16k tokens
for finiteness and the absence of any ``N x N``-sized allocation.
"""

from __future__ import annotations

import math

import pytest
import torch

import lra.attention as attention
from lra.attention.sinkhorn import sinkhorn
from tests.memory import LivePeak

DIM, HEADS, DH = 32, 2, 16


def _build(name, init_seed=0, dtype=torch.float64, **options):
    torch.manual_seed(init_seed)
    return attention.build(name, dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def _batch(b, n, pad=(0,), seed=1, dtype=torch.float64):
    """``x: [b, n, DIM]`` and a mask padding sample ``i`` by ``pad[i]`` tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, DIM, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, n - p :] = False
    return x, mask


def _qkv(b, n, pad=(0,), seed=2):
    """Random float64 ``q, k, v: [b, H, n, Dh]`` (v zero at padded positions, as the base class gives it)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, HEADS, n, DH, generator=g, dtype=torch.float64) for _ in range(3))
    _, mask = _batch(b, n, pad)
    return q, k, v * mask[:, None, :, None], mask


def _dense(q, k, v, mask, allowed, log_count=None):
    """Softmax of ``q kᵀ / √Dh (+ log_count)`` over the real keys ``allowed`` for each query; ``[..., N, N]``."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if log_count is not None:
        scores = scores + log_count
    scores = scores.masked_fill(~(allowed & mask[:, None, None, :]), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _assert_real_close(actual, expected, mask, atol=1e-10):
    real = mask[:, None, :].expand(-1, HEADS, -1)
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=atol)


def _assert_module_equals_softmax(attn, x, mask, atol=1e-10):
    soft = _build("softmax")
    result = attn.load_state_dict(soft.state_dict(), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask)[mask], soft(x, mask)[mask], rtol=0, atol=atol)


def _long_forward(name, largest_bound, **options):
    """A 16k-token forward (B=1, float32, 1000 padded tokens): finite; no tensor above ``largest_bound``
    elements (itself below an eighth of one ``N x N`` score matrix per head); live memory below four
    float32 tensors of that size plus 32 of the input's size (projections, padded copies)."""
    n = 16384
    attn = _build(name, dtype=torch.float32, **options)
    x, mask = _batch(1, n, pad=(1000,), dtype=torch.float32)
    with torch.no_grad(), LivePeak() as tracker:
        y = attn(x, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert tracker.largest <= largest_bound < HEADS * n * n / 8, f"largest tensor {tracker.largest} elements"
    assert tracker.peak < 4 * (4 * largest_bound + 32 * x.numel()), f"peak {tracker.peak / 2**20:.0f} MiB"


def _positions(n):
    i = torch.arange(n)
    return i[:, None], i[None, :]


# ---------------------------------------------------------------- local


@pytest.mark.parametrize(("pattern", "window"), [("blocks", 64), ("blocks", 41), ("sliding", 80)])
def test_local_window_covering_the_sequence_is_softmax(pattern, window):
    x, mask = _batch(3, 40, pad=(13, 0, 39))
    _assert_module_equals_softmax(_build("local", window_size=window, pattern=pattern, init_seed=3), x, mask)


def _local_allowed(pattern, n, w):
    i, j = _positions(n)
    if pattern == "blocks":
        return i // w == j // w
    if pattern == "sliding":
        return (j - i >= -(w - w // 2 - 1)) & (j - i <= w // 2)
    groups = n // w + 1  # LRA: pad to w (n // w + 1), reshape row-major to [w, groups], attend down the columns
    grid = torch.arange(w * groups).view(w, groups)  # grid[r, c] = the position stored at row r, column c
    column = torch.empty(w * groups, dtype=torch.long)
    column[grid] = torch.arange(groups).expand(w, groups)
    return column[:n, None] == column[None, :n]


@pytest.mark.parametrize("pattern", ["blocks", "sliding", "lra_strided"])
@pytest.mark.parametrize(("n", "window"), [(64, 16), (50, 8), (37, 5), (20, 6), (7, 3)])
def test_local_matches_dense_reference(pattern, n, window):
    attn = _build("local", window_size=window, pattern=pattern)
    q, k, v, mask = _qkv(2, n, pad=(n // 3,))
    expected = _dense(q, k, v, mask, _local_allowed(pattern, n, window))
    _assert_real_close(attn.attend(q, k, v, mask), expected, mask)


def test_local_strided_groups_are_not_blocks():
    allowed = _local_allowed("lra_strided", 20, 5)  # groups of 5 tokens, 5 apart (20 -> padded to 25)
    assert allowed[0].nonzero().flatten().tolist() == [0, 5, 10, 15]


@pytest.mark.parametrize(("options", "match"), [({"window_size": 0}, "window_size"),
                                                 ({"pattern": "dilated"}, "pattern must be one of")])
def test_local_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        attention.build("local", dim=DIM, num_heads=HEADS, **options)


@pytest.mark.parametrize("pattern", ["blocks", "sliding"])
def test_local_16k_tokens(pattern):
    w = 50
    span = w if pattern == "blocks" else 64 + w - 1  # keys per query: the block, or the chunk's window
    _long_forward("local", HEADS * 16400 * span, window_size=w, pattern=pattern)


# ---------------------------------------------------------------- sparse (fixed pattern)


def _sparse_allowed(n, block, c, causal):
    i, j = _positions(n)
    allowed = (i // block == j // block) | (j % block >= block - c)
    return allowed & (j <= i) if causal else allowed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "block", "c"), [(64, 16, 4), (50, 16, 4), (37, 8, 3), (20, 8, 8), (9, 16, 2)])
def test_sparse_matches_dense_reference(n, block, c, causal):
    attn = _build("sparse", block_size=block, summary_size=c, causal=causal)
    q, k, v, mask = _qkv(2, n, pad=(n // 4,))
    expected = _dense(q, k, v, mask, _sparse_allowed(n, block, c, causal))
    _assert_real_close(attn.attend(q, k, v, mask), expected, mask)


@pytest.mark.parametrize(("block", "c"), [(64, 1), (8, 8)])  # one block holding everything; every key a summary
def test_sparse_exact_limits_are_softmax(block, c):
    x, mask = _batch(3, 40, pad=(13, 0, 39))
    _assert_module_equals_softmax(_build("sparse", block_size=block, summary_size=c, init_seed=3), x, mask)


def test_sparse_causal_ignores_later_tokens():
    attn = _build("sparse", block_size=8, summary_size=2, causal=True)
    x, mask = _batch(1, 40)
    later = x.clone()
    later[:, 25:] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask)[:, :25], attn(later, mask)[:, :25], rtol=0, atol=1e-12)
        assert not torch.allclose(attn(x, mask)[:, 25:], attn(later, mask)[:, 25:])


def test_sparse_summary_larger_than_block_is_an_error():
    with pytest.raises(ValueError, match="summary_size=9 exceeds block_size=8"):
        attention.build("sparse", dim=DIM, num_heads=HEADS, block_size=8, summary_size=9)


def test_sparse_16k_tokens():
    n, block, c = 16400, 128, 8  # 16384 rounded up to whole blocks
    _long_forward("sparse", HEADS * n * (block + c * n // block), block_size=block, summary_size=c)


# ---------------------------------------------------------------- longformer


def _longformer_allowed(n, w, g):
    i, j = _positions(n)
    band = (j - i >= -(w - w // 2 - 1)) & (j - i <= w // 2)
    return band | (j < g) | (i < g)


@pytest.mark.parametrize(("n", "w", "g"), [(64, 16, 1), (50, 8, 2), (37, 7, 0), (45, 10, 3), (12, 4, 20)])
def test_longformer_matches_dense_reference(n, w, g):
    attn = _build("longformer", window_size=w, num_global=g, global_projections=False)
    q, k, v, mask = _qkv(2, n, pad=(n // 3,))
    expected = _dense(q, k, v, mask, _longformer_allowed(n, w, g))
    _assert_real_close(attn.attend(q, k, v, mask), expected, mask)


def test_longformer_global_rows_use_their_own_projections():
    attn = _build("longformer", window_size=6, num_global=2)
    x, mask = _batch(2, 30, pad=(9,))
    split = attn.split_heads
    keep = mask[:, None, :, None].to(x.dtype)
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x)) * keep
    q_g, k_g, v_g = split(attn.q_global_proj(x)), split(attn.k_global_proj(x)), split(attn.v_global_proj(x)) * keep
    local = _dense(q, k, v, mask, _longformer_allowed(30, 6, 2))
    every = torch.ones(30, 30, dtype=torch.bool)
    global_rows = _dense(q_g, k_g, v_g, mask, every)
    expected = attn.out_proj(attn.merge_heads(torch.cat([global_rows[:, :, :2], local[:, :, 2:]], dim=2)))
    with torch.no_grad():
        actual = attn(x, mask)
        torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=1e-10)
        shared = attn.out_proj(attn.merge_heads(attn.attend(q, k, v, mask)))
    assert not torch.allclose(actual[:, :2], shared[:, :2])  # the global projections do change the global rows
    torch.testing.assert_close(actual[:, 2:][mask[:, 2:]], shared[:, 2:][mask[:, 2:]], rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_global", [0, 2])
def test_longformer_with_global_projections_computes_its_core_in_fp32_when_asked(num_global):
    """``fp32_core`` (the encoder's ``attention_fp32``, the ``nystrom`` protocol): the window and global rows are
    computed in float32 from bfloat16 projections (and in bfloat16 without it); the output is cast back."""
    attn = _build("longformer", dtype=torch.bfloat16, window_size=6, num_global=num_global)
    seen = []
    for name in ("attend", "global_rows"):
        method = getattr(attn, name)
        setattr(attn, name, lambda q, *rest, _m=method: seen.append(q.dtype) or _m(q, *rest))
    x, mask = _batch(2, 30, pad=(9,), dtype=torch.bfloat16)
    with torch.no_grad():
        attn.fp32_core = True
        out = attn(x, mask)
        assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32} and len(seen) == 1 + 2 * bool(num_global)
        seen.clear()
        attn.fp32_core = False
        attn(x, mask)
        assert set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("global_projections", [False, True])
def test_longformer_window_covering_the_sequence_is_softmax(global_projections):
    attn = _build("longformer", window_size=80, num_global=2, global_projections=global_projections, init_seed=3)
    if global_projections:  # the global projections get the same weights as the ordinary ones
        for name in ("q", "k", "v"):
            weights = _build("softmax").get_submodule(f"{name}_proj").state_dict()
            attn.get_submodule(f"{name}_global_proj").load_state_dict(weights)
    x, mask = _batch(3, 40, pad=(13, 0, 39))
    _assert_module_equals_softmax(attn, x, mask)


def test_longformer_bad_options():
    with pytest.raises(ValueError, match="num_global must be an integer >= 0"):
        attention.build("longformer", dim=DIM, num_heads=HEADS, num_global=-1)


def test_longformer_16k_tokens():
    w = 512
    _long_forward("longformer", HEADS * 16384 * (64 + w - 1), window_size=w, num_global=1)  # chunk window


# ---------------------------------------------------------------- bigbird


def _bigbird_allowed(attn, n):
    """``[H, N, N]`` from the module's block layout: global query blocks see every key."""
    bs = attn.block_size
    nb = math.ceil(n / bs)
    index, valid = attn.block_layout(nb)
    blocks = torch.zeros(HEADS, nb, nb, dtype=torch.bool)
    for h in range(HEADS):
        for i in range(nb):
            blocks[h, i, index[h, i][valid[h, i]]] = True
    blocks[:, attn.global_blocks(nb)] = True
    block_of = torch.arange(n) // bs
    return blocks[:, block_of][:, :, block_of]


@pytest.mark.parametrize(("nb", "global_blocks", "expected_global"),
                         [(13, 2, [0, 12]), (10, 1, [0]), (8, 0, []), (8, 3, [0, 1, 7]), (5, 2, [0, 4])])
def test_bigbird_layout_follows_the_definition(nb, global_blocks, expected_global):
    """Every query block's key blocks: its window (i-1, i, i+1, cut at the edges), the global blocks (the first
    ceil(g/2) and the last floor(g/2)) and 3 random others (as many as remain), each once; heads draw apart."""
    attn = _build("bigbird", block_size=8, num_global_blocks=global_blocks)
    index, valid = attn.block_layout(nb)
    assert attn.global_blocks(nb) == expected_global
    for h in range(HEADS):
        for i in range(nb):
            row = index[h, i][valid[h, i]].tolist()
            assert len(row) == len(set(row)), "a key block is listed twice"
            fixed = {j for j in (i - 1, i, i + 1) if 0 <= j < nb} | set(expected_global)
            assert fixed <= set(row)
            drawn = set(row) - fixed
            assert len(drawn) == min(3, nb - len(fixed)) and all(0 <= j < nb for j in drawn)
    if nb > 5:
        assert not torch.equal(index[0], index[1]), "each head draws its own random blocks"


def test_bigbird_random_blocks_are_fixed_by_the_seed():
    first, again, other = (_build("bigbird", init_seed=s, block_size=8, **opt) for s, opt in
                           [(0, {}), (5, {}), (0, {"seed": 1})])
    assert torch.equal(first.block_layout(20)[0], again.block_layout(20)[0])  # module init seed is irrelevant
    assert not torch.equal(first.block_layout(20)[0], other.block_layout(20)[0])
    first.train()
    x, mask = _batch(2, 150, pad=(40,))
    with torch.no_grad():
        torch.testing.assert_close(first(x, mask), first(x, mask), rtol=0, atol=0)  # no redraw in training


@pytest.mark.parametrize(("n", "block", "global_blocks"), [(100, 8, 2), (160, 16, 2), (77, 8, 1), (64, 8, 0)])
def test_bigbird_matches_dense_reference(n, block, global_blocks):
    attn = _build("bigbird", block_size=block, num_global_blocks=global_blocks)
    q, k, v, mask = _qkv(2, n, pad=(n // 3,))
    expected = _dense(q, k, v, mask, _bigbird_allowed(attn, n)[None])
    _assert_real_close(attn.attend(q, k, v, mask), expected, mask)


@pytest.mark.parametrize(("n", "block"), [(40, 64), (24, 8), (56, 8)])  # 1, 3 and 7 blocks (block 1: 4 + 3 random)
def test_bigbird_covering_every_block_is_softmax(n, block):
    x, mask = _batch(3, n, pad=(n // 3, 0, n - 1))
    _assert_module_equals_softmax(_build("bigbird", block_size=block, init_seed=3), x, mask)


def test_bigbird_bad_options():
    with pytest.raises(ValueError, match="num_random_blocks must be an integer >= 0"):
        attention.build("bigbird", dim=DIM, num_heads=HEADS, num_random_blocks=-2)


def test_bigbird_16k_tokens():
    bs = 64  # sparse rows: (3 + 2 + 3) blocks of keys per query; global rows: 2 blocks of queries x N keys
    _long_forward("bigbird", HEADS * 16384 * 8 * bs, block_size=bs)


# ---------------------------------------------------------------- sinkhorn


def test_sinkhorn_operator_is_alternating_normalisation():
    g = torch.Generator().manual_seed(0)
    log_alpha = 2 * torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    p = log_alpha.exp()
    for _ in range(4):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    torch.testing.assert_close(sinkhorn(log_alpha, 4), p, rtol=1e-12, atol=0)
    converged = sinkhorn(log_alpha, 500)
    ones = torch.ones(3, 6, dtype=torch.float64)
    torch.testing.assert_close(converged.sum(-1), ones, rtol=0, atol=1e-9)
    torch.testing.assert_close(converged.sum(-2), ones, rtol=0, atol=1e-12)


def test_sinkhorn_at_low_temperature_is_the_best_permutation():
    perm = torch.tensor([2, 0, 3, 1])
    scores = torch.full((4, 4), 0.2, dtype=torch.float64)
    scores[torch.arange(4), perm] = 1.0
    scores[0, 0] = 0.9  # a greedy row-wise choice would differ; the assignment does not
    hard = sinkhorn(scores / 0.002, 50)
    torch.testing.assert_close(hard, torch.eye(4, dtype=torch.float64)[perm], rtol=0, atol=1e-6)


def _sinkhorn_reference(q, k, v, mask, bs, perm, combine):
    """Dense reference when the sorting matrix is the hard permutation ``block i <- block perm[i]``."""
    n = q.shape[-2]
    i, j = _positions(n)
    own = i // bs == j // bs
    sorted_ = perm[i // bs] == j // bs  # slot t of the sorted block of block b is token t of block perm[b]
    if combine == "sum":  # a sorted block without any real token contributes nothing
        return _dense(q, k, v, mask, own) + _dense(q, k, v, mask, sorted_).nan_to_num(nan=0.0)
    count = own.double() + sorted_.double()  # one softmax over both: a key in both sets counts twice
    return _dense(q, k, v, mask, count > 0, log_count=count.clamp_min(1).log())


@pytest.mark.parametrize("combine", ["sum", "joint"])
@pytest.mark.parametrize("perm", [[0, 1, 2, 3, 4], [3, 0, 4, 1, 2], [4, 4, 0, 1, 1]])
def test_sinkhorn_with_a_hard_permutation_matches_dense_reference(combine, perm):
    bs, n = 8, 37  # 5 blocks, the last one partial; sample 0 padded from 25 on (blocks 3 and 4 mostly padding)
    attn = _build("sinkhorn", block_size=bs, combine=combine)
    perm = torch.tensor(perm)
    hard = torch.eye(5, dtype=torch.float64)[perm]
    attn.sorting_matrix = lambda k_blocks: hard.expand(*k_blocks.shape[:2], 5, 5)
    q, k, v, mask = _qkv(2, n, pad=(12,))
    expected = _sinkhorn_reference(q, k, v, mask, bs, perm, combine)
    _assert_real_close(attn.attend(q, k, v, mask), expected, mask)


def _sinkhorn_soft_reference(attn, q, k, v, mask, combine):
    """The module's definition with its own (soft) sorting matrix, block by block with explicit sums."""
    b, h, n, d = q.shape
    bs = attn.block_size
    nb = math.ceil(n / bs)
    pad = nb * bs - n
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)).view(b, h, nb, bs, d) for t in (q, k, v))
    m = torch.nn.functional.pad(mask, (0, pad)).view(b, nb, bs)
    k = k * m[:, None, :, :, None]
    s = attn.sorting_matrix(k)  # [b, h, nb, nb]
    blocks = []
    for i in range(nb):
        k_hat = sum(s[:, :, i, j, None, None] * k[:, :, j] for j in range(nb))
        v_hat = sum(s[:, :, i, j, None, None] * v[:, :, j] for j in range(nb))
        share = sum(s[:, :, i, j, None] * m[:, None, j] for j in range(nb)) / s[:, :, i].sum(-1, keepdim=True)
        local = (q[:, :, i] @ k[:, :, i].transpose(-1, -2) / math.sqrt(d)).masked_fill(~m[:, None, None, i], -math.inf)
        sorted_ = (q[:, :, i] @ k_hat.transpose(-1, -2) / math.sqrt(d) + share.log()[:, :, None, :])
        if combine == "sum":
            blocks.append(torch.softmax(local, -1) @ v[:, :, i] + torch.softmax(sorted_, -1) @ v_hat)
        else:
            p = torch.softmax(torch.cat([local, sorted_], -1), -1)
            blocks.append(p[..., :bs] @ v[:, :, i] + p[..., bs:] @ v_hat)
    return torch.stack(blocks, 2).reshape(b, h, nb * bs, d)[:, :, :n]


@pytest.mark.parametrize("combine", ["sum", "joint"])
@pytest.mark.parametrize("pad", [(0, 0), (12, 0)])  # no padding (every real share is 1); sample 0 padded
def test_sinkhorn_with_its_soft_sorting_matches_the_definition(combine, pad):
    attn = _build("sinkhorn", block_size=8, combine=combine, sinkhorn_iterations=3)
    q, k, v, mask = _qkv(2, 37, pad=pad)
    with torch.no_grad():
        _assert_real_close(attn.attend(q, k, v, mask), _sinkhorn_soft_reference(attn, q, k, v, mask, combine), mask)


@pytest.mark.parametrize(("combine", "scale"), [("joint", 1.0), ("sum", 2.0)])
def test_sinkhorn_single_block_limit(combine, scale):
    attn, soft = _build("sinkhorn", block_size=64, combine=combine), _build("softmax")
    q, k, v, mask = _qkv(3, 40, pad=(13, 0, 39))
    _assert_real_close(attn.attend(q, k, v, mask), scale * soft.attend(q, k, v, mask), mask)


def test_sinkhorn_sorting_matrix_is_column_stochastic_and_deterministic_in_eval():
    attn = _build("sinkhorn", block_size=8)
    x, mask = _batch(2, 64, pad=(20,))
    with torch.no_grad():
        k = attn.split_heads(attn.k_proj(x)) * mask[:, None, :, None]
        s = attn.sorting_matrix(k.view(2, HEADS, 8, 8, DH))
        torch.testing.assert_close(s.sum(-2), torch.ones(2, HEADS, 8, dtype=s.dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(attn(x, mask), attn(x, mask), rtol=0, atol=0)


def test_sinkhorn_gumbel_noise_only_in_training():
    x, mask = _batch(2, 60, pad=(20,))
    noisy = _build("sinkhorn", block_size=8).train()
    quiet = _build("sinkhorn", block_size=8, gumbel_noise=False).train()
    with torch.no_grad():
        assert not torch.allclose(noisy(x, mask), noisy(x, mask))
        torch.testing.assert_close(quiet(x, mask), quiet.eval()(x, mask), rtol=0, atol=0)


def test_sinkhorn_rejects_sequences_longer_than_seq_len():
    attn = _build("sinkhorn", seq_len=100, block_size=10)
    x, mask = _batch(1, 101)
    with pytest.raises(ValueError, match=r"101 tokens but was built for seq_len=100.*model.options.seq_len"):
        attn(x, mask)


@pytest.mark.parametrize(("options", "match"), [({"combine": "concat"}, "combine must be one of"),
                                                 ({"temperature": 0.0}, "temperature must be > 0"),
                                                 ({"block_size": -1}, "block_size")])
def test_sinkhorn_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        attention.build("sinkhorn", dim=DIM, num_heads=HEADS, **options)


def test_sinkhorn_16k_tokens():
    bs, n = 64, 16384  # own + sorted block per query; the sorting matrix is (N / bs)^2
    _long_forward("sinkhorn", HEADS * n * bs, seq_len=n, block_size=bs)
