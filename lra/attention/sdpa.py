"""Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

The same function as ``softmax`` (same parameters, same mask rule), computed by PyTorch's fused kernels.
Which kernel runs is PyTorch's choice from the inputs: on GPU, FlashAttention needs half precision, no
attention mask and no (or supported) dropout; the memory-efficient kernel accepts a mask; otherwise the math
kernel, which forms the ``N x N`` matrix. So that an unpadded batch can reach FlashAttention, no mask is passed
when every token of the batch is real (a batch-wide check: one device-to-host sync per call on GPU). Attention
dropout sends the CPU kernels to the math path (measured: 5.8x the time at 2048 tokens x 8), which is why the
benchmark's reference rows run without it.

``backends_used`` collects, per module, the names of the kernels PyTorch picked for its calls
(``FLASH_ATTENTION``, ``EFFICIENT_ATTENTION``, ``CUDNN_ATTENTION``, ``MATH``; from PyTorch's own dispatcher
choice, ``torch._fused_sdp_choice``); run records and benchmark points report them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lra.attention import register
from lra.attention.base import QKVAttention


def sdpa_backend(q, k, v, attn_mask, dropout_p: float) -> str:
    """The kernel ``F.scaled_dot_product_attention`` will use for these inputs (PyTorch's dispatcher choice).

    Under autocast the call casts its inputs to the autocast dtype first (it is on autocast's lower-precision
    list), so the choice is asked for those dtypes: under mixed precision ``v`` can arrive in float32 (padding is
    zeroed with a float32 mask) beside half-precision ``q`` and ``k``, and asked as they are, PyTorch would answer
    MATH for a call that really runs a fused kernel (seen on an H200: cuDNN's)."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False)).name
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a torch without the private chooser
        return "unknown"


@register("sdpa")
class SDPAttention(QKVAttention):
    """Fused exact attention. Options: ``dropout`` (on the attention probabilities),
    ``qkv_bias``, ``qkv_dim``, ``out_bias``, ``mask_rule`` (see ``QKVAttention``; ``outer`` passes LRA's
    additive ``[B, 1, N, N]`` bias, which rules out the flash kernel)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True, mask_rule: str = "keys"):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias, mask_rule=mask_rule)
        self.dropout = dropout
        self.backends_used: set[str] = set()

    def attend(self, q, k, v, mask):
        if bool(mask.all()):
            key_mask = None  # nothing padded: no mask, so the fused kernels qualify (either rule gives this)
        elif self.mask_rule == "outer":
            key_mask = self.outer_mask_bias(mask, q.dtype)  # [B, 1, N, N] added to the scores
        else:
            key_mask = mask[:, None, None, :]  # [B, 1, 1, N]; True = attend
        p = self.dropout if self.training else 0.0
        self.backends_used.add(sdpa_backend(q, k, v, key_mask, p))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
