"""Shared base classes of the attention methods.

``AttentionBase`` fixes the call signature and the auxiliary-loss channel; ``QKVAttention`` adds the
query/key/value/output projections with one set of parameter names (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), so the same weights can be loaded into ``softmax`` and into any approximation built on
them and the two outputs compared (fidelity tests and reports).

Shapes: ``x: [B, N, D]``, ``mask: [B, N]`` bool (True = real token); the attention width ``A`` (``qkv_dim``,
default ``D``; LRA's image configs use ``A < D``) splits into heads ``A = H * Dh``, ``[B, H, N, Dh]``.
"""

from __future__ import annotations

import torch
from torch import nn


def in_fp32(fn, *tensors: torch.Tensor, mask: torch.Tensor):
    """``fn(*tensors, mask)`` computed in at least float32 with autocast off, cast back to ``tensors[0]``'s dtype.

    The Nyströmformer harness's "attention in fp32" (LRA/code/attention.py: projections under autocast, the
    attention core on ``Q.float(), K.float(), V.float()``); float64 inputs stay float64.
    """
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn(*(t.to(dtype) for t in tensors), mask).to(tensors[0].dtype)


class AttentionBase(nn.Module):
    """Interface of every attention: ``forward(x, mask) -> [B, N, D]``.

    Methods with a training objective of their own (e.g. Proxyformer's contrastive term) store it in
    ``self.aux_losses`` (name -> scalar tensor) during ``forward``; the LightningModule sums every
    attention's ``aux_losses`` into the training loss and logs each term separately. The dict is
    replaced at every forward, so it always belongs to the latest batch.
    """

    registry_name: str = "?"

    def __init__(self, dim: int, num_heads: int, inner_dim: int | None = None):
        super().__init__()
        inner_dim = inner_dim or dim
        if inner_dim % num_heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by num_heads={num_heads}")
        self.dim = dim  # model width D (input and output)
        self.inner_dim = inner_dim  # attention width A = H * Dh
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.aux_losses: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class QKVAttention(AttentionBase):
    """Attention computed from per-head queries, keys and values.

    ``forward`` projects ``x`` to ``q, k, v: [B, H, N, Dh]`` (``Linear(D, A)`` each, biases if ``qkv_bias``),
    calls ``attend(q, k, v, mask)`` (the method's own part, returning ``[B, H, N, Dh]``), merges the heads and
    applies ``out_proj`` (``Linear(A, D)``, a bias if ``out_bias``; LRA's flax attention has no biases at all).
    With ``fp32_core`` (set by the encoder under ``encoder.attention_fp32``) ``attend`` runs in at least float32
    with autocast off while the projections run in the model's precision, as the Nyströmformer harness does.
    Padded positions of ``v`` are zeroed before ``attend`` so no method can mix them into real outputs by accident;
    each method is still responsible for keeping padded keys out of its normalisations. A variant reproducing an
    upstream attention that ignores the padding mask altogether (LRA's fast attentions) sets
    ``zero_padded_values = False`` on its instance.

    ``mask_rule`` (methods that offer it: ``softmax``, ``sdpa``) says how the padding mask enters:

    * ``keys`` (default): padded keys get no weight, every query row (padded ones too) attends to the real keys,
      padded values are zeroed;
    * ``outer``: LRA's flax attention (flax ``nn.attention.make_padding_mask`` + ``SelfAttention``, as
      lra_benchmarks/models/transformer/transformer.py calls it): the pair ``(i, j)`` is allowed iff both
      ``i`` and ``j`` are real, a disallowed pair gets the score bias ``-1e10`` (added, not ``-inf``), values
      are not zeroed. A real query gives exactly 0 weight to padded keys (same outputs as ``keys``); a padded
      query has every score equal to ``-1e10`` in float32 and so attends **uniformly** to all ``N`` keys, padded
      ones included: its output is the mean of every value. This matters only where padded rows reach the
      output (LRA's MEAN pooling over all positions, a CLS token masked by ``cls_mask: first_token``).
    """

    fp32_core = False  # set by the encoder (``encoder.attention_fp32``): ``attend`` in at least float32
    zero_padded_values = True  # False: padded positions' values stay as projected (an upstream without masking)
    MASK_RULES = ("keys", "outer")

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qkv_dim: int | None = None,
                 out_bias: bool = True, mask_rule: str = "keys"):
        super().__init__(dim, num_heads, inner_dim=qkv_dim)
        if mask_rule not in self.MASK_RULES:
            raise ValueError(f"mask_rule must be one of {self.MASK_RULES}, got {mask_rule!r}")
        self.mask_rule = mask_rule
        self.q_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(self.inner_dim, dim, bias=out_bias)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, N, A] -> [B, H, N, Dh]``."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, Dh] -> [B, N, A]``."""
        b, h, n, dh = t.shape
        return t.transpose(1, 2).reshape(b, n, h * dh)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(x))
        v = self.v_proj(x)
        if self.zero_padded_values and self.mask_rule == "keys":
            v = v * mask[..., None].to(x.dtype)
        v = self.split_heads(v)
        if self.fp32_core:
            out = in_fp32(self.attend, q, k, v, mask=mask)
        else:
            out = self.attend(q, k, v, mask)
        return self.out_proj(self.merge_heads(out))

    def attend(self, q, k, v, mask):  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def outer_mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``mask_rule='outer'``'s score bias ``[B, 1, N, N]``: 0 where query and key are both real, else -1e10
        (half precision: half the dtype's lowest value, so that adding it to a score stays finite)."""
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        low = max(-1e10, torch.finfo(dtype).min / 2)
        return torch.zeros(pair.shape, dtype=dtype, device=mask.device).masked_fill(~pair, low)
