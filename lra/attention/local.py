"""Local attention (LRA's "Local Attention" baseline), plus the window helpers the sparse baselines reuse.

Per head, with ``S = Q Kᵀ / √Dh`` and an allowed key set ``A(i)`` for query ``i``::

    out_i = Σ_{j ∈ A(i), j real} softmax_j(S_ij) · V_j                 q, k, v: [B, H, N, Dh]

Patterns (``pattern``; ``w = window_size``):

- ``blocks`` (default): the sequence is cut into non-overlapping blocks of ``w`` consecutive tokens and
  ``A(i)`` is the block of ``i``. When ``w`` does not divide ``N`` the last block is padded internally;
  the internal padding is masked like padding and exactly ``N`` outputs are returned. Memory ``O(N w)``.
- ``sliding``: ``A(i) = {i − (w − ⌊w/2⌋) + 1, …, i + ⌊w/2⌋}``: ``w`` keys, ``i`` itself among them, with
  ``⌊w/2⌋`` after ``i`` and the rest before it (LRA's Longformer convention: symmetric for odd ``w``,
  one more to the left for even ``w``). Computed on query chunks of ``WINDOW_CHUNK`` tokens against
  their ``chunk + w − 1`` neighbouring keys, so memory is ``O(N (w + WINDOW_CHUNK))``, never ``N x N``.
- ``lra_strided``: the grouping LRA's code actually computes (google-research/long-range-arena,
  ``models/local/local_attention.py``). It pads ``N`` to ``N' = w (⌊N/w⌋ + 1)`` (a whole extra block
  when ``w`` divides ``N``), reshapes ``[N', …]`` row-major to ``[w, N'/w, …]`` and attends over the
  first axis, so ``A(i) = {j : j ≡ i mod N'/w}``: ``w`` tokens strided ``N'/w`` apart, not a contiguous
  block. LRA's padding mask is reshaped the contiguous way, so it does not match these groups (and its
  internal padding counts as real); here only the grouping is reproduced, with correct masking.
- ``lra_exact``: what LRA's code computes, its bugs included (``protocol=lra``): the strided groups of
  ``lra_strided``; the internal padding slots are zero keys and values counted as real (LRA pads the inputs
  with zeros and pads its bool mask with ``-1e9``, i.e. ``True``; with no biases their projections are zero);
  and the padding mask reshaped contiguously, so in group ``j`` the weight of query slot ``i_q`` on key slot
  ``i_k`` (positions ``i_q G + j`` and ``i_k G + j``) is allowed iff positions ``j w + i_q`` and ``j w + i_k``
  are real, which are other tokens. A row with nothing allowed is uniform over its group (LRA's ``-1e10``
  bias on every entry). Padded positions' values are not zeroed (``zero_padded_values = False``), since such
  uniform rows read them. Real outputs depend on the padding.

Padding (every pattern but ``lra_exact``): padded and internally padded keys are excluded from every
softmax, so a real position's output never depends on the padding. A padded query whose allowed keys are all
padding gets uniform weights over zero values (never read). ``blocks`` with ``w >= N`` and ``sliding`` with
``w >= 2N`` are exact softmax attention (tested). ``dropout`` acts on the attention probabilities (LRA:
``attention_dropout_rate``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention

PATTERNS = ("blocks", "sliding", "lra_strided", "lra_exact")
WINDOW_CHUNK = 64  # query chunk of the sliding window: changes speed and memory, never the result


def check_positive(owner: str, **values: int) -> None:
    """A clear error for a size option below 1 (``owner`` names the attention and its config)."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: option {name} must be a positive integer, got {value!r}. "
                             f"Fix it in the `options:` block of configs/model/<model>.yaml or on the command line.")


