"""Performer (FAVOR+): the random features, convergence to softmax, redrawing, padding, 16k tokens; the
Nyströmformer harness's variant and LRA's two variants against float64 references of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lra.attention as attention
from lra.attention.performer import gaussian_orthogonal_features, positive_random_features
from tests.memory import tracked_long_forward

DIM, HEADS = 32, 2
HEAD_DIM = DIM // HEADS


def _build(seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    return attention.build("performer", dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def test_orthogonal_features_blocks_and_norms():
    torch.manual_seed(0)
    w = gaussian_orthogonal_features(40, HEAD_DIM)  # 2 full blocks of 16 rows and 8 rows of a third
    assert w.shape == (40, HEAD_DIM)
    directions = F.normalize(w, dim=-1)
    for start in (0, 16, 32):
        block = directions[start : start + 16]
        torch.testing.assert_close(block @ block.T, torch.eye(len(block)), rtol=0, atol=1e-5)
    assert (directions[:16] @ directions[16:32].T).abs().max() > 0.1  # blocks are independent
    norms = w.norm(dim=-1)
    assert norms.std() > 0.1 and 2.5 < norms.mean() < 5.5  # chi(16) lengths, mean ~3.9, not all sqrt(16)


def test_iid_features_are_not_orthogonal():
    torch.manual_seed(0)
    directions = F.normalize(gaussian_orthogonal_features(16, HEAD_DIM, orthogonal=False), dim=-1)
    off_diagonal = directions @ directions.T - torch.eye(16)
    assert off_diagonal.abs().max() > 0.2


def _exact(q, k, v, mask, scale):
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask[:, None, None, :], -torch.inf)
    return torch.softmax(scores, -1) @ v


def test_estimate_converges_to_softmax_as_features_grow():
    """On fixed seeds the error falls like 1/sqrt(m), and the limit is exp(q.k/sqrt(d)), not exp(q.k/d)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 48, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = 0.3 * q, 0.3 * k  # |q^ + k^|^2 ~ 1: moderate variance of the positive features
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, 36:] = False
    v = v * mask[:, None, :, None]
    real = mask[:, None, :].expand(-1, HEADS, -1)
    exact = _exact(q, k, v, mask, HEAD_DIM**-0.5)[real]
    errors = []
    for m in (16, 256, 4096):
        out = _build(dtype=torch.float64, num_features=m).attend(q, k, v, mask)[real]
        errors.append((out - exact).pow(2).mean().sqrt().item())
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors
    assert errors[2] < 3e-3, errors
    scaled_twice = _exact(q, k, v, mask, 1.0 / HEAD_DIM)[real]
    assert (scaled_twice - exact).pow(2).mean().sqrt() > 3 * errors[2]  # the test tells the two apart


def test_redraw_every_training_forward_and_never_in_eval():
    attn = _build(redraw=1)
    x, mask = torch.randn(2, 16, DIM), torch.ones(2, 16, dtype=torch.bool)
    drawn = attn.features.clone()
    with torch.no_grad():
        attn(x, mask), attn(x, mask)  # eval
    assert torch.equal(attn.features, drawn)
    attn.train()
    with torch.no_grad():
        attn(x, mask)  # the first training forward uses the construction draw
        assert torch.equal(attn.features, drawn)
        attn(x, mask)
        assert not torch.allclose(attn.features, drawn)


@pytest.mark.parametrize(("redraw", "changes_at"), [(0, None), (3, 3)])
def test_redraw_interval(redraw, changes_at):
    attn = _build(redraw=redraw).train()
    x, mask = torch.randn(1, 8, DIM), torch.ones(1, 8, dtype=torch.bool)
    history = []
    with torch.no_grad():
        for _ in range(5):
            attn(x, mask)
            history.append(attn.features.clone())
    changed = [i for i in range(1, 5) if not torch.equal(history[i], history[i - 1])]
    assert changed == ([] if changes_at is None else [changes_at])


