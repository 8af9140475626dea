"""cosFormer attention (Qin et al., "cosFormer: Rethinking Softmax in Attention", ICLR 2022).

A linear attention whose similarity is ``ReLU(q_i)·ReLU(k_j)`` re-weighted by ``cos(π/2 · (i − j) / M)``,
which favours nearby tokens and stays non-negative for ``|i − j| < M``. Per head, with ``q' = ReLU(q)``,
``k' = ReLU(k)`` and positions ``i, j``::

    s_ij  = q'_i·k'_j · cos(π/2 · (i − j) / M)
    out_i = Σ_j s_ij v_j / max(Σ_j s_ij, ε)

Since ``cos(a − b) = cos a cos b + sin a sin b``, with ``θ_i = π/2 · i / M`` the similarity is a dot product
of ``2·Dh`` features ``[q'_i cos θ_i, q'_i sin θ_i] · [k'_j cos θ_j, k'_j sin θ_j]``, so the output is a
linear attention over them: ``O(N·Dh²)`` time, ``O(N·Dh + Dh²)`` memory, no ``N x N`` matrix.
Shapes: ``q, k, v: [B, H, N, Dh]`` -> ``[B, H, N, Dh]``.

Choices:

- ``length="real"`` (default): ``M`` is each example's number of real tokens ``L`` and a token's index ``i``
  is its rank among the real tokens (1-based), so ``i − j`` is the distance between real tokens and the
  output at a real position is the same whether the example is padded or not (tested against the
  unpadded sequence). With padding at the end, as in every task here, ``i`` is the absolute position.
  ``length="padded"`` is the authors' code (OpenNLPLab/cosFormer): ``M`` is the padded length ``N`` and
  ``i = 1..N`` the absolute position, so real outputs depend on how much padding the batch adds. (The
  authors' code has no padding mask; here padded keys are masked in both modes, so real outputs never
  depend on what the padded positions hold.)
- Indices run from 1 as in the authors' ``get_index`` (``θ_i = π/2 · i / M``); only ``i − j`` matters.
- ``ε = eps`` (1e-6) clamps the normaliser from below, as the authors' ``clamp_min``; no ``1/√Dh``
  scaling (the normaliser cancels it), as the authors.
- Padding: ``k'`` is zeroed at padded keys, which therefore drop out of both sums; ``v`` is already zero
  there (``QKVAttention``). A fully padded example has ``M`` clamped to 1 and all-zero outputs.
"""

from __future__ import annotations

import math

import torch

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.nystromformer import check_choice


def position_angles(mask: torch.Tensor, length: str, dtype: torch.dtype) -> torch.Tensor:
    """``θ = π/2 · i / M`` per position -> ``[B, N]`` in ``dtype`` (see the module doc for ``i`` and ``M``)."""
    if length == "real":
        index = mask.cumsum(-1)  # rank among the real tokens, 1-based at real positions
        horizon = mask.sum(-1, keepdim=True).clamp_min(1)
    else:
        n = mask.shape[-1]
        index = torch.arange(1, n + 1, device=mask.device).expand_as(mask)
        horizon = torch.full_like(index[:, :1], n)
    return (math.pi / 2) * index.to(dtype) / horizon.to(dtype)


@register("cosformer")
class CosformerAttention(QKVAttention):
    """ReLU linear attention with cos-based re-weighting (see the module doc).

    Options: ``length`` (``real`` | ``padded``: what ``M`` and the indices count), ``eps`` (1e-6, lower
    clamp of the normaliser), ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, length: str = "real", eps: float = 1e-6, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_choice("length", length, ("real", "padded"))
        self.length, self.eps = length, eps

    def attend(self, q, k, v, mask):
        theta = position_angles(mask, self.length, torch.promote_types(q.dtype, torch.float32))
        theta = theta[:, None, :, None]  # [B, 1, N, 1], in float32 at least: i reaches thousands
        cos, sin = torch.cos(theta).to(q.dtype), torch.sin(theta).to(q.dtype)
        q_relu = torch.relu(q)
        k_relu = torch.relu(k) * mask[:, None, :, None].to(k.dtype)
        q_feat = torch.cat([q_relu * cos, q_relu * sin], dim=-1)  # [B, H, N, 2Dh]
        k_feat = torch.cat([k_relu * cos, k_relu * sin], dim=-1)
        kv = k_feat.transpose(-1, -2) @ v  # [B, H, 2Dh, Dh]
        normaliser = q_feat @ k_feat.sum(-2)[..., None]  # [B, H, N, 1]
        return (q_feat @ kv) / normaliser.clamp_min(self.eps)

    def extra_repr(self) -> str:
        return f"length={self.length}, eps={self.eps}"
