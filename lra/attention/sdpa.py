"""Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

The same function as ``softmax`` (same parameters, same mask rule), computed by PyTorch's fused kernels:
FlashAttention or memory-efficient attention on GPU when the inputs allow it, the math kernel on CPU.
With a padding mask PyTorch may not pick the flash kernel; the memory-efficient one still avoids the
``N x N`` matrix.
"""

from __future__ import annotations

import torch.nn.functional as F

from lra.attention import register
from lra.attention.base import QKVAttention


@register("sdpa")
class SDPAttention(QKVAttention):
    """Fused exact attention. Options: ``dropout`` (on the attention probabilities),
    ``qkv_bias``, ``qkv_dim``, ``out_bias``, ``mask_rule`` (see ``QKVAttention``; ``outer`` passes LRA's
    additive ``[B, 1, N, N]`` bias, which rules out the flash kernel)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True, mask_rule: str = "keys"):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias, mask_rule=mask_rule)
        self.dropout = dropout

    def attend(self, q, k, v, mask):
        if self.mask_rule == "outer":
            key_mask = self.outer_mask_bias(mask, q.dtype)  # [B, 1, N, N] added to the scores
        else:
            key_mask = mask[:, None, None, :]  # [B, 1, 1, N]; True = attend
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
