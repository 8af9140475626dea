"""Reformer LSH attention: hashing, the one-chunk limit, dense references per round (windows built from the sorted
order, rounds chunked together as trax/HuggingFace) and over the union of windows, LRA's variant against its own
dense reference, padding, odd lengths, randomness, bad options, 16k tokens in sub-quadratic memory."""

from __future__ import annotations

import pytest
import torch

import lra.attention as attention
from lra.attention.reformer import auto_bucket_factors
from tests.memory import LivePeak

DIM, HEADS = 32, 2
DH = DIM // HEADS


def _build(seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    return attention.build("reformer", dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def _mask(n, pad):
    mask = torch.ones(len(pad), n, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, n - p :] = False
    return mask


def _qv(n, pad, seed=1):
    """Shared query/keys and values ``[B, H, n, DH]`` in float64 (values zero at padding, as the module does)."""
    g = torch.Generator().manual_seed(seed)
    mask = _mask(n, pad)
    q = 2 * torch.randn(len(pad), HEADS, n, DH, generator=g, dtype=torch.float64)
    v = torch.randn(len(pad), HEADS, n, DH, generator=g, dtype=torch.float64) * mask[:, None, :, None]
    return q, v, mask


def _unit_keys(q):
    return q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + DH * 1e-6)


def _softmax_over(q, v, allowed):
    """Softmax attention with unit-length keys over ``allowed: [B, H, N, N]``; a row with nothing allowed
    returns the query's own value (the self-exclusion rule: self only when no other key)."""
    scores = (q @ _unit_keys(q).transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    has_other = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_other, 0.0), dim=-1)
    return torch.where(has_other, probs @ v, v)


