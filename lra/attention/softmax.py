"""Exact softmax attention with an explicit ``N x N`` score matrix (Vaswani et al., 2017).

``out = softmax(Q Kᵀ / √Dh + M) V`` per head, with ``M`` = the dtype's lowest value on padded keys (with
``mask_rule='outer'``: ``-1e10`` on every pair with a padded query or key, LRA's rule, see ``QKVAttention``), and
dropout on the attention probabilities (as in LRA's and the Nyströmformer harness's softmax baseline). Memory is
``O(B·H·N²)``: this is the reference every approximation is compared with.
"""

from __future__ import annotations

import math

import torch

from lra.attention import register
from lra.attention.base import QKVAttention


@register("softmax")
class SoftmaxAttention(QKVAttention):
    """Naive softmax attention. Options: ``dropout`` (on the attention probabilities),
    ``qkv_bias``, ``qkv_dim``, ``out_bias``, ``mask_rule`` (see ``QKVAttention``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True, mask_rule: str = "keys"):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias, mask_rule=mask_rule)
        self.dropout = torch.nn.Dropout(dropout)

    def attend(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, N, N]
        if self.mask_rule == "outer":
            scores = scores + self.outer_mask_bias(mask, scores.dtype)
        else:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        return torch.matmul(probs, v)
