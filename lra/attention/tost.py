"""Token Statistics Self-Attention, TSSA (ToST; Wu et al., "Token Statistics Transformer: Linear-Time
Attention via Variational Rate Reduction", ICLR 2025).

Follows ``AttentionTSSA`` of the authors' code (github.com/RobinWu218/ToST, ``tost_vision/tost.py``): one
projection ``W`` per head (``qkv``, a single ``dim -> qkv_dim`` linear map, ``qkv_dim`` = ``dim`` by default, shared
by the query/key/value roles), a learned per-head temperature ``temp: [H, 1]`` initialised to ones, and per head
(``w: [B, H, N, Dh]``)::

    w  = x W                                                     (split into heads)
    ŵ  = w / max(‖w‖₂ over tokens, 1e-12)                        (F.normalize over the token axis)
    Π  = softmax over heads of ( temp_h · Σ_d ŵ² )               [B, H, N]   (paper Eq. 10)
    s  = Σ_n (Π_n / (Σ_n Π_n + 1e-8)) · w_n²                     [B, H, 1, Dh] (weighted second moment)
    y  = −(w ⊙ Π) ⊙ Dropout(1 / (1 + s))                         [B, H, N, Dh]
    out = out_proj(merge_heads(y))

exactly in the authors' order, with their constants (the ``1e-12`` of ``F.normalize``, the ``+1e-8`` of the
normaliser) and their attention dropout (``attn_drop``, here ``dropout``) on the factor ``1 / (1 + s)``.
Cost ``O(B N D)`` time and memory. Differences from the authors' module, all for this repository:

- Masking (absent from the authors' code): padded tokens get ``w = 0`` before the token normalisation (so
  they do not enter ``‖w‖``) and ``Π = 0`` (so they do not enter ``Σ Π`` nor ``s``); their output is
  ``out_proj(0)``. Real tokens' outputs equal those of the same sequence without padding.
- Names: ``to_out = Sequential(Linear, Dropout(proj_drop))`` is ``out_proj`` here; the block's residual
  dropout plays the role of ``proj_drop``. ``qkv_bias`` defaults to ``True`` as in every ToST model the
  authors register (the class default there is ``False``).
- The authors exclude ``temp`` from weight decay; so does this module (``no_weight_decay``, honoured by
  ``lra.module.LRAModule``).

Length: each of the ``Dh`` columns of ``ŵ`` has unit norm over the tokens, so the energies ``Σ_d ŵ²`` of the
``N`` real tokens sum to exactly ``Dh`` (``token_energy``) and average ``Dh / N``. With ``temp`` near its initial
1, the softmax over heads then sees nearly equal inputs at LRA lengths and ``Π ≈ 1/H`` for every token: a token's
output is then ``−w/H · 1/(1 + s)``, and it sees the other tokens only through ``s``. (Measured on this suite's
ListOps runs, ``protocol=nystrom``, seed 0: ``Π`` varies over the tokens of a sequence with standard deviation
0.002-0.003 at ~1100 real tokens and 0.21-0.22 at ~19; ``temp`` still within 0.01 of 1 after training, 0.04 in the
``quick`` run.) The authors' causal
language model (``tost_lang/model_TSSA.py``) normalises by a running sum instead and adds a learned per-position
term ``denom_bias`` to the energies; the vision operator followed here has no such term, and no bidirectional
variant with one has been published, so none is offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lra.attention import register
from lra.attention.base import AttentionBase


def token_energy(w: torch.Tensor) -> torch.Tensor:
    """``Σ_d ŵ²`` with ``ŵ = w / max(‖w‖₂ over tokens, 1e-12)``: ``w: [B, H, N, Dh]`` -> ``[B, H, N]``.

    Padded tokens must have ``w = 0`` (their energy is then 0). Over the tokens it sums to the number of nonzero
    columns of ``w`` (``Dh`` in practice), whatever ``N``.
    """
    return F.normalize(w, dim=-2).square().sum(-1)


@register("tost")
class TSSAttention(AttentionBase):
    """Token Statistics Self-Attention. Options: ``dropout`` (on ``1 / (1 + s)``, the authors' ``attn_drop``),
    ``qkv_bias`` (bias of the shared projection ``W``), ``qkv_dim`` (width of ``W``'s output, default ``dim``),
    ``out_bias`` (bias of the output projection)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, inner_dim=qkv_dim)
        self.qkv = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.temp = nn.Parameter(torch.ones(num_heads, 1))
        self.attn_drop = nn.Dropout(dropout)
        self.out_proj = nn.Linear(self.inner_dim, dim, bias=out_bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer must not decay (as in the authors' model)."""
        return {"temp"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        real = mask[:, None, :]  # [B, 1, N]
        w = self.qkv(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        w = w * real[..., None].to(w.dtype)  # padded tokens: w = 0, out of ‖w‖ over tokens
        w_sq = w.square()
        pi = torch.softmax(token_energy(w) * self.temp, dim=1) * real  # over heads; padded tokens: Π = 0
        s = (pi / (pi.sum(-1, keepdim=True) + 1e-8)).unsqueeze(-2) @ w_sq  # [B, H, 1, Dh]
        y = -(w * pi[..., None]) * self.attn_drop(1.0 / (1.0 + s))
        return self.out_proj(y.transpose(1, 2).reshape(b, n, self.inner_dim))