def _window_counts(buckets, chunk):
    """``[B, H, R, N, N]``: how many times key j sits in query i's window in round r. Built from the sorted
    order as trax and HuggingFace do: each round sorted by (bucket, position), the rounds concatenated, the
    merged slots cut into chunks of ``chunk``, each chunk with the one before it (circularly), so a round's
    first chunk also sees the previous round's last chunk."""
    b, h, r, n = buckets.shape
    counts = torch.zeros(b, h, r, n, n, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            merged = torch.cat([torch.argsort(buckets[bi, hi, ri] * n + torch.arange(n)) for ri in range(r)])
            chunks = merged.view(-1, chunk)
            for x, queries in enumerate(chunks):
                window = chunks[x] if len(chunks) == 1 else torch.cat([chunks[x], chunks[x - 1]])
                for slot, i in enumerate(queries.tolist()):
                    counts[bi, hi, (x * chunk + slot) // n, i].index_add_(0, window, torch.ones_like(window))
    return counts


def _combine_rounds(logits, v, has_other):
    """Per-round softmax over ``logits: [B, H, R, N, N]`` (a query without others keeps its own value), rounds
    combined by their logsumexp."""
    probs = torch.softmax(logits.masked_fill(~has_other[..., None], 0.0), dim=-1)
    per_round = torch.where(has_other[..., None], probs @ v[:, :, None], v[:, :, None])
    lse = torch.logsumexp(logits, -1)  # -inf for a round where only the query itself is available
    rounds = logits.shape[2]
    weights = torch.where(has_other.any(2, keepdim=True), torch.softmax(lse, dim=2), 1.0 / rounds)
    return (weights[..., None] * per_round).sum(2)


def _others(mask, n):
    """``[B, 1, 1, N, N]``: real keys other than the query itself."""
    return mask[:, None, None, None, :] & ~torch.eye(n, dtype=torch.bool)


def test_auto_bucket_count_follows_trax():
    assert auto_bucket_factors(64, 64) == [2]
    assert auto_bucket_factors(56, 8) == [14]
    assert auto_bucket_factors(4096, 64) == [128]
    assert auto_bucket_factors(16384, 64) == [32, 16]  # 512 buckets, factorised


@pytest.mark.parametrize("num_buckets", [6, [4, 6]])
def test_hash_is_argmax_of_random_rotations_and_padding_gets_its_own_bucket(num_buckets):
    attn = _build(num_hashes=3, num_buckets=num_buckets)
    q, _, mask = _qv(40, pad=(9, 0))
    buckets, count = attn.hash_buckets(q, mask)
    factors = [num_buckets] if isinstance(num_buckets, int) else num_buckets
    rotated = torch.einsum("bhnd,hdrk->bhrnk", q, attn.rotations(sum(factors) // 2, q.device).double())
    expected, start, stride = 0, 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        expected = expected + stride * torch.cat([part, -part], -1).argmax(-1)
        start, stride = start + f // 2, stride * f
    real = mask[:, None, None, :].expand_as(buckets)
    assert count == 24 if factors == [4, 6] else count == 6
    assert torch.equal(buckets[real], expected[real])
    assert (buckets[~real] == count).all() and (buckets[real] < count).all()
    assert len(buckets[real].unique()) > 2  # the rotations do spread the tokens


def test_one_chunk_limit_is_softmax_over_the_other_real_keys():
    """Chunk >= N: every round's window is the whole sequence, so LSH attention is exact softmax attention
    with keys = unit-length queries, minus the query itself (kept only when it is the only real token)."""
    attn = _build(dtype=torch.float64, chunk_size=32, num_hashes=2)
    n = 24
    mask = _mask(n, pad=(7, 0, 23))  # the last sample has a single real token
    x = torch.randn(3, n, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        q = attn.split_heads(attn.q_proj(x))
        v = attn.split_heads(attn.v_proj(x) * mask[..., None])
        expected = attn.out_proj(attn.merge_heads(_softmax_over(q, v, _others(mask, n)[:, :, 0])))
        got = attn(x, mask)
        lone_value = attn.out_proj(attn.merge_heads(v))[2, 0]
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2, 0], lone_value, rtol=0, atol=1e-12)


def test_rounds_match_per_round_dense_references_combined_by_logsumexp():
    attn = _build(num_hashes=3, chunk_size=8, num_buckets=6)
    n = 48  # 6 chunks per round
    q, v, mask = _qv(n, pad=(13, 0, 47))  # the last sample: one real token, alone in every window
    buckets, _ = attn.hash_buckets(q, mask)
    counts = _window_counts(buckets, 8)
    allowed = (counts > 0) & _others(mask, n)  # [B, H, R, N, N]
    scores = (q @ _unit_keys(q).transpose(-1, -2))[:, :, None] + counts.double().log()  # a key twice: twice
    logits = scores.masked_fill(~allowed, float("-inf"))
    has_other = allowed.any(-1)  # [B, H, R, N]
    expected = _combine_rounds(logits, v, has_other)
    assert has_other[:2].any(-1).all() and not has_other[2, :, :, 0].any()
    assert (counts[:2] == 2).any()  # some key sits twice in a window (its round and the round before)
    got = attn.attend(q, v, mask)
    real = mask[:, None, :].expand(-1, HEADS, -1)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-12)
    one = _window_counts(buckets[:, :, :1], 8)  # one round: the usual circular windows, each key once
    assert one.max() == 1 and (one.sum(-1) == 16).all()


def test_count_duplicates_gives_softmax_over_the_union_of_windows():
    attn = _build(num_hashes=3, chunk_size=8, num_buckets=6, count_duplicates=True)
    n = 48
    q, v, mask = _qv(n, pad=(13, 0), seed=3)
    buckets, _ = attn.hash_buckets(q, mask)
    union = (_window_counts(buckets, 8) > 0).any(2) & _others(mask, n)[:, :, 0]
    expected = _softmax_over(q, v, union)
    got = attn.attend(q, v, mask)
    real = mask[:, None, :].expand(-1, HEADS, -1)
    assert not union[real].all()  # the windows are a real restriction
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-12)
    plain = _build(num_hashes=3, chunk_size=8, num_buckets=6).attend(q, v, mask)
    assert not torch.allclose(plain[real], expected[real])  # without the correction duplicates count twice


@pytest.mark.parametrize("num_hashes", [1, 2])
def test_lra_variant_matches_its_dense_reference(num_hashes):
    """LRA's reformer_attention.py: inputs zero-padded by 10 - N mod 10, num_hashes * num_buckets chunks of
    N'/num_buckets over the sorted rounds (each with the one before it), keys = queries, scores q.k * sqrt(d),
    no self or padding mask, one rotation shared by the heads, no output projection."""
    attn = _build(dtype=torch.float64, variant="lra", num_hashes=num_hashes, chunk_size=10, num_buckets=10,
                  redraw_hashes="never", dropout=0.0, qkv_bias=False, qkv_dim=16).train()
    assert attn.out_proj is None and attn.head_dim == DIM // HEADS  # LRA ignores qkv_dim here
    n = 40  # divisible by 10: LRA still pads a whole chunk_len, N' = 50, 10 chunks of 5 per round
    mask = _mask(n, pad=(9, 0))
    x = torch.randn(2, n, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 0, 0, 10))
        q, v = attn.split_heads(attn.q_proj(padded)), attn.split_heads(attn.v_proj(padded))
        rotation = attn.rotations(5, q.device, heads=1).double()  # [1, Dh, R, 5]: the same for every head
        rotated = torch.einsum("bhnd,hdrk->bhrnk", q, rotation.expand(HEADS, -1, -1, -1))
        buckets = torch.cat([rotated, -rotated], -1).argmax(-1)
        counts = _window_counts(buckets, 5)
        logits = (q @ q.transpose(-1, -2) * DH**0.5)[:, :, None] + counts.double().log()
        out = _combine_rounds(logits, v, torch.ones(buckets.shape, dtype=torch.bool))
        expected = attn.merge_heads(out)[:, :n]
        torch.testing.assert_close(attn(x, mask), expected, rtol=1e-12, atol=1e-12)
        attn.eval()
        torch.testing.assert_close(attn(x, mask), expected, rtol=1e-12, atol=1e-12)  # fixed hashes
        other = x.clone()
        other[~mask] = 3.0
        assert not torch.allclose(attn(other, mask)[mask], expected[mask])  # no padding mask upstream


