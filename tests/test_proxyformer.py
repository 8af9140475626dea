"""Proxyformer: Nyström formula on given proxies, contrastive term, caching, dropout, long sequences."""

from __future__ import annotations

import pytest
import torch

import lra.attention as attention

DIM, HEADS = 32, 2
DH = DIM // HEADS


def _build(seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    return attention.build("proxyformer", dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def _batch(b=2, n=48, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, DIM, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - n // 3 :] = False
    return x, mask


def _nystrom_factors(attn, x, mask, q_landmarks, k_landmarks):
    """``K1, K2, K3, V`` of the Nyström formula written out; landmarks ``[H, m, Dh]``."""
    q, k = attn.split_heads(attn.q_proj(x)), attn.split_heads(attn.k_proj(x))
    v = attn.split_heads(attn.v_proj(x) * mask[..., None])
    s = DH**-0.5
    k1 = torch.softmax(q @ k_landmarks.transpose(-1, -2) * s, -1)
    k2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2) * s, -1)
    scores = (q_landmarks @ k.transpose(-1, -2) * s).masked_fill(~mask[:, None, None, :], -torch.inf)
    return k1, k2, torch.softmax(scores, -1), v


def _nystrom_reference(attn, x, mask, q_landmarks, k_landmarks):
    """``K1 · pinv(K2) · K3 · V`` with ``torch.linalg.pinv``."""
    k1, k2, k3, v = _nystrom_factors(attn, x, mask, q_landmarks, k_landmarks)
    return attn.out_proj(attn.merge_heads(k1 @ torch.linalg.pinv(k2) @ k3 @ v))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_given_proxies_give_the_nystrom_formula(shared, training):
    attn = _build(num_proxies=8, shared_proxies=shared, injection=False, landmark_dropout=0.0, conv_kernel=0,
                  pinv_iterations=50, dtype=torch.float64).train(training)
    g = torch.Generator().manual_seed(7)
    landmarks = torch.randn(1 if shared else 2, HEADS, 8, DH, generator=g, dtype=torch.float64)
    with torch.no_grad():
        attn.proxies.copy_(landmarks)
    x, mask = _batch(dtype=torch.float64)
    with torch.set_grad_enabled(training):
        expected = _nystrom_reference(attn, x, mask, landmarks[0], landmarks[-1])
        torch.testing.assert_close(attn(x, mask)[mask], expected[mask], rtol=0, atol=1e-6)


def _contrastive(attn, x, mask):
    attn.train()(x, mask)
    return attn.aux_losses["proxy_contrastive"]


@pytest.mark.parametrize("injection", [False, True])
def test_contrastive_term_finite_positive_and_spreads_proxies(injection):
    attn = _build(num_proxies=16, injection=injection, contrastive_weight=1.0)
    x, mask = _batch()
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(1, HEADS, 16, DH, generator=g)
    clustered = torch.randn(1, HEADS, 1, DH, generator=g) * 4 + spread
    losses = []
    for proxies in (clustered, spread):
        with torch.no_grad():
            attn.proxies.copy_(proxies)
        losses.append(_contrastive(attn, x, mask))
    assert all(torch.isfinite(v) and v > 0 for v in losses)
    assert losses[1] < losses[0]
    attn.zero_grad()
    losses[1].backward()
    assert attn.proxies.grad is not None and attn.proxies.grad.abs().sum() > 0


def test_contrastive_weight_scales_the_term_and_zero_disables_it():
    x, mask = _batch()
    one = _contrastive(_build(contrastive_weight=1.0), x, mask)
    torch.testing.assert_close(_contrastive(_build(contrastive_weight=0.25), x, mask), 0.25 * one)
    attn = _build(contrastive_weight=0.0).train()
    attn(x, mask)
    assert attn.aux_losses == {}


@pytest.mark.parametrize("injection", [False, True])
def test_eval_has_no_aux_loss_and_is_deterministic(injection):
    attn = _build(injection=injection)
    x, mask = _batch()
    attn.train()(x, mask)
    assert set(attn.aux_losses) == {"proxy_contrastive"}
    attn.eval()
    with torch.no_grad():
        a, b = attn(x, mask), attn(x, mask)
    assert attn.aux_losses == {}
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_proxy_pinv_is_cached_in_eval_until_the_proxies_change():
    attn = _build(injection=False, landmark_dropout=0.0)
    x, mask = _batch(b=3)
    with torch.no_grad():
        first = attn(x, mask)
        cached = attn._pinv_cache[1]
        assert cached.shape == (1, HEADS, 128, 128)  # once for the whole batch
        attn(x, mask)
        assert attn._pinv_cache[1] is cached
        attn.proxies.mul_(1.5)  # an in-place update (as an optimizer step) bumps the version
        changed = attn(x, mask)
    assert attn._pinv_cache[1] is not cached
    fresh = attn.train()(x, mask)  # train mode never caches; no dropout, so the same function
    torch.testing.assert_close(changed, fresh, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(first, changed)


def test_k2_dropout_zeroes_rows_of_z_and_inverts_the_kept_columns():
    """Dropping columns of K2 before the pseudo-inverse: Z's rows of the dropped landmarks are exactly zero, the
    others are the pseudo-inverse of K2's kept columns."""
    from lra.attention.nystromformer import landmark_pinv

    g = torch.Generator().manual_seed(3)
    landmarks = torch.randn(HEADS, 8, DH, generator=g, dtype=torch.float64)
    keep = torch.rand(2, HEADS, 1, 8, generator=g) >= 0.5
    z = landmark_pinv(landmarks, landmarks, 60, "per_matrix", column_keep=keep)
    k2 = torch.softmax(landmarks @ landmarks.transpose(-1, -2) * DH**-0.5, -1)
    assert z.shape == (2, HEADS, 8, 8)
    for b in range(2):
        for h in range(HEADS):
            kept = keep[b, h, 0]
            assert z[b, h][~kept].abs().max() == 0
            torch.testing.assert_close(z[b, h][kept], torch.linalg.pinv(k2[h][:, kept]), rtol=0, atol=1e-8)


@pytest.mark.parametrize("injection", [False, True])
def test_k2_dropout_of_every_column_keeps_them_all(injection):
    """A sample and head whose every column is drawn for dropping keeps them all: p = 1 is no dropout."""
    x, mask = _batch()
    plain = _build(injection=injection, landmark_dropout=0.0).train()(x, mask)
    torch.testing.assert_close(_build(injection=injection, landmark_dropout=1.0).train()(x, mask), plain,
                               rtol=0, atol=0)


def test_k2_dropout_output_is_the_nystrom_formula_without_the_dropped_landmarks():
    """In training, ``out = K1[:, kept] · pinv(K2[:, kept]) · K3 · V`` per sample and head, the kept columns drawn
    from torch's RNG."""
    attn = _build(num_proxies=8, injection=False, landmark_dropout=0.5, conv_kernel=0, pinv_iterations=60,
                  dtype=torch.float64).train()
    x, mask = _batch(dtype=torch.float64)
    torch.manual_seed(11)
    out = attn(x, mask)
    torch.manual_seed(11)
    keep = torch.rand(2, HEADS, 1, 8) >= 0.5
    p = attn.proxies[0].detach()
    k1, k2, k3, v = _nystrom_factors(attn, x, mask, p, p)
    heads = torch.zeros_like(v)
    for b in range(2):
        for h in range(HEADS):
            kept = keep[b, h, 0]
            assert 0 < kept.sum() < 8  # the draw drops some columns and keeps some
            heads[b, h] = k1[b, h][:, kept] @ torch.linalg.pinv(k2[h][:, kept]) @ k3[b, h] @ v[b, h]
    expected = attn.out_proj(attn.merge_heads(heads))
    torch.testing.assert_close(out[mask], expected[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["k2", "pinv"])
def test_landmark_dropout_is_random_in_training_only(target):
    attn = _build(landmark_dropout=0.5, landmark_dropout_on=target).train()
    x, mask = _batch()
    assert not torch.allclose(attn(x, mask), attn(x, mask))
    attn.eval()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), attn(x, mask), rtol=0, atol=0)


OTHER_OPTIONS = {"separate": {"shared_proxies": False},
                 "global": {"injection": False, "init_scaling": "global"}}


@pytest.mark.parametrize("options", OTHER_OPTIONS.values(), ids=OTHER_OPTIONS.keys())
def test_padding_does_not_leak_with_other_options(options):
    attn = _build(**options)
    x, mask = _batch()
    other = x.clone()
    other[~mask] = 100.0 * torch.randn_like(other[~mask])
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask)[mask], attn(other, mask)[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16k_tokens_no_nan(dtype):
    attn = _build(dtype=dtype)
    x, mask = _batch(b=1, n=16384, dtype=dtype)
    with torch.no_grad():
        y = attn(x, mask)
        attn.train()(x, mask)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.isfinite(attn.aux_losses["proxy_contrastive"])


def test_unknown_dropout_target_is_an_error():
    with pytest.raises(ValueError, match="landmark_dropout_on"):
        _build(landmark_dropout_on="rows")