def test_features_are_saved_with_the_model():
    attn, other = _build(seed=0), _build(seed=1)
    assert not torch.equal(attn.features, other.features)
    other.load_state_dict(attn.state_dict())
    x, mask = torch.randn(2, 20, DIM), torch.ones(2, 20, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(other(x, mask), attn(x, mask), rtol=0, atol=0)


def test_padded_sequence_equals_the_unpadded_one():
    """The keys' stabiliser is taken over real keys only, so padding changes nothing at real positions."""
    attn = _build()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, DIM, generator=g)
    padded = torch.cat([x, 30 * torch.randn(1, 24, DIM, generator=g)], 1)
    padded_mask = F.pad(torch.ones(1, 40, dtype=torch.bool), (0, 24))
    with torch.no_grad():
        alone = attn(x, torch.ones(1, 40, dtype=torch.bool))
        torch.testing.assert_close(attn(padded, padded_mask)[:, :40], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("options", "match"), [({"redraw": -1}, "redraw >= 0"), ({"variant": "x"}, "variant"),
                                                ({"kernel": "elu"}, "kernel"),
                                                ({"variant": "harness", "kernel": "relu"}, "softmax kernel"),
                                                ({"variant": "lra", "redraw": 1}, "leave"),
                                                ({"harness_fixes": ["scale"]}, "harness_fixes"),
                                                ({"variant": "harness", "harness_fixes": ["mask"]}, "harness_fixes")])
def test_bad_options_are_errors(options, match):
    with pytest.raises(ValueError, match=match):
        attention.build("performer", dim=DIM, num_heads=HEADS, **options)


def _qkv(b, n, scale, seed, pad=()):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, HEADS, n, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, n - p :] = False
    return scale * q, scale * k, v, mask


def _phi(x, w, eps, c):
    """``m^(-1/2) (exp(W x − ‖x‖²/2 − c) + ε)``, written out."""
    return w.shape[0] ** -0.5 * (torch.exp(x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2 - c) + eps)


@pytest.mark.parametrize(("stabiliser", "masked"), [("row", False), ("example", True), ("example", False),
                                                    ("batch", False), ("batch", True)])
