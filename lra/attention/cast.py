"""CAST: Clustering self-Attention using Surrogate Tokens (van Engelenhoven, Strisciuglio & Talavera, 2024).

There is no public code for CAST. This module is written from the method as the paper's abstract and this
project's design notes describe it (learnable surrogate tokens, a cluster affinity matrix, Top-K or
single-assignment Top-K clustering, softmax attention inside each cluster, cluster summaries, combination
weighted by query-to-surrogate attention); the paper's full equations could not be consulted while writing
it, so every detail beyond that description is a choice, listed below and exposed as an option.

Per head, with ``q, k, v: [B, H, N, Dh]``, ``C = num_clusters`` surrogates ``S: [H, C, Dh]`` and
``κ = cluster_size``::

    A_q = Q Sᵀ / √Dh,  A_k = K Sᵀ / √Dh                                   [B, H, N, C]
    P_q = softmax over surrogates of A_q        (query-to-surrogate attention, rows sum to 1)
    P_k = softmax over real tokens of A_k       (key-to-surrogate attention, columns sum to 1)
    R   = P_kᵀ V                                (cluster summaries)          [B, H, C, Dh]
    A_g = σ(A_q) + σ(A_k)        (affinity="sigmoid")
        | softmax_C(A_q) + softmax_C(A_k)   (affinity="softmax")            [B, H, N, C]
    I_c = the κ tokens chosen for cluster c from A_g (``clustering``, below)   [B, H, C, κ]
    Y_c = softmax(Q_{I_c} K_{I_c}ᵀ / √Dh) V_{I_c}   (attention inside cluster c)  [B, H, C, κ, Dh]
    out_i = Σ_{c : i ∈ I_c} P_q[i, c] · Y_c[i]  +  Σ_{c : i ∉ I_c} P_q[i, c] · R_c

so every token mixes, with its own query-to-surrogate weights, its intra-cluster result for each cluster it
belongs to and the summary of every other cluster; a token in no cluster gets ``P_q[i] R`` only. It is
computed as ``P_q R + Σ_{slots} P_q[i, c] (Y_c[i] − R_c)`` with one batched gather and one scatter-add.

Clustering (``clustering``):

- ``topk``: every cluster takes the κ tokens with the highest affinity ``A_g[:, c]``; a token may be in
  several clusters or in none.
- ``single_topk`` (the paper's SA Top-K): every token is assigned to its highest-affinity cluster only, and
  each cluster keeps the κ of its assigned tokens with the highest affinity; tokens beyond a cluster's
  capacity are in no cluster (they still get the summaries). This is the parallel (one top-k) reading of
  "single assignment"; a greedy cluster-by-cluster variant would instead move overflowing tokens to a
  later cluster.

Padding: padded tokens get ``A_g = -inf`` before the top-k, so they are never chosen; a cluster slot holding
no real token (fewer real tokens than κ, or fewer assigned ones under ``single_topk``) is masked out as a
key and carries zero output weight; padded keys get zero weight in ``P_k`` (summaries). Padded positions
themselves get ``P_q R`` (never read). A real token's output does not depend on the padding, except through
``κ = ⌈N / C⌉`` (``cluster_size: null``), which uses the padded length ``N``.

Choices (not fixed by the description we followed): the ``1/√Dh`` scale on the surrogate affinities; the
combination rule ``A_g`` (``affinity``); surrogates drawn from ``N(0, 1/Dh)`` per head; the clustering is
computed without gradient (top-k is piecewise constant), in float32 for stable ranking in low precision;
surrogates learn through ``P_q`` and ``P_k``; ``dropout`` acts on the intra-cluster attention probabilities.

Exact limit: with one cluster holding every real token (``num_clusters=1``, ``cluster_size >= N``),
``P_q = 1`` and ``Y`` is softmax attention over the real tokens, so ``out`` equals ``softmax`` attention at
every real position with the same projection weights.

Cost: ``O(B H (N C + C κ²) Dh)`` time and ``O(B H (N C + C κ²))`` memory, never an ``N x N`` matrix. With
the default ``κ = ⌈N / C⌉`` and ``C`` fixed (the surrogates are parameters) the ``C κ² = N² / C`` term is
quadratic in ``N`` with a ``1 / C`` constant: doubling ``N`` costs up to 4x once that term dominates (measured
on CPU: about 2.5-3x from 4K to 8K tokens at ``C = 32``). A fixed ``cluster_size`` makes the cost linear
(the paper's ``O(αN)`` with ``α`` set by the number and size of clusters), but then ``C κ`` may cover fewer
tokens than ``N``; the others get the summaries only. Under ``topk`` overlapping clusters add into
the same token through a scatter-add, whose summation order on GPU is fixed only under
``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention

CLUSTERINGS = ("topk", "single_topk")
AFFINITIES = ("sigmoid", "softmax")


@register("cast")
class CASTAttention(QKVAttention):
    """CAST attention. Options: ``num_clusters`` (surrogates per head), ``cluster_size`` (κ; ``None`` =
    ``ceil(N / num_clusters)`` at forward), ``clustering`` (``topk`` | ``single_topk``), ``affinity``
    (``sigmoid`` | ``softmax``), ``dropout`` (on intra-cluster probabilities), ``qkv_bias``, ``qkv_dim``,
    ``out_bias``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int = 32,
        cluster_size: int | None = None,
        clustering: str = "topk",
        affinity: str = "sigmoid",
        dropout: float = 0.0,
        qkv_bias: bool = True,
        qkv_dim: int | None = None,
        out_bias: bool = True,
    ):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        if clustering not in CLUSTERINGS:
            raise ValueError(f"cast: clustering must be one of {CLUSTERINGS}, got {clustering!r}")
        if affinity not in AFFINITIES:
            raise ValueError(f"cast: affinity must be one of {AFFINITIES}, got {affinity!r}")
        if num_clusters < 1 or (cluster_size is not None and cluster_size < 1):
            raise ValueError(f"cast: need num_clusters >= 1 and cluster_size >= 1 (or None), got "
                             f"num_clusters={num_clusters}, cluster_size={cluster_size}")
        self.num_clusters, self.cluster_size = num_clusters, cluster_size
        self.clustering, self.affinity = clustering, affinity
        surrogates = torch.randn(num_heads, num_clusters, self.head_dim) / math.sqrt(self.head_dim)
        self.surrogates = nn.Parameter(surrogates)  # S: [H, C, Dh]
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def cluster(self, a_q: torch.Tensor, a_k: torch.Tensor, mask: torch.Tensor, size: int):
        """The clusters from the affinities ``a_q, a_k: [B, H, N, C]``: token indices ``[B, H, C, size]`` and
        ``valid [B, H, C, size]`` (the slot holds a real token eligible for that cluster)."""
        a_q, a_k = a_q.float(), a_k.float()
        if self.affinity == "sigmoid":
            a = torch.sigmoid(a_q) + torch.sigmoid(a_k)
        else:
            a = a_q.softmax(-1) + a_k.softmax(-1)
        a = a.masked_fill(~mask[:, None, :, None], float("-inf"))
        if self.clustering == "single_topk":  # keep only each token's best cluster
            best = a.argmax(-1, keepdim=True)
            a = torch.full_like(a, float("-inf")).scatter(-1, best, a.gather(-1, best))
        values, index = a.transpose(-1, -2).topk(size, dim=-1, sorted=False)
        return index, values.isfinite()

    def attend(self, q, k, v, mask):
        b, h, n, dh = q.shape
        c = self.num_clusters
        size = min(self.cluster_size or math.ceil(n / c), n)
        scale = dh**-0.5
        low = torch.finfo(q.dtype).min

        surrogates = self.surrogates.to(q.dtype)
        a_q = torch.einsum("bhnd,hcd->bhnc", q, surrogates) * scale
        a_k = torch.einsum("bhnd,hcd->bhnc", k, surrogates) * scale
        p_q = a_q.softmax(-1)  # over surrogates
        p_k = a_k.masked_fill(~mask[:, None, :, None], low).softmax(2)  # over tokens
        summaries = p_k.transpose(-1, -2) @ v  # [B, H, C, Dh]

        index, valid = self.cluster(a_q, a_k, mask, size)  # [B, H, C, κ]
        flat = index.flatten(2)[..., None].expand(-1, -1, -1, dh)  # [B, H, C·κ, Dh]

        def gather(t):
            return t.gather(2, flat).view(b, h, c, size, dh)

        scores = gather(q) @ gather(k).transpose(-1, -2) * scale  # [B, H, C, κ, κ]
        scores = scores.masked_fill(~valid[..., None, :], low)
        intra = self.dropout(scores.softmax(-1)) @ gather(v)  # [B, H, C, κ, Dh]

        weight = p_q.transpose(-1, -2).gather(-1, index) * valid  # P_q[i, c] of each slot
        delta = weight[..., None] * (intra - summaries[:, :, :, None])
        return (p_q @ summaries).scatter_add(2, flat, delta.flatten(2, 3))
