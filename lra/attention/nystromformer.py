"""Nyströmformer attention (Xiong et al., AAAI 2021), plus the Nyström helpers Proxyformer reuses.

Per head, with ``d = Dh``, ``m`` landmarks ``Q̃, K̃: [B, H, m, Dh]`` and ``S(X) = softmax(X / √d)`` over the
last axis::

    K1 = S(Q K̃ᵀ)    [B, H, N, m]      K2 = S(Q̃ K̃ᵀ)    [B, H, m, m]      K3 = S(Q̃ Kᵀ)    [B, H, m, N]
    out = K1 · (Z · (K3 · V)) + conv(V)      Z ≈ pinv(K2)

The products are taken right to left, so the cost is ``O(N·m·Dh)`` time and ``O(N·m)`` memory: no ``N x N``
matrix is formed. ``conv`` is a depthwise convolution of V along the sequence, one kernel of
``conv_kernel`` taps per head shared by the head's ``Dh`` channels (the authors' ``Conv2d(H, H, (k, 1),
groups=H)`` skip; kernel 35 in their LRA runs; ``0``/``None`` disables it); see ``SequenceConv`` for how it is
computed. Padded positions of V are zero, so the convolution reads no padding.

Pseudo-inverse (``iterative_pinv``): ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))``, ``pinv_iterations`` times,
from ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``. ``init_scaling="per_matrix"`` (default) takes both norms of each
``[m, m]`` matrix, which keeps samples independent of each other; ``"global"`` takes each norm's maximum over
the whole batch and every head, as the authors' code does (theirs divides by the maximum column sum only,
the same thing because the rows of a softmax sum to 1). It runs in float32 when the inputs are
bfloat16/float16 (and float64 for float64), with autocast disabled: the iteration cubes ``AZ`` and loses
its accuracy in half precision; the ``m x m`` matrices make this cheap.

Landmarks (segment means). The sequence is cut into ``m' = min(num_landmarks, N)`` runs of consecutive
tokens; when ``m'`` does not divide ``N`` the first ``N mod m'`` runs hold one token more (no internal
padding: every landmark covers real positions of the input, and ``num_landmarks >= N`` gives one landmark
per token). With ``masking="full"`` (default) a landmark is the mean over the *real* tokens of its run; a
run with no real token gives a zero vector that is masked: it gets no weight in K1 and K2 (masked
columns) and its row of K2 is zero, so ``K2 = [[A, 0], [0, 0]]`` up to a permutation and the iteration
yields ``pinv(K2) = [[pinv(A), 0], [0, 0]]`` (the iteration keeps that block structure exactly). K3
masks padded keys. Padding therefore never reaches a real token's output, and with ``num_landmarks = N``
and enough iterations the output is exactly softmax attention (tested). ``masking="authors"``
reproduces the authors' code: padded tokens count as zero vectors in the means (sum over real tokens /
run length), empty runs are not masked, and only K3 is masked; outputs then depend on how much padding a
batch holds.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lra.attention import register
from lra.attention.base import QKVAttention


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``scores: [B, H, R, C]`` restricted to ``keep: [B, C]`` (None: all).

    ``scores`` is overwritten (masked in place, saving one ``R x C`` copy): pass a fresh product only.
    """
    if keep is not None:
        scores = scores.masked_fill_(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


@contextlib.contextmanager
def true_fp32_matmuls():
    """float32 matmuls in full float32 within the block, whatever ``torch.set_float32_matmul_precision`` says (TF32
    would cost the pseudo-inverse iteration its accuracy)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def iterative_pinv(a: torch.Tensor, iterations: int, init_scaling: str = "per_matrix") -> torch.Tensor:
    """Pseudo-inverse of each matrix of ``a: [..., m, m]``, in at least float32 with true-fp32 matmuls (see the module
    doc)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(a.device.type, enabled=False), true_fp32_matmuls():
        a = a.to(dtype)
        norm_1 = a.abs().sum(-2).amax(-1)  # max column sum, [...]
        norm_inf = a.abs().sum(-1).amax(-1)  # max row sum, [...]
        if init_scaling == "global":
            norm_1, norm_inf = norm_1.amax(), norm_inf.amax()
        scale = (norm_1 * norm_inf).clamp_min(torch.finfo(dtype).tiny)  # an all-zero matrix keeps Z = 0
        z = a.transpose(-1, -2) / scale[..., None, None]
        eye = torch.eye(a.shape[-1], dtype=dtype, device=a.device)
        for _ in range(iterations):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def landmark_pinv(q_landmarks, k_landmarks, iterations, init_scaling, landmark_mask=None, column_keep=None):
    """``Z ≈ pinv(K2)`` with ``K2 = S(Q̃ K̃ᵀ)`` formed in the pseudo-inverse's precision.

    ``q_landmarks, k_landmarks: [..., H, m, Dh]``; ``landmark_mask: [B, m]`` or None. Masked landmarks get
    zero rows and columns in K2 (see module doc). ``column_keep: [B, H, 1, m]`` bool or None: the columns of
    K2 it marks False are zeroed after the softmax (Proxyformer's decomposed dropout), so those rows of ``Z``
    are zero. Returns ``[..., H, m, m]`` (``[B, H, m, m]`` with ``column_keep``) in float32 or float64.

    With gradients the iteration is checkpointed: its ``~8 · iterations`` intermediate ``m x m`` matrices per
    sample and head are recomputed in backward instead of being kept (a few ``m³`` matmuls against
    megabytes of activations at ``m = 128``).
    """
    dtype = torch.promote_types(q_landmarks.dtype, torch.float32)
    with torch.autocast(q_landmarks.device.type, enabled=False), true_fp32_matmuls():
        q_landmarks = q_landmarks.to(dtype) * q_landmarks.shape[-1] ** -0.5
        k2 = masked_softmax(q_landmarks @ k_landmarks.to(dtype).transpose(-1, -2), landmark_mask)
        if landmark_mask is not None:
            k2 = k2 * landmark_mask[:, None, :, None]
        if column_keep is not None:
            k2 = k2 * column_keep.to(dtype)
    if k2.requires_grad:
        return checkpoint(iterative_pinv, k2, iterations, init_scaling, use_reentrant=False)
    return iterative_pinv(k2, iterations, init_scaling)


def softmax_attend(queries, keys, values, key_mask):
    """``S(queries · keysᵀ) · values`` -> ``[B, H, R, Dv]`` through one fused SDPA call.

    ``queries: [B or 1, H, R, Dh]`` or ``[H, R, Dh]`` (broadcast over the batch), ``keys: [B or 1, H, C, Dh]``,
    ``values: [B, H, C, Dv]``, ``key_mask: [B, C]`` (True = attend) or None. ``S`` is the softmax over the real
    keys with scale ``1/√Dh``. The fused kernel recomputes the ``R x C`` weights in backward instead of keeping
    them, so a Nyström factor costs no ``N x m`` probability matrix for the backward pass.
    """
    batch, heads = values.shape[0], values.shape[1]
    queries = queries.expand(batch, heads, *queries.shape[-2:])
    keys = keys.expand(batch, heads, *keys.shape[-2:])
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)