@pytest.mark.parametrize("detach", [True, False])
def test_stabilisers_values_and_gradients_equal_their_maxima_written_out(stabiliser, masked, detach):
    """Each stabiliser ``c`` is its maximum of ``W x``; without ``detach`` its gradient is that of the maximum
    (``amax`` here: no ties in random data), with it none. With a key mask the maximum is over real keys and
    padded keys get zero features; the second example has no real keys: its features (and, per example, its
    stabiliser) are zero, and it gets no gradient from them."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, HEAD_DIM, generator=g, dtype=torch.float64)
    x = torch.randn(3, HEADS, 9, HEAD_DIM, generator=g, dtype=torch.float64).requires_grad_(True)
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[0, 6:], keep[1] = False, False
    proj = x @ w.T
    source = proj if not detach else proj.detach()
    if masked:
        source = source.masked_fill(~keep[:, None, :, None], -torch.inf)
    c = {"row": lambda: source.amax(-1, keepdim=True), "example": lambda: source.amax((-2, -1), keepdim=True),
         "batch": lambda: source.amax()}[stabiliser]()
    expected = _phi(x, w, 1e-4, torch.nan_to_num(c, neginf=0.0))
    if masked:
        expected = expected * keep[:, None, :, None]
    got = positive_random_features(x, w, 1e-4, keep if masked else None, stabiliser=stabiliser, detach=detach)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    weights = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (grad,), (expected_grad,) = (torch.autograd.grad((t * weights).sum(), x) for t in (got, expected))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10 * expected_grad.abs().max().item())
    assert torch.isfinite(grad).all()


def test_a_key_mask_needs_a_key_stabiliser():
    x, w = torch.randn(1, 1, 4, HEAD_DIM), torch.randn(8, HEAD_DIM)
    with pytest.raises(ValueError, match="example or batch"):
        positive_random_features(x, w, 1e-4, torch.ones(1, 4, dtype=torch.bool), stabiliser="row")


def _harness_reference(q, k, v, mask, w, eps=1e-4, fixes=()):
    """The Nyströmformer harness's Performer (the facts' A.4 formula) in float64, with the bugs named in ``fixes``
    corrected: ``scale`` d^(-1/4) once, ``padding`` padded keys out of the stabiliser and the sums, ``stabiliser``
    one key maximum per example and head."""
    s = HEAD_DIM ** (-0.25 if "scale" in fixes else -0.5)
    keep = mask[:, None, :, None].to(q.dtype)
    qt, kt = s * q, s * keep * k
    phi_q = _phi(qt, w, eps, (qt @ w.T).amax(-1, keepdim=True))
    scores = kt @ w.T
    if "padding" in fixes:
        scores = scores.masked_fill(keep == 0, -torch.inf)
    key_max = scores.amax((-2, -1), keepdim=True) if "stabiliser" in fixes else scores.amax()
    phi_k = _phi(kt, w, eps, key_max)  # upstream: one scalar over [B, H, N, m], padded (zero) keys included
    if "padding" in fixes:
        phi_k = phi_k * keep
    return (phi_q @ (phi_k.transpose(-1, -2) @ (v * keep))) / (phi_q @ phi_k.sum(-2)[..., None])


def test_favor_plus_matches_its_formula():
    """The default: scale d^(-1/4) once, key stabiliser over the real keys of each example and head, padded
    keys with zero features, eps 1e-6 inside phi, the |R| <= eps guard."""
    attn = _build(dtype=torch.float64)
    assert (attn.variant, attn.kernel, attn.eps, attn.redraw) == ("favor_plus", "softmax", 1e-6, 1)
    q, k, v, mask = _qkv(2, 30, 1.0, seed=9, pad=(11, 0))
    keep = mask[:, None, :, None].double()
    v = v * keep
    w, s = attn.features, HEAD_DIM**-0.25
    phi_q = _phi(s * q, w, 1e-6, (s * q @ w.T).amax(-1, keepdim=True))
    key_max = (s * k @ w.T).masked_fill(keep == 0, -torch.inf).amax((-2, -1), keepdim=True)
    phi_k = _phi(s * k, w, 1e-6, key_max) * keep
    r = phi_q @ phi_k.sum(-2)[..., None]
    r = torch.where(r.abs() <= 1e-6, r + 2e-6, r)
    expected = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / r
    torch.testing.assert_close(attn.attend(q, k, v, mask), expected, rtol=1e-10, atol=1e-12)


def test_harness_variant_matches_the_harness_formula_values_and_gradients():
    """Large inputs (norm ~3 sqrt(d)): the batch-wide key maximum makes many normalisers tiny, where
    FAVOR+'s guard would fire; the harness has none, and neither has the variant."""
    attn = _build(dtype=torch.float64, variant="harness")
    assert attn.eps == 1e-4 and attn.redraw == 0
    q, k, v, mask = _qkv(3, 40, 3.0, seed=4, pad=(25, 0, 8))
    q.requires_grad_(True), k.requires_grad_(True)
    w = attn.features
    got = attn.attend(q, k, v * mask[:, None, :, None], mask)
    expected = _harness_reference(q, k, v, mask, w)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (q, k))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        s = HEAD_DIM**-0.5
        kt = s * k * mask[:, None, :, None]
        phi_k = _phi(kt, w, 1e-4, (kt @ w.T).max())
        normaliser = _phi(s * q, w, 1e-4, (s * q @ w.T).amax(-1, keepdim=True)) @ phi_k.sum(-2)[..., None]
    assert (normaliser <= 1e-4).float().mean() > 0.3  # the guard would have changed these rows


def test_harness_variant_depends_on_padding_and_on_the_batch_as_upstream():
    attn = _build(dtype=torch.float64, variant="harness")
    q, k, v, mask = _qkv(2, 32, 1.0, seed=5, pad=(12, 0))
    v = v * mask[:, None, :, None]
    both = attn.attend(q, k, v, mask)
    alone = attn.attend(q[:1], k[:1], v[:1], mask[:1])
    unpadded = attn.attend(q[:1, :, :20], k[:1, :, :20], v[:1, :, :20], mask[:1, :20])
    torch.testing.assert_close(alone, _harness_reference(q[:1], k[:1], v[:1], mask[:1], attn.features))
    assert not torch.allclose(both[:1], alone, rtol=0, atol=1e-9)  # batch-wide stabiliser
    assert (alone[..., :20, :] - unpadded).abs().max() > 1e-2  # padded keys are zero keys in the normaliser


