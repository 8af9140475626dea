"""Linear Transformer attention (Katharopoulos, Vyas, Pappas & Fleuret, "Transformers are RNNs", ICML 2020).

Softmax's ``exp(q·k)`` is replaced by the kernel ``φ(q)·φ(k)`` with the feature map ``φ(x) = elu(x) + 1 > 0``
(elementwise, ``Dh`` features), and the attention stays row-normalised. Per head, over the real keys ``j``::

    out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + ε),     S = Σ_j φ(k_j) v_jᵀ  [Dh, Dh],     z = Σ_j φ(k_j)  [Dh]

Shapes: ``q, k, v: [B, H, N, Dh]`` -> ``[B, H, N, Dh]``. Taking ``φ(K)ᵀ V`` first costs ``O(N·Dh²)`` time and
``O(N·Dh + Dh²)`` memory; no ``N x N`` matrix is formed.

Choices, as the authors' code (idiap/fast-transformers ``LinearAttention``): no ``1/√Dh`` scaling (the
normaliser cancels any scale of ``φ``, except against ``ε``); ``ε = eps`` (1e-6) is added to the
denominator. Padding: ``φ(k_j)`` is zeroed at padded keys (as their ``key_lengths`` mask), so padded keys
are in neither ``S`` nor ``z``; ``v`` is already zero there (``QKVAttention``).

Harness quirk avoided: the Nyströmformer LRA harness (``attention_linear.py``) returns ``φ(Q)(φ(K)ᵀV)``
without the normaliser (and scales ``φ`` by ``Dh^-1/4``); here the normaliser is always applied.

LRA's code (``models/linear_transformer/linear_attention.py``, ``protocol=lra``) computes the same ``φ``, sums
and ``ε`` but never applies the padding mask (an upstream bug: its masking branch builds an unused object) and
drops no attention weights: ``mask_padding=False`` reproduces that, padded positions' keys and values, as
projected, entering ``S`` and ``z`` (``zero_padded_values = False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lra.attention import register
from lra.attention.base import QKVAttention


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1``, elementwise, strictly positive."""
    return F.elu(x) + 1


@register("linear")
class LinearAttention(QKVAttention):
    """Linear Transformer attention with the ``elu + 1`` feature map and its normaliser (see the module doc).

    Options: ``eps`` (1e-6, added to the normaliser), ``mask_padding`` (True; False: LRA's unmasked sums),
    ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, mask_padding: bool = True,
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        self.eps, self.mask_padding = eps, mask_padding
        self.zero_padded_values = mask_padding

    def attend(self, q, k, v, mask):
        phi_q = elu_feature_map(q)  # [B, H, N, Dh]
        phi_k = elu_feature_map(k)
        if self.mask_padding:
            phi_k = phi_k * mask[:, None, :, None].to(k.dtype)
        kv = phi_k.transpose(-1, -2) @ v  # S: [B, H, Dh, Dh]
        normaliser = phi_q @ phi_k.sum(-2)[..., None]  # φ(q_i)ᵀ z: [B, H, N, 1]
        return (phi_q @ kv) / (normaliser + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, mask_padding={self.mask_padding}"
