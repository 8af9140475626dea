"""Linformer attention (Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020).

Keys and values are projected along the sequence axis to ``k`` rows by learned matrices ``E, F: [k, n]``
(``n = seq_len``), then softmax attention runs over those ``k`` rows. Per head, with ``d = Dh``::

    K̄ = E · K      V̄ = F · V      [B, H, k, Dh]
    out = softmax(Q K̄ᵀ / √d) · V̄    [B, H, N, Dh]        (the softmax over the k projected rows)

Cost ``O(N·k·Dh)`` time and ``O(N·k)`` memory; no ``N x N`` matrix.

Lengths. ``E, F`` are parameters of shape ``[H or 1, k, seq_len]``, so ``seq_len`` is an option (the model
config sets ``${data.seq_len}`` and the encoder replaces it by the length it attends over, CLS token
included). A forward with ``N < seq_len`` uses the first ``N`` columns, which is exactly the result of padding
the input to ``seq_len`` (padded positions contribute nothing, see below); ``N > seq_len`` is an error.

Padding (``mask_padding=True``, default), as the Nyströmformer harness: keys and values are zeroed at padded
positions before the projection (``K̄ = E · (K ⊙ mask)``), so a padded token reaches no projected row. In
addition, a projected key row that no real token reaches (its row of ``E`` is zero on every real position) is
masked out of the softmax: with dense projections this never happens (the harness has no such mask and
computes the same), and with ``k = n`` identity projections it makes the output exactly softmax attention with
padded keys masked (tested). ``mask_padding=False`` is LRA's code (``models/linformer/linformer_attention.py``:
the padding mask is never passed to the attention, an upstream bug): padded positions' keys and values, as
projected, are mixed into every projected row (``zero_padded_values = False``).

Options (the paper's variants; defaults = the paper's general form):

- ``k`` (256, the Nyströmformer harness's size for the ``nystrom`` protocol; LRA: 16).
- ``share_kv`` (False): ``F = E`` within the layer ("key-value sharing").
- ``share_heads`` (False): one ``E`` (and ``F``) for all heads of the layer ("headwise sharing"; the
  authors' fairseq code and LRA's code share across heads, the Nyströmformer harness has one matrix per head).
- ``share_layers`` (False): one ``E`` (and ``F``) for every layer of the encoder ("layerwise sharing"): the
  attention lists its projections in ``layer_shared_parameters`` and the encoder ties them to the first
  block's, so the encoder holds one tensor and its gradient sums every layer's. The Nyströmformer harness
  (``LRA/code/attention_linformer.py``) keeps ``E`` in a class attribute: one ``[H, k, max_seq_len]`` matrix
  for keys, values and every layer (``share_kv`` and ``share_layers``, per head), a deliberate sharing
  (recipe_model/nystrom_linformer.yaml).
- ``init`` (``normal``): ``E, F ~ N(0, init_std²)`` with ``init_std`` 0.02, the Nyströmformer harness's init;
  ``xavier``: Glorot-uniform over the ``[seq_len, k]`` kernel, ``U(±√(6 / (seq_len + k)))``, as LRA's
  ``lr_kernel`` (fairseq also uses Xavier).
- ``dropout`` (0.0): on the attention probabilities (the harness has none; LRA's Linformer uses the
  attention dropout rate).

LRA's Linformer (``protocol=lra``): ``k = 16``, ``share_kv``, ``share_heads``, ``init: xavier``,
``mask_padding: false``, one kernel per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention

INITS = ("normal", "xavier")


def project(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E X`` along the sequence: ``e: [H or 1, k, N]``, ``x: [B, H, N, Dh]`` -> ``[B, H, k, Dh]``.

    As an einsum, so that a shared ``E`` is not expanded to ``[B, H, k, N]`` and copied (as ``e @ x`` does).
    """
    if e.shape[0] == 1:
        return torch.einsum("rn,bhnd->bhrd", e[0], x)
    return torch.einsum("hrn,bhnd->bhrd", e, x)


