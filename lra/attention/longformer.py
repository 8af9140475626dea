"""Longformer attention (Beltagy, Peters & Cohan, 2020): sliding window plus global tokens.

Per head, with ``w = window_size``, ``g = min(num_global, N)`` global tokens (the first ``g`` positions:
the CLS token under ``cls`` pooling) and ``S = Q Kᵀ / √Dh``::

    non-global query i:  A(i) = {i − (w − ⌊w/2⌋) + 1, …, i + ⌊w/2⌋} ∪ {0, …, g − 1}
                         out_i = Σ_{j ∈ A(i), j real} softmax_j(S_ij) V_j            (one softmax)
    global query i < g:  out_i = Σ_{j real} softmax_j(Q^g_i K^gᵀ_j / √Dh) V^g_j      (every token)

so every token sees the global tokens and the global tokens see everything ("symmetric" global attention).
The window holds ``w`` keys, ``i`` itself among them, ``⌊w/2⌋`` after it and the rest before it (the
convention of LRA's ``longformer_attention.py``; the paper's ``w/2`` on each side plus ``i`` is
``window_size = w + 1``). A global key inside a window is counted once.

Global projections (``global_projections``): the paper computes the global tokens' rows with separate
projections ``Q_g, K_g, V_g`` (``q_global_proj``, ``k_global_proj``, ``v_global_proj``), as LRA's code
does; the non-global rows use the ordinary ``K, V`` for the global keys too. ``False`` uses ``Q, K, V``
everywhere (the module then has exactly ``softmax``'s parameters). LRA's runs passed no global mask at
all (``global_mask=None``), i.e. ``num_global: 0``; the default here makes the first token global.
LRA's Longformer (``protocol=lra``, recipe_model/lra_longformer.yaml) is ``num_global: 0`` with
``global_projections: false`` (LRA's global projections exist but never reach the output), no biases.
Dilated windows and the autoregressive variant are not implemented (as in LRA and the Hugging Face port).

Cost: the window is computed on query chunks (``lra.attention.local.window_parts``) and the global rows
are ``g x N``, so memory is ``O(N (w + g))``, never ``N x N``. Padded keys are kept out of every softmax,
so padding never reaches a real output. With ``w >= 2N`` (every key in every window) the output is exact
softmax attention; with separate global projections, once they hold the same weights as ``Q, K, V``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention, in_fp32
from lra.attention.local import check_positive, joint_softmax, masked_scores, unchunk, window_parts


@register("longformer")
class LongformerAttention(QKVAttention):
    """Longformer attention (see the module doc). Options: ``window_size`` (512: LRA's
    ``sliding_window_size``), ``num_global`` (first tokens that are global; 1), ``global_projections``
    (separate ``Q_g, K_g, V_g`` for the global rows; True), ``dropout``, ``qkv_bias``, ``qkv_dim``, ``out_bias``."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 512, num_global: int = 1,
                 global_projections: bool = True, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_positive("longformer attention", window_size=window_size)
        if not isinstance(num_global, int) or num_global < 0:
            raise ValueError(f"longformer attention: option num_global must be an integer >= 0, got {num_global!r}. "
                             f"Fix it in configs/model/longformer.yaml or on the command line.")
        self.window_size, self.num_global = window_size, num_global
        if global_projections:
            self.q_global_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
            self.k_global_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
            self.v_global_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.global_projections = global_projections
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.global_projections:
            return super().forward(x, mask)
        keep = mask[..., None].to(x.dtype)
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        qkv = [q, k, self.split_heads(self.v_proj(x) * keep)]
        core = self.attend
        if g := min(self.num_global, x.shape[1]):
            qkv += [self.split_heads(self.q_global_proj(x[:, :g])), self.split_heads(self.k_global_proj(x)),
                    self.split_heads(self.v_global_proj(x) * keep)]
            core = self._attend_with_global_projections
        out = in_fp32(core, *qkv, mask=mask) if self.fp32_core else core(*qkv, mask)
        return self.out_proj(self.merge_heads(out))

    def _attend_with_global_projections(self, q, k, v, q_g, k_g, v_g, mask):
        """``attend``'s rows for the non-global queries; the ``g`` global rows from their own projections."""
        out = self.attend(q, k, v, mask)
        return torch.cat([self.global_rows(q_g, k_g, v_g, mask), out[:, :, q_g.shape[2]:]], dim=2)

    def global_rows(self, q, k, v, mask):
        """Rows of the global queries ``q: [B, H, g, Dh]`` over every real key -> ``[B, H, g, Dh]``."""
        scores = masked_scores(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, mask[:, None, None, :])
        return joint_softmax([(scores, v)], self.dropout)

    def attend(self, q, k, v, mask):
        """Longformer attention with the same projections for global and non-global rows."""
        w, n = self.window_size, q.shape[-2]
        g = min(self.num_global, n)
        scores, values, c = window_parts(q, k, v, mask, before=w - w // 2 - 1, after=w // 2, first_key=g)
        parts = [(scores, values)]
        if g:
            global_scores = q @ k[:, :, :g].transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, N, g]
            nc = scores.shape[2]
            global_scores = F.pad(global_scores, (0, 0, 0, nc * c - n)).unflatten(2, (nc, c))
            parts.append((masked_scores(global_scores, mask[:, None, None, None, :g]), v[:, :, None, :g]))
        out = unchunk(joint_softmax(parts, self.dropout), n)
        if g:
            out = torch.cat([self.global_rows(q[:, :, :g], k, v, mask), out[:, :, g:]], dim=2)
        return out

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, num_global={self.num_global}, "
                f"global_projections={self.global_projections}")
