"""Specifications every registered attention must meet (parametrised over ``available()``)."""

from __future__ import annotations

import pytest
import torch

import lra.attention as attention

DIM, HEADS = 32, 2


def _build(name: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return attention.build(name, dim=DIM, num_heads=HEADS, **options).eval()


def _batch(b=2, n=64, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, DIM, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - n // 4 :] = False  # first sequence padded at the end
    return x, mask


@pytest.mark.parametrize("name", attention.available())
def test_padding_does_not_leak(name):
    """Changing what sits at padded positions leaves every real position's output unchanged."""
    attn = _build(name)
    x, mask = _batch()
    other = x.clone()
    other[~mask] = 100.0 * torch.randn_like(other[~mask])
    with torch.no_grad():
        a, b = attn(x, mask), attn(other, mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", attention.available())
def test_shape_batch_independence_and_eval_determinism(name):
    attn = _build(name)
    x, mask = _batch(b=3)
    with torch.no_grad():
        y = attn(x, mask)
        again = attn(x, mask)
        single = attn(x[1:2], mask[1:2])
    assert y.shape == x.shape
    torch.testing.assert_close(y, again, rtol=0, atol=0)
    torch.testing.assert_close(single[0], y[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", attention.available())
def test_every_parameter_gets_a_gradient(name):
    attn = _build(name).train()
    x, mask = _batch()
    out = attn(x, mask)
    loss = out[mask].pow(2).mean() + sum(attn.aux_losses.values(), torch.zeros(()))
    loss.backward()
    missing = [n for n, p in attn.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"{name}: parameters without gradient: {missing}"


def test_sdpa_matches_softmax_float32():
    soft, fused = _build("softmax"), _build("sdpa", seed=5)
    fused.load_state_dict(soft.state_dict())
    x, mask = _batch(n=96)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, mask), soft(x, mask), rtol=1e-5, atol=1e-5)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="Valid names: .*softmax"):
        attention.build("no-such-attention", dim=DIM, num_heads=HEADS)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unknown option.*'dropout'"):
        attention.build("softmax", dim=DIM, num_heads=HEADS, drop_out=0.1)


def test_sdpa_passes_no_mask_without_padding_and_records_its_kernel(monkeypatch):
    """An unpadded batch reaches the fused kernels with no mask (FlashAttention needs none); the kernel PyTorch picked
    is recorded; a padded batch still masks its padded keys."""
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
        seen.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    attn = attention.build("sdpa", dim=16, num_heads=2).eval()
    x = torch.randn(2, 10, 16)
    full, padded = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 10, dtype=torch.bool)
    padded[0, 6:] = False
    attn(x, full)
    out = attn(x, padded)
    assert seen[0] is None and seen[1] is not None
    assert attn.backends_used and attn.backends_used <= {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                                                         "MATH", "unknown"}
    reference = attention.build("softmax", dim=16, num_heads=2).eval()
    reference.load_state_dict(attn.state_dict())
    torch.testing.assert_close(out[padded], reference(x, padded)[padded], rtol=1e-5, atol=1e-6)


def test_sdpa_reports_the_kernel_autocast_really_calls():
    """Under autocast ``v`` reaches ``attend`` in float32 (padding is zeroed with a float32 mask) beside bfloat16
    ``q`` and ``k``; SDPA casts all three to bfloat16 before choosing its kernel, and so must the report (asked with
    mixed dtypes, PyTorch answers MATH)."""
    from lra.attention.sdpa import sdpa_backend

    attn = attention.build("sdpa", dim=64, num_heads=2).eval()
    x, mask = torch.randn(1, 64, 64), torch.ones(1, 64, dtype=torch.bool)
    seen = []
    attend = attn.attend
    attn.attend = lambda q, k, v, mask: seen.append((q.dtype, v.dtype)) or attend(q, k, v, mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, mask)
    assert seen == [(torch.bfloat16, torch.float32)]
    q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)
    if sdpa_backend(q, q, q, None, 0.0) == "MATH":
        pytest.skip("this PyTorch answers MATH for bfloat16 too: the report's cast cannot be told apart here")
    assert attn.backends_used == {sdpa_backend(q, q, q, None, 0.0)}
    assert sdpa_backend(q, q, q.float(), None, 0.0) == "MATH"  # the mixed-dtype answer the report must not give