@register("linformer")
class LinformerAttention(QKVAttention):
    """Softmax attention over keys and values projected along the sequence (see the module doc).

    Options: ``k`` (256), ``seq_len`` (4096; set by the config to ``${data.seq_len}``), ``share_kv`` (False),
    ``share_heads`` (False), ``share_layers`` (False), ``init`` (``normal`` | ``xavier``), ``init_std``
    (0.02), ``mask_padding`` (True), ``dropout`` (0.0), ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, k: int = 256, seq_len: int = 4096, share_kv: bool = False,
                 share_heads: bool = False, share_layers: bool = False, init: str = "normal",
                 init_std: float = 0.02, mask_padding: bool = True, dropout: float = 0.0, qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        if k < 1 or seq_len < 1 or init not in INITS:
            raise ValueError(f"linformer: k and seq_len must be >= 1 and init one of {INITS}, got k={k}, "
                             f"seq_len={seq_len}, init={init!r}; fix the options in configs/model/linformer.yaml "
                             f"or the command-line override")
        self.k, self.seq_len, self.share_kv, self.share_heads = k, seq_len, share_kv, share_heads
        self.share_layers, self.init, self.mask_padding = share_layers, init, mask_padding
        self.zero_padded_values = mask_padding
        shape = (1 if share_heads else num_heads, k, seq_len)
        self.key_projection = nn.Parameter(self._initial(shape, init, init_std))  # E
        self.value_projection = None if share_kv else nn.Parameter(self._initial(shape, init, init_std))  # F
        # tied across the encoder's layers by the encoder (lra.models.encoder.Encoder)
        self.layer_shared_parameters = (
            () if not share_layers else ("key_projection",) if share_kv else ("key_projection", "value_projection"))
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _initial(shape, init: str, std: float) -> torch.Tensor:
        if init == "normal":
            return torch.randn(shape) * std
        bound = math.sqrt(6.0 / (shape[-1] + shape[-2]))  # Glorot uniform over the [seq_len, k] kernel
        return torch.empty(shape).uniform_(-bound, bound)

    def attend(self, q, k, v, mask):
        n = q.shape[-2]
        if n > self.seq_len:
            raise ValueError(
                f"linformer: the input has {n} positions but the projections E, F were built for seq_len="
                f"{self.seq_len}. Build the attention with seq_len >= {n} (model.options.seq_len in "
                f"configs/model/linformer.yaml; the encoder sets it to the length it attends over)."
            )
        e = self.key_projection[..., :n].to(q.dtype)  # [H or 1, k, N]
        f = e if self.value_projection is None else self.value_projection[..., :n].to(q.dtype)
        if not self.mask_padding:  # LRA: padded keys and values mixed in, no softmax mask
            scores = (q @ project(e, k).transpose(-1, -2)) * self.head_dim ** -0.5
            return self.dropout(torch.softmax(scores, dim=-1)) @ project(f, v)
        keep = mask.to(q.dtype)  # [B, N]
        k_low = project(e, k * keep[:, None, :, None])  # K̄: [B, H, k, Dh]
        v_low = project(f, v)  # V̄ (v is zero at padded positions)
        reached = torch.einsum("hrn,bn->bhr", e.detach().abs(), keep) > 0  # rows some real token reaches
        scores = (q @ k_low.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, H, N, k]
        scores = torch.where(reached[:, :, None, :], scores, torch.finfo(scores.dtype).min)  # one pass, no copy
        return self.dropout(torch.softmax(scores, dim=-1)) @ v_low

    def extra_repr(self) -> str:
        return (f"k={self.k}, seq_len={self.seq_len}, share_kv={self.share_kv}, share_heads={self.share_heads}, "
                f"share_layers={self.share_layers}, init={self.init}, mask_padding={self.mask_padding}")