def masked_scores(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Fresh ``scores`` with disallowed entries set, in place, to the dtype's minimum: exactly zero weight
    after a softmax (a row with nothing allowed gets finite weights, over keys whose values are zero)."""
    return scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)


def joint_softmax(parts, dropout: nn.Module) -> torch.Tensor:
    """One softmax over several key sets, applied to their values.

    ``parts``: ``(scores [..., R, C_p], values [..., C_p, Dh])`` pairs, scores already masked. Returns
    ``Σ_p P_p V_p: [..., R, Dh]`` with ``[P_1 | P_2 | …] = dropout(softmax([S_1 | S_2 | …]))``, computed
    as ``P_p = exp(S_p − logsumexp)`` with the log-sum-exp combined over the parts, so the concatenation
    is never materialised.
    """
    if len(parts) == 1:
        scores, values = parts[0]
        return dropout(torch.softmax(scores, dim=-1)) @ values
    lse = torch.logsumexp(parts[0][0], dim=-1, keepdim=True)
    for scores, _ in parts[1:]:
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1, keepdim=True))
    return sum(dropout(torch.exp(scores - lse)) @ values for scores, values in parts)


def pad_sequence(t: torch.Tensor, length: int, dim: int = -2, value=0) -> torch.Tensor:
    """``t`` zero-padded (or ``value``-padded) at the end of axis ``dim`` to ``length``."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1 if dim >= 0 else -dim - 1) + [0, extra]
    return F.pad(t, pad, value=value)


def block_attention(q, k, v, mask, block: int, dropout: nn.Module) -> torch.Tensor:
    """Softmax attention inside non-overlapping blocks of ``block`` consecutive positions.

    ``q, k, v: [B, H, N, Dh]``, ``mask: [B, N]``; ``N`` is padded internally to a multiple of ``block``.
    Returns ``[B, H, N, Dh]``.
    """
    b, h, n, d = q.shape
    nb = math.ceil(n / block)
    q, k, v = (pad_sequence(t, nb * block).view(b, h, nb, block, d) for t in (q, k, v))
    keep = pad_sequence(mask, nb * block, dim=1, value=False).view(b, 1, nb, 1, block)
    scores = masked_scores(q @ k.transpose(-1, -2) * d**-0.5, keep)  # [B, H, nb, block, block]
    return joint_softmax([(scores, v)], dropout).reshape(b, h, nb * block, d)[:, :, :n]


def window_parts(q, k, v, mask, before: int, after: int, first_key: int = 0):
    """Scores and values of a sliding window, for ``joint_softmax``, on query chunks.

    Query ``i`` may see keys ``i − before … i + after`` that are real and ``>= first_key`` (keys below it
    are given to the query in another part: Longformer's global tokens). Queries are cut into chunks of
    ``c = min(WINDOW_CHUNK, N)``; chunk ``m`` meets the ``c + before + after`` keys from ``m c − before`` on.
    Returns ``scores [B, H, nc, c, span]`` (masked), ``values [B, H, nc, span, Dh]``, and ``c``.
    """
    b, h, n, d = q.shape
    c = min(WINDOW_CHUNK, n)
    nc = math.ceil(n / c)
    span, total = c + before + after, nc * c + before + after

    def windows(t, value=0):  # [..., N, X] -> [..., nc, span, X], a strided view of the padded sequence
        t = F.pad(t, (0, 0, before, total - before - n), value=value)
        return t.unfold(-2, span, c).transpose(-1, -2)

    key_pos = torch.arange(-before, total - before, device=q.device).unfold(0, span, c)  # [nc, span]
    query_pos = torch.arange(nc * c, device=q.device).view(nc, c)
    offset = key_pos[:, None, :] - query_pos[:, :, None]  # [nc, c, span]
    allowed = (offset >= -before) & (offset <= after) & (key_pos >= first_key)[:, None, :]
    real = windows(mask[..., None], value=False)[..., 0]  # [B, nc, span]
    allowed = allowed[None, None] & real[:, None, :, None, :]  # [B, 1, nc, c, span]
    q_chunks = pad_sequence(q, nc * c).view(b, h, nc, c, d)
    scores = masked_scores(q_chunks @ windows(k).transpose(-1, -2) * d**-0.5, allowed)
    return scores, windows(v), c


def unchunk(out: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, nc, c, Dh] -> [B, H, N, Dh]`` (drops the chunk padding)."""
    b, h, nc, c, d = out.shape
    return out.reshape(b, h, nc * c, d)[:, :, :n]


@register("local")
class LocalAttention(QKVAttention):
    """Local attention (see the module doc). Options: ``window_size`` (50, LRA's ``block_size``),
    ``pattern`` (``blocks`` | ``sliding`` | ``lra_strided`` | ``lra_exact``), ``dropout``, ``qkv_bias``,
    ``qkv_dim``, ``out_bias``."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 50, pattern: str = "blocks",
                 dropout: float = 0.0, qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_positive("local attention", window_size=window_size)
        if pattern not in PATTERNS:
            raise ValueError(f"local attention: option pattern must be one of {PATTERNS}, got {pattern!r}. "
                             f"Fix it in configs/model/local.yaml or on the command line.")
        self.window_size, self.pattern = window_size, pattern
        self.zero_padded_values = pattern != "lra_exact"
        self.dropout = nn.Dropout(dropout)

    def attend(self, q, k, v, mask):
        w, n = self.window_size, q.shape[-2]
        if self.pattern == "blocks":
            return block_attention(q, k, v, mask, w, self.dropout)
        if self.pattern == "sliding":
            scores, values, _ = window_parts(q, k, v, mask, before=w - w // 2 - 1, after=w // 2)
            return unchunk(joint_softmax([(scores, values)], self.dropout), n)
        groups = n // w + 1  # lra_strided: LRA pads to w * (n // w + 1) and groups i ≡ j mod groups
        b, h, _, d = q.shape
        if self.pattern == "lra_exact":
            q, k, v = (pad_sequence(t, groups * w).view(b, h, w, groups, d).transpose(2, 3) for t in (q, k, v))
            contiguous = pad_sequence(mask, groups * w, dim=1, value=True).view(b, 1, groups, w)  # LRA's mask
            allowed = contiguous[..., :, None] & contiguous[..., None, :]  # [B, 1, G, w, w]
            scores = masked_scores(q @ k.transpose(-1, -2) * d**-0.5, allowed)  # [B, H, G, w, w]
            out = joint_softmax([(scores, v)], self.dropout)
            return out.transpose(2, 3).reshape(b, h, groups * w, d)[:, :, :n]
        q, k, v = (pad_sequence(t, groups * w).view(b, h, w, groups, d).transpose(2, 3) for t in (q, k, v))
        keep = pad_sequence(mask, groups * w, dim=1, value=False).view(b, w, groups).transpose(1, 2)
        out = block_attention(*(t.reshape(b, h, groups * w, d) for t in (q, k, v)),
                              keep.reshape(b, groups * w), w, self.dropout)
        return out.view(b, h, groups, w, d).transpose(2, 3).reshape(b, h, groups * w, d)[:, :, :n]

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, pattern={self.pattern}"