def nystrom_product(q, k, v, q_landmarks, k_landmarks, z, key_mask, landmark_mask=None):
    """``K1 · (Z · (K3 · V))`` -> ``[B, H, N, Dh]``.

    ``q, k, v: [B, H, N, Dh]``; landmarks ``[B or 1, H, m, Dh]`` or ``[H, m, Dh]``; ``z: [B or 1, H, m, m]``;
    ``key_mask: [B, N]``; ``landmark_mask: [B, m]`` or None.

    ``K3 · V`` and ``K1 · W`` are two fused softmax-attention calls (``softmax_attend``): ``K3 · V`` is the
    landmark queries attending over the real keys, ``K1 · W`` the tokens attending over the (real) landmark keys
    with values ``W = Z · (K3 · V)``. ``Z`` is applied in its own (float32/64) precision, the ``N``-long
    products in the input's.
    """
    summary = z @ softmax_attend(q_landmarks, k, v, key_mask).to(z.dtype)  # [B, H, m, Dh]
    return softmax_attend(q, k_landmarks, summary.to(v.dtype), landmark_mask)


class SequenceConv(nn.Module):
    """Depthwise convolution along the sequence, one kernel ``w: [H, k]`` per head, "same" length::

        out[b, h, n, :] = Σ_t w[h, t] · v[b, h, n + t − l, :]      l = (k − 1) // 2, v = 0 outside [0, N)

    (for odd ``k`` this is the authors' ``Conv2d(H, H, (k, 1), padding=(k // 2, 0), groups=H, bias=False)``
    with ``weight[h, 0, :, 0] = w[h]``; the initialisation is that layer's default, ``U(±1/√k)``).

    Computed as a banded Toeplitz product in blocks of ``s >= max(l, k − 1 − l)`` positions: output block ``i``
    is ``M_h · [v_{i−1}; v_i; v_{i+1}]`` with one ``[s, 3s]`` band matrix ``M_h`` per head, the batch and the
    ``Dh`` channels as the matmul's columns. On CPU this is ~5x faster than PyTorch's depthwise convolution
    for ``k = 35`` (which is most of a Nyström step there) and gives the same result (float64: to rounding).
    """

    def __init__(self, num_heads: int, kernel: int):
        super().__init__()
        self.kernel, self.left = kernel, (kernel - 1) // 2
        self.block = max(32, kernel - 1 - self.left)
        self.weight = nn.Parameter(torch.empty(num_heads, kernel).uniform_(-kernel ** -0.5, kernel ** -0.5))

    def band(self) -> torch.Tensor:
        """``M: [H, s, 3s]``, ``M[h, r, c] = w[h, c − s − r + l]`` where that tap exists, else 0."""
        s = self.block
        tap = torch.arange(3 * s, device=self.weight.device) - s - torch.arange(s, device=self.weight.device)[:, None]
        tap = tap + self.left  # [s, 3s]
        valid = (tap >= 0) & (tap < self.kernel)
        return self.weight[:, tap.clamp(0, self.kernel - 1)] * valid

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``v: [B, H, N, Dh] -> [B, H, N, Dh]``."""
        b, h, n, d = v.shape
        s = self.block
        blocks = -(-n // s)
        columns = v.permute(1, 2, 0, 3).reshape(h, n, b * d)  # [H, N, B·Dh]
        columns = F.pad(columns, (0, 0, s, s + blocks * s - n))  # a zero block before, zeros up to a block after
        windows = columns.unfold(1, 3 * s, s).transpose(-1, -2)  # [H, blocks, 3s, B·Dh]
        out = self.band().to(v.dtype)[:, None] @ windows  # [H, blocks, s, B·Dh]
        return out.reshape(h, blocks * s, b, d)[:, :n].permute(2, 0, 1, 3)

    def extra_repr(self) -> str:
        return f"heads={self.weight.shape[0]}, kernel={self.kernel}"


def sequence_conv(num_heads: int, kernel: int | None) -> SequenceConv | None:
    """The ``conv(V)`` skip of Nyström-type attentions, or None when ``kernel`` is 0/None."""
    return SequenceConv(num_heads, kernel) if kernel else None


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def segment_sum(t: torch.Tensor, m: int) -> torch.Tensor:
    """Sums of ``t: [..., N, D]`` over ``m <= N`` runs of consecutive positions -> ``[..., m, D]``.

    The first ``N mod m`` runs hold ``N // m + 1`` positions, the others ``N // m``.
    """
    size, extra = divmod(t.shape[-2], m)
    cut = extra * (size + 1)
    runs = [(t[..., :cut, :], extra, size + 1), (t[..., cut:, :], m - extra, size)]
    return torch.cat([part.unflatten(-2, (count, length)).sum(-2) for part, count, length in runs if count],
                     dim=-2)


@register("nystromformer")
class NystromAttention(QKVAttention):
    """Nyström approximation of softmax attention with segment-mean landmarks (see the module doc).

    Options: ``num_landmarks`` (64), ``pinv_iterations`` (6), ``init_scaling`` (``per_matrix`` | ``global``),
    ``masking`` (``full`` | ``authors``), ``conv_kernel`` (35; 0/None: no convolution), ``qkv_bias``,
    ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, num_landmarks: int = 64, pinv_iterations: int = 6,
                 init_scaling: str = "per_matrix", masking: str = "full", conv_kernel: int | None = 35,
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_choice("init_scaling", init_scaling, ("per_matrix", "global"))
        check_choice("masking", masking, ("full", "authors"))
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.init_scaling, self.masking = init_scaling, masking
        self.conv = sequence_conv(num_heads, conv_kernel)

    def attend(self, q, k, v, mask):
        m = min(self.num_landmarks, q.shape[-2])
        weight = mask.to(q.dtype)  # [B, N]
        if self.masking == "full":
            counts = segment_sum(weight[..., None], m)[..., 0]  # real tokens per run, [B, m]
            landmark_mask = counts > 0
        else:
            counts = segment_sum(torch.ones_like(weight[..., None]), m)[..., 0]  # run lengths
            landmark_mask = None
        weight, denom = weight[:, None, :, None], counts.clamp_min(1)[:, None, :, None]
        q_landmarks = segment_sum(q * weight, m) / denom  # [B, H, m, Dh]
        k_landmarks = segment_sum(k * weight, m) / denom
        z = landmark_pinv(q_landmarks, k_landmarks, self.pinv_iterations, self.init_scaling, landmark_mask)
        out = nystrom_product(q, k, v, q_landmarks, k_landmarks, z, mask, landmark_mask)
        return out if self.conv is None else out + self.conv(v)

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}, "
                f"init_scaling={self.init_scaling}, masking={self.masking}")