@pytest.mark.parametrize(("n", "chunk"), [(50, 8), (37, 64), (64, 5)])
def test_lengths_not_multiple_of_the_chunk_and_padding_invariance(n, chunk):
    attn = _build(chunk_size=chunk)
    mask = _mask(n, pad=(n // 3, 0))
    x = torch.randn(2, n, DIM, generator=torch.Generator().manual_seed(4))
    other = x.clone()
    other[~mask] = 100.0 * torch.randn_like(other[~mask])
    with torch.no_grad():
        y, y_other, alone = attn(x, mask), attn(other, mask), attn(x[1:], mask[1:])
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y[mask], y_other[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], alone[0], rtol=1e-5, atol=1e-5)


def test_hashes_fixed_in_eval_redrawn_in_training_and_restored_from_a_checkpoint():
    n = 64
    mask = _mask(n, pad=(0,))
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(5))
    attn = _build(chunk_size=8)
    with torch.no_grad():
        evaluated = attn(x, mask)
        attn.train()
        first, second = attn(x, mask), attn(x, mask)
        attn.eval()
        torch.testing.assert_close(attn(x, mask), evaluated, rtol=0, atol=0)
        assert not torch.allclose(first, second)  # fresh rotations at every training forward
        fixed = _build(chunk_size=8, redraw_hashes="never").train()
        torch.testing.assert_close(fixed(x, mask), evaluated, rtol=0, atol=0)
        restored = _build(seed=9, chunk_size=8)
        assert not torch.allclose(restored(x, mask), evaluated)
        restored.load_state_dict(attn.state_dict())
        torch.testing.assert_close(restored(x, mask), evaluated, rtol=0, atol=0)


def test_redraw_always_draws_fresh_rotations_in_eval_too_as_huggingface():
    n = 64
    mask = _mask(n, pad=(0,))
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(5))
    attn = _build(chunk_size=8, redraw_hashes="always")
    with torch.no_grad():
        torch.manual_seed(1)
        first = attn(x, mask)
        torch.manual_seed(1)
        torch.testing.assert_close(attn(x, mask), first, rtol=0, atol=0)  # drawn from the global RNG
        assert not torch.allclose(attn(x, mask), first)


def test_weights_load_from_softmax_except_the_key_projection():
    result = _build().load_state_dict(attention.build("softmax", dim=DIM, num_heads=HEADS).state_dict(), strict=False)
    assert result.missing_keys == ["hash_seed"]
    assert sorted(result.unexpected_keys) == ["k_proj.bias", "k_proj.weight"]


@pytest.mark.parametrize("options", [{"num_buckets": 5}, {"num_buckets": [4, 3]}, {"num_buckets": []},
                                     {"num_hashes": 0}, {"chunk_size": 0}, {"redraw_hashes": True},
                                     {"variant": "hf"}, {"variant": "lra", "num_buckets": 10},
                                     {"variant": "lra", "redraw_hashes": "never"}])
def test_bad_options_are_clear_errors(options):
    with pytest.raises(ValueError, match="reformer.yaml"):
        _build(**options)


def test_16k_tokens_no_nan_and_far_below_quadratic_memory():
    n = 16384
    attn = _build()
    mask = _mask(n, pad=(1000,))
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), LivePeak() as tracker:
        y = attn(x, mask)
    assert torch.isfinite(y).all()
    quadratic = HEADS * n * n * 4  # one float32 score matrix per head: 2 GiB
    assert tracker.largest < n * n // 16
    assert tracker.peak < quadratic / 16, f"peak {tracker.peak / 2**20:.1f} MiB"
