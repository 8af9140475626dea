"""Sparse Sinkhorn attention (Tay, Bahri, Yang, Metzler & Juan, ICML 2020), the non-causal encoder form.

The sequence is cut into ``nb = ⌈N / b⌉`` blocks of ``b = block_size`` tokens (the last one padded
internally; exactly ``N`` outputs are returned). Per head, with ``K_j, V_j: [b, Dh]`` the keys and values
of block ``j`` (padded keys zeroed)::

    x_j   = Σ_{t ∈ block j} K_t                                   block summaries       [B, H, nb, Dh]
    R_ij  = P(x_i)_j,  P(x) = ReLU(W_2 ReLU(W_1 x + b_1) + b_2)    sorting network       [B, H, nb, nb]
    S     = Sinkhorn((R + ε) / τ)                                  ≈ doubly stochastic   [B, H, nb, nb]
    K̂_i   = Σ_j S_ij K_j,   V̂_i = Σ_j S_ij V_j                     block i "sorted"      [B, H, nb, b, Dh]

and the queries of block ``i`` attend to their own block (``K_i, V_i``) and to the sorted block
(``K̂_i, V̂_i``). ``Sinkhorn`` runs ``sinkhorn_iterations`` rounds of row then column normalisation in log
space (in float32 at least) and exponentiates (columns then sum to 1 exactly, rows approximately, exactly
as the iterations grow); ``ε`` is Gumbel noise, added in training only when
``gumbel_noise`` (Gumbel-Sinkhorn), so evaluation is deterministic. ``τ = temperature``.

Choices the paper leaves open or that differ between implementations (options where they matter):

- ``combine``: ``sum`` adds a softmax over the own block and a softmax over the sorted block, as the
  authors' LRA code does (``x + sorted_x``); ``joint`` takes one softmax over both (lucidrains'
  ``sinkhorn-transformer``). The paper's text could not be consulted on this point while writing.
- The sorting network ``P`` is the paper's two-layer ReLU MLP; it reads each head's block sums of keys
  (as LRA's code does) and is shared by the heads. Its output layer has one unit per block of the longest
  sequence, ``⌈seq_len / b⌉`` (the paper's ``W_B ∈ R^{d x N_B}``), so ``seq_len`` must be given
  (``${data.seq_len}`` in the model config) and a longer input is an error; a shorter one uses the
  first ``nb`` units.
- Defaults ``sinkhorn_iterations = 7`` and ``τ = 0.75`` are the values lucidrains' reproduction cites as
  the paper's best; ``block_size = 50`` is LRA's.
- Not reproduced from LRA's code: its default ``sort_activation="softmax"`` (a row softmax instead of
  Sinkhorn), its sorting einsum (``'bskhd,bnhl->bsnhd'`` sums the block and permutation axes
  separately, so every "sorted" block is the sum of all blocks), and its strided block reshape (see
  ``lra.attention.local``). Causal Sinkhorn balancing and SortCut (decoder and truncation variants) are
  not implemented.

Padding: summaries sum real keys only; padded keys and values are zero before sorting. A sorted key slot
``(i, t)`` mixes token ``t`` of every block, so it gets the real share ``w_it = Σ_j S_ij m_jt / Σ_j S_ij``
(``m``: 1 for a real token) and its score ``+ log w_it`` (``w = 0``: masked). Without padding ``w = 1`` and
the rule changes nothing; with a hard permutation it is exactly attention to the permuted real tokens
(tested against a dense reference), and a sorted block without real tokens contributes nothing; with a
soft ``S`` it discounts slots that are mostly padding. Real outputs never depend on padded inputs, though
they depend on how many blocks ``N`` has (the Sinkhorn matrix is ``nb x nb``).

Exact limit: with one block (``block_size >= N``) ``S = [[1]]``, so ``joint`` is exact softmax attention
and ``sum`` is twice it (tested). Cost: ``O(N b + nb²)`` memory, never ``N x N``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.local import check_positive, joint_softmax, masked_scores, pad_sequence

COMBINES = ("sum", "joint")


def sinkhorn(log_alpha: torch.Tensor, iterations: int) -> torch.Tensor:
    """``exp`` of ``log_alpha: [..., n, n]`` after ``iterations`` rounds of row, then column, normalisation
    in log space: the columns of the result sum to 1, and the rows do as the iterations grow."""
    for _ in range(iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha.exp()


@register("sinkhorn")
class SinkhornAttention(QKVAttention):
    """Sparse Sinkhorn attention (see the module doc). Options: ``seq_len`` (longest input; the sorting
    network has ``⌈seq_len / block_size⌉`` outputs), ``block_size`` (50), ``sinkhorn_iterations`` (7),
    ``temperature`` (0.75), ``gumbel_noise`` (in training; True), ``combine`` (``sum`` | ``joint``),
    ``dropout``, ``qkv_bias``, ``qkv_dim``, ``out_bias``."""

    def __init__(self, dim: int, num_heads: int, seq_len: int = 4096, block_size: int = 50,
                 sinkhorn_iterations: int = 7, temperature: float = 0.75, gumbel_noise: bool = True,
                 combine: str = "sum", dropout: float = 0.0, qkv_bias: bool = True, qkv_dim: int | None = None,
                 out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_positive("sinkhorn attention", seq_len=seq_len, block_size=block_size,
                       sinkhorn_iterations=sinkhorn_iterations)
        if combine not in COMBINES:
            raise ValueError(f"sinkhorn attention: option combine must be one of {COMBINES}, got {combine!r}. "
                             f"Fix it in configs/model/sinkhorn.yaml or on the command line.")
        if not temperature > 0:
            raise ValueError(f"sinkhorn attention: option temperature must be > 0, got {temperature!r}. "
                             f"Fix it in configs/model/sinkhorn.yaml or on the command line.")
        self.seq_len, self.block_size, self.combine = seq_len, block_size, combine
        self.sinkhorn_iterations, self.temperature, self.gumbel_noise = sinkhorn_iterations, temperature, gumbel_noise
        max_blocks = math.ceil(seq_len / block_size)
        self.sort_net = nn.Sequential(nn.Linear(self.head_dim, self.head_dim), nn.ReLU(),
                                      nn.Linear(self.head_dim, max_blocks), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def sorting_matrix(self, k_blocks: torch.Tensor) -> torch.Tensor:
        """``S: [B, H, nb, nb]`` from the blocked keys ``[B, H, nb, b, Dh]`` (padded keys zero)."""
        nb = k_blocks.shape[2]
        logits = self.sort_net(k_blocks.sum(-2))[..., :nb]  # R: [B, H, nb, nb]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.to(dtype)
            if self.training and self.gumbel_noise:
                uniform = torch.rand_like(logits).clamp(torch.finfo(dtype).tiny, 1.0)
                logits = logits - torch.log(-torch.log(uniform))
            return sinkhorn(logits / self.temperature, self.sinkhorn_iterations).to(k_blocks.dtype)

    def attend(self, q, k, v, mask):
        b, h, n, d = q.shape
        if n > self.seq_len:
            raise ValueError(f"sinkhorn attention got a sequence of {n} tokens but was built for seq_len="
                             f"{self.seq_len} (its sorting network scores ceil(seq_len / block_size) blocks). "
                             f"Set `model.options.seq_len` to the longest sequence the attention sees.")
        bs = self.block_size
        nb = math.ceil(n / bs)
        keep = pad_sequence(mask, nb * bs, dim=1, value=False).view(b, nb, bs)
        q, k, v = (pad_sequence(t, nb * bs).view(b, h, nb, bs, d) for t in (q, k, v))
        k = k * keep[:, None, :, :, None].to(k.dtype)
        s = self.sorting_matrix(k)
        sorted_k, sorted_v = (torch.einsum("bhij,bhjtd->bhitd", s, t) for t in (k, v))
        precise = s.to(torch.promote_types(s.dtype, torch.float32))  # w: the real share of each sorted slot
        weight = torch.einsum("bhij,bjt->bhit", precise, keep.to(precise.dtype)) / precise.sum(-1)[..., None]
        weight = weight[:, :, :, None, :]  # [B, H, nb, 1, bs]
        log_weight = weight.clamp_min(torch.finfo(precise.dtype).tiny).log().to(q.dtype)
        q = q * d**-0.5
        local = masked_scores(q @ k.transpose(-1, -2), keep[:, None, :, None, :])
        sorted_scores = masked_scores(q @ sorted_k.transpose(-1, -2) + log_weight, weight > 0)
        if self.combine == "joint":
            out = joint_softmax([(local, v), (sorted_scores, sorted_v)], self.dropout)
        else:
            out = joint_softmax([(local, v)], self.dropout) + joint_softmax([(sorted_scores, sorted_v)], self.dropout)
        return out.reshape(b, h, nb * bs, d)[:, :, :n]

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, block_size={self.block_size}, combine={self.combine}, "
                f"sinkhorn_iterations={self.sinkhorn_iterations}, temperature={self.temperature}, "
                f"gumbel_noise={self.gumbel_noise}")