FIX_SETS = [(), ("scale",), ("padding",), ("stabiliser",), ("scale", "padding"), ("padding", "stabiliser"),
            ("scale", "padding", "stabiliser")]


@pytest.mark.parametrize("fixes", FIX_SETS)
def test_harness_fixes_each_correct_their_bug_values_and_gradients(fixes):
    attn = _build(dtype=torch.float64, variant="harness", harness_fixes=list(fixes))
    q, k, v, mask = _qkv(3, 24, 1.0, seed=12, pad=(9, 0, 17))
    q.requires_grad_(True), k.requires_grad_(True)
    v = v * mask[:, None, :, None]
    got = attn.attend(q, k, v, mask)
    expected = _harness_reference(q, k, v, mask, attn.features, fixes=fixes)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(torch.autograd.grad(got.sum(), (q, k)), torch.autograd.grad(expected.sum(), (q, k)), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fixes", FIX_SETS)
def test_harness_fixes_remove_the_dependence_on_padding_and_on_the_batch(fixes):
    """``padding``: real outputs no longer depend on how much padding follows; ``stabiliser``: an example's
    outputs no longer depend on the rest of its micro-batch. Each bug is still there without its fix."""
    attn = _build(dtype=torch.float64, variant="harness", harness_fixes=list(fixes))
    q, k, v, mask = _qkv(2, 32, 1.0, seed=5, pad=(12, 0))
    v = v * mask[:, None, :, None]
    both = attn.attend(q, k, v, mask)
    alone = attn.attend(q[:1], k[:1], v[:1], mask[:1])
    unpadded = attn.attend(q[:1, :, :20], k[:1, :, :20], v[:1, :, :20], mask[:1, :20])
    assert torch.allclose(both[:1], alone, rtol=0, atol=1e-12) == ("stabiliser" in fixes)
    assert torch.allclose(alone[..., :20, :], unpadded, rtol=0, atol=1e-12) == ("padding" in fixes)


def test_harness_with_every_fix_is_favor_plus_with_the_harness_settings():
    """What is left between the two is FAVOR+'s own details: the normaliser guard (moderate inputs here, so it never
    fires: checked), the detached stabilisers (no change in value) and the QR sign fix (the same ``W`` is given to
    both)."""
    fixed = _build(dtype=torch.float64, variant="harness", harness_fixes=["scale", "padding", "stabiliser"])
    favor = _build(dtype=torch.float64, variant="favor_plus", eps=1e-4, redraw=0)
    favor.features.copy_(fixed.features)
    q, k, v, mask = _qkv(3, 24, 0.3, seed=13, pad=(9, 0, 17))
    v = v * mask[:, None, :, None]
    s, w, keep = HEAD_DIM**-0.25, fixed.features, mask[:, None, :, None]
    key_max = (s * k @ w.T).masked_fill(~keep, -torch.inf).amax((-2, -1), keepdim=True)
    phi_q, phi_k = _phi(s * q, w, 1e-4, (s * q @ w.T).amax(-1, keepdim=True)), _phi(s * k, w, 1e-4, key_max) * keep
    assert (phi_q @ phi_k.sum(-2)[..., None]).min() > 1e-4  # the guard's threshold
    torch.testing.assert_close(fixed.attend(q, k, v, mask), favor.attend(q, k, v, mask), rtol=1e-12, atol=1e-14)


def test_harness_features_are_drawn_once_without_the_qr_sign_fix():
    attn = _build(seed=3, variant="harness").train()
    g = torch.Generator().manual_seed(3)
    blocks = [torch.linalg.qr(torch.randn(HEAD_DIM, HEAD_DIM, generator=g))[0].T for _ in range(16)]
    expected = torch.cat(blocks) * torch.randn(256, HEAD_DIM, generator=g).norm(dim=-1, keepdim=True)
    attn.redraw_features(torch.Generator().manual_seed(3))
    torch.testing.assert_close(attn.features, expected, rtol=0, atol=0)
    x, mask = torch.randn(2, 8, DIM), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(3):
            attn(x, mask)
    assert torch.equal(attn.features, expected)  # never redrawn


def _module_qkv(attn, x):
    return (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_lra_relu_kernel_is_deterministic_relu_linear_attention_without_padding_mask():
    attn = _build(dtype=torch.float64, variant="lra", kernel="relu", qkv_bias=False, out_bias=False,
                  qkv_dim=16)
    assert attn.features is None and attn.eps == 1e-3 and attn.head_dim == 8
    x = torch.randn(2, 24, DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 10:] = False
    with torch.no_grad():
        q, k, v = _module_qkv(attn, x)  # the values of padded positions are NOT zeroed
        phi_q, phi_k = torch.relu(q) + 1e-3, torch.relu(k) + 1e-3
        out = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2)[..., None])
        expected = attn.out_proj(attn.merge_heads(out))
        torch.testing.assert_close(attn(x, mask), expected, rtol=1e-12, atol=1e-12)
        assert attn.out_proj.bias is None and attn.q_proj.bias is None


