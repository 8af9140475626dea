"""Nyströmformer: pseudo-inverse iteration, exact limit (= softmax), masking, odd lengths, long sequences."""

from __future__ import annotations

import pytest
import torch

import lra.attention as attention
from lra.attention.nystromformer import SequenceConv, iterative_pinv, segment_sum
from tests.memory import LivePeak

DIM, HEADS = 32, 2


def _build(name="nystromformer", seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    return attention.build(name, dim=DIM, num_heads=HEADS, **options).to(dtype).eval()


def _batch(b, n, seed=1, dtype=torch.float32, pad=(0,)):
    """``x: [b, n, DIM]`` and a mask padding sample ``i`` of ``pad`` by ``pad[i]`` tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(b, n, DIM, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, n - p :] = False
    return x, mask


def _softmax_matrices(sharpness, m=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sharpness), m, m, generator=g, dtype=torch.float64)
    sharp = torch.tensor(sharpness, dtype=torch.float64)[:, None, None]
    return torch.softmax(sharp * (logits + 3 * torch.eye(m, dtype=torch.float64)), dim=-1)


def test_pinv_converges_to_linalg_pinv():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64) + 4 * torch.eye(16), dim=-1)
    exact = torch.linalg.pinv(a)
    assert torch.linalg.cond(a).max() < 20  # well conditioned
    torch.testing.assert_close(iterative_pinv(a, 6), exact, rtol=0, atol=1e-3)  # the default count
    torch.testing.assert_close(iterative_pinv(a, 10), exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init_scaling", ["per_matrix", "global"])
def test_both_initial_scalings_converge(init_scaling):
    a = _softmax_matrices([0.3, 1.0, 3.0])  # different column sums, so the two scalings differ
    z = iterative_pinv(a, 60, init_scaling)
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=0, atol=1e-9)


def test_global_scaling_differs_from_per_matrix_before_convergence():
    a = _softmax_matrices([0.3, 1.0, 3.0])
    assert not torch.allclose(iterative_pinv(a, 2, "global"), iterative_pinv(a, 2, "per_matrix"))


def test_pinv_of_zero_matrix_is_zero_and_finite():
    z = iterative_pinv(torch.zeros(2, 4, 4), 6)
    assert torch.equal(z, torch.zeros(2, 4, 4))


def test_pinv_runs_in_float32_for_bfloat16():
    """Every iteration in float32 (not bfloat16 cast up at the end): the same bits as from float32 input."""
    a = _softmax_matrices([2.0]).to(torch.bfloat16)
    z = iterative_pinv(a, 6)
    assert z.dtype == torch.float32 and torch.equal(z, iterative_pinv(a.float(), 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast off inside, whatever the caller's
        assert torch.equal(iterative_pinv(a, 6), z)


@pytest.mark.parametrize("landmarks", [24, 64])  # = N (one token per landmark) and > N
def test_exact_limit_equals_softmax_with_padding(landmarks):
    soft = _build("softmax", dtype=torch.float64)
    nys = _build(num_landmarks=landmarks, conv_kernel=0, pinv_iterations=60, dtype=torch.float64, seed=3)
    nys.load_state_dict(soft.state_dict(), strict=False)
    x, mask = _batch(3, 24, dtype=torch.float64, pad=(7, 0, 19))
    with torch.no_grad():
        torch.testing.assert_close(nys(x, mask)[mask], soft(x, mask)[mask], rtol=0, atol=1e-6)


def test_load_from_softmax_leaves_only_the_conv_weight():
    nys = _build()
    result = nys.load_state_dict(_build("softmax").state_dict(), strict=False)
    assert result.missing_keys == ["conv.weight"] and not result.unexpected_keys


def test_segment_sum_uneven_runs():
    t = torch.arange(10.0)[:, None]  # N = 10, m = 4 -> runs of 3, 3, 2, 2
    assert segment_sum(t, 4)[:, 0].tolist() == [0 + 1 + 2, 3 + 4 + 5, 6 + 7, 8 + 9]
    assert segment_sum(t, 10)[:, 0].tolist() == t[:, 0].tolist()


@pytest.mark.parametrize(("n", "landmarks"), [(50, 8), (50, 49), (37, 64)])
def test_lengths_not_divisible_by_landmarks(n, landmarks):
    attn = _build(num_landmarks=landmarks, conv_kernel=5)
    x, mask = _batch(2, n, pad=(n // 3,))
    other = x.clone()
    other[~mask] = 100.0
    with torch.no_grad():
        y, y_other = attn(x, mask), attn(other, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y[mask], y_other[mask], rtol=1e-5, atol=1e-5)


def test_empty_runs_and_fully_padded_sample_stay_finite_and_apart():
    attn = _build(num_landmarks=16)
    x, mask = _batch(3, 64, pad=(60, 64))  # sample 0: 12 of 16 runs empty; sample 1: nothing real
    with torch.no_grad():
        y = attn(x, mask)
        alone = attn(x[2:], mask[2:])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[2:], alone, rtol=1e-5, atol=1e-5)


def _authors_reference(q, k, v, mask, m, iterations):
    """The authors' LRA Nyström forward (mlpen/Nystromformer, LRA/code/attention_nystrom.py), re-typed."""
    b, h, n, d = q.shape
    keep = mask[:, None, :, None].to(q.dtype)
    q, k = q * keep / d**0.25, k * keep / d**0.25
    q_l, k_l = (t.reshape(b, h, m, n // m, d).mean(-2) for t in (q, k))
    k1 = torch.softmax(q @ k_l.transpose(-1, -2), -1)
    k2 = torch.softmax(q_l @ k_l.transpose(-1, -2), -1)
    k3 = torch.softmax(q_l @ k.transpose(-1, -2) - 1e9 * (~mask[:, None, None, :]).to(q.dtype), -1)
    eye = torch.eye(m, dtype=q.dtype)
    z = k2.transpose(-1, -2) / k2.sum(-2).max()
    for _ in range(iterations):
        kz = k2 @ z
        z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return (k1 @ z) @ (k3 @ v)


def test_authors_masking_and_global_scaling_reproduce_the_authors_code():
    attn = _build(num_landmarks=8, masking="authors", init_scaling="global", conv_kernel=0,
                  dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, HEADS, 32, DIM // HEADS, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[0, 13:] = False
    v = v * mask[:, None, :, None]
    expected = _authors_reference(q, k, v, mask, 8, 6)
    real = mask[:, None, :].expand(-1, HEADS, -1)  # the authors also zero Q at padded positions
    torch.testing.assert_close(attn.attend(q, k, v, mask)[real], expected[real], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16k_tokens_no_nan(dtype):
    attn = _build(dtype=dtype)
    x, mask = _batch(1, 16384, dtype=dtype, pad=(1000,))
    with torch.no_grad():
        y = attn(x, mask)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["nystromformer", "proxyformer"])
def test_8k_tokens_memory_far_below_quadratic(name):
    n = 8192
    attn = _build(name)
    x, mask = _batch(1, n, pad=(100,))
    with torch.no_grad(), LivePeak() as tracker:
        attn(x, mask)
    quadratic = HEADS * n * n * 4  # one float32 score matrix per head
    assert tracker.largest < n * n // 16
    assert tracker.peak < quadratic / 16, f"peak {tracker.peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(("n", "kernel"), [(70, 35), (2048, 35), (20, 35), (9, 4), (33, 1)])
def test_sequence_conv_is_the_authors_depthwise_conv2d(n, kernel):
    """The banded-matmul convolution = ``Conv2d(H, H, (k, 1), padding="same", groups=H)`` on ``[B, H, N, Dh]``,
    values and gradients (float64), for lengths below, at and off a multiple of its block, odd and even kernels."""
    torch.manual_seed(0)
    conv = SequenceConv(HEADS, kernel).double()
    reference = torch.nn.Conv2d(HEADS, HEADS, (kernel, 1), padding="same", groups=HEADS, bias=False).double()
    with torch.no_grad():
        reference.weight.copy_(conv.weight[:, None, :, None])
    v = torch.randn(3, HEADS, n, 5, dtype=torch.float64, requires_grad=True)
    out, expected = conv(v), reference(v)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [v, conv.weight], upstream)
    expected_grads = torch.autograd.grad(expected, [v, reference.weight], upstream)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], expected_grads[1][:, 0, :, 0], rtol=0, atol=1e-10)


def test_sequence_conv_initialisation_is_conv2d_default():
    torch.manual_seed(0)
    w, bound = SequenceConv(4, 35).weight, 35 ** -0.5  # U(±1/√k), as nn.Conv2d's kaiming_uniform(a=√5)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(w.std() - bound / 3 ** 0.5) < 0.2 * bound / 3 ** 0.5