def test_relu_kernel_with_padding_masked_is_padding_invariant():
    attn = _build(kernel="relu")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 30, DIM, generator=g)
    padded = torch.cat([x, 30 * torch.randn(1, 10, DIM, generator=g)], 1)
    with torch.no_grad():
        alone = attn(x, torch.ones(1, 30, dtype=torch.bool))
        got = attn(padded, F.pad(torch.ones(1, 30, dtype=torch.bool), (0, 10)))[:, :30]
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)


def test_lra_softmax_kernel_redraws_from_the_queries_and_keeps_padded_keys():
    """LRA's ListOps Performer: 2 features, redrawn at every forward (eval too) from the queries' sum, key
    stabiliser over all keys of an example and head, padded keys and values included, the |R| <= eps guard."""
    attn = _build(dtype=torch.float64, variant="lra", num_features=2)
    q, k, v, mask = _qkv(2, 20, 1.0, seed=8, pad=(7, 0))
    q.requires_grad_(True), k.requires_grad_(True)
    got = attn.attend(q, k, v, mask)
    w = attn.features.clone()
    expected_w = gaussian_orthogonal_features(2, HEAD_DIM, sign_fix=False, dtype=torch.float64, generator=
                                              torch.Generator().manual_seed(math.ceil(q.sum().item() * 1e7)))
    torch.testing.assert_close(w, expected_w, rtol=0, atol=0)
    s = HEAD_DIM**-0.25
    phi_q = _phi(s * q, w, 1e-6, (s * q @ w.T).amax(-1, keepdim=True))
    phi_k = _phi(s * k, w, 1e-6, (s * k @ w.T).amax((-2, -1), keepdim=True))
    r = phi_q @ phi_k.sum(-2)[..., None]
    r = torch.where(r.abs() <= 1e-6, r + 2e-6, r)
    expected = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / r
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # gradients through both maxima, as upstream (not detached)
    grads = torch.autograd.grad(got.sum(), (q, k))
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), (q, k)), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(attn.attend(q, k, v, mask), got, rtol=0, atol=0)  # same batch, same W
    attn.attend(q[:1], k[:1], v[:1], mask[:1])
    assert not torch.equal(attn.features, w)  # another batch, another W


def test_16k_tokens_finite_and_memory_linear():
    n = 16384
    attn = _build()
    y, tracker = tracked_long_forward(attn, n, DIM)
    assert torch.isfinite(y).all()
    assert tracker.largest <= n * 256 * HEADS  # one [1, H, N, m] feature map
    assert tracker.peak < HEADS * n * n * 4 / 10, f"peak {tracker.peak / 2**20:.1f} MiB"
