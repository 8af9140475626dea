"""Sparse Transformer attention (Child, Gray, Radford & Sutskever, 2019): the "fixed" pattern.

With ``l = block_size`` and ``c = summary_size``, query ``i`` may attend to key ``j`` when

    A1: ⌊j / l⌋ = ⌊i / l⌋                  (the block of i)
    A2: j mod l ∈ {l − c, …, l − 1}        (the last c positions of every block: the "summary" tokens)

and, with ``causal``, only when ``j <= i``. Both sets are merged in every head (the paper's "merged"
head variant, the one LRA uses; alternating the two sets over heads or layers is not offered). One
softmax of ``S = Q Kᵀ / √Dh`` runs over the real keys of ``A1 ∪ A2``, each key once. ``N`` is padded
internally to a multiple of ``l`` (masked; exactly ``N`` outputs), so a last partial block has summary
positions only where they exist (``j < N``).

LRA's code (``models/sparse_transformer/sparse_attention.py``; ``utils/train_utils.py`` always passes
``Fixed1Pattern(block_size=50) ∪ Fixed2Pattern(block_size=50, c=10)``, the model files' 128/32 are unused
defaults) differs in three ways, each an option here (recipe_model/lra_sparse.yaml sets them): every pattern is
causal, also in its encoders (``causal: true``; a bug in an encoder); its summary set is ``j mod l = 0 or
j mod l >= l − c`` (``summary_block_start: true``: ``c + 1`` tokens, a literal reading of the paper's
``{t, …, l}`` with ``l ≡ 0``); and when ``classifier_pool == 'CLS'`` it builds the pattern on the ``N − 1``
tokens after the first and makes the first token attend to and be attended by every token
(``first_token_global: true``; LRA does this on Retrieval too, where the first token is the first byte).

Cost: each query scores its ``l`` block keys and the ``c ⌈N/l⌉`` summary keys, so memory is
``O(N (l + c N / l))``: ``O(N √N)`` when ``l ~ √N`` as the paper chooses, a fixed fraction ``c / l`` of
``N²`` at a fixed ``l``. Padded keys are masked in both parts, so padding never reaches a real output.
``dropout`` acts on the attention probabilities.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.local import check_positive, joint_softmax, masked_scores, pad_sequence


@register("sparse")
class SparseAttention(QKVAttention):
    """Fixed-pattern sparse attention (see the module doc). Options: ``block_size`` (l = 128),
    ``summary_size`` (c = 32, <= l), ``causal`` (False), ``summary_block_start`` (False; True: also each
    block's first position, LRA), ``first_token_global`` (False; True: LRA's CLS row and column), ``dropout``,
    ``qkv_bias``, ``qkv_dim``, ``out_bias``."""

    def __init__(self, dim: int, num_heads: int, block_size: int = 128, summary_size: int = 32,
                 causal: bool = False, summary_block_start: bool = False, first_token_global: bool = False,
                 dropout: float = 0.0, qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_positive("sparse attention", block_size=block_size, summary_size=summary_size)
        if summary_size > block_size:
            raise ValueError(f"sparse attention: summary_size={summary_size} exceeds block_size={block_size}; "
                             f"the summary tokens are the last summary_size positions of each block. "
                             f"Fix configs/model/sparse.yaml or the command-line override.")
        self.block_size, self.summary_size, self.causal = block_size, summary_size, causal
        self.summary_block_start, self.first_token_global = summary_block_start, first_token_global
        self.dropout = nn.Dropout(dropout)

    def attend(self, q, k, v, mask):
        if not self.first_token_global or q.shape[-2] < 2:
            return self.pattern(q, k, v, mask)
        first = joint_softmax([(masked_scores(q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5,
                                              mask[:, None, None, :]), v)], self.dropout)  # attends to all
        rest = self.pattern(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], mask[:, 1:], (k[:, :, :1], v[:, :, :1], mask[:, :1]))
        return torch.cat([first, rest], dim=2)

    def pattern(self, q, k, v, mask, extra=None):
        """The fixed pattern over ``q, k, v: [B, H, N, Dh]``; ``extra = (k, v, mask)`` of keys every query also
        sees (LRA's CLS column)."""
        b, h, n, d = q.shape
        bl, c = self.block_size, self.summary_size
        nb = math.ceil(n / bl)
        q, k, v = (pad_sequence(t, nb * bl) for t in (q, k, v))
        keep = pad_sequence(mask, nb * bl, dim=1, value=False)  # [B, nb * bl]
        q_blocks = q.view(b, h, nb, bl, d) * d**-0.5

        # A1: the own block, [B, H, nb, bl, bl]
        allowed = keep.view(b, 1, nb, 1, bl)
        if self.causal:
            allowed = allowed & torch.ones(bl, bl, dtype=torch.bool, device=q.device).tril()
        own = masked_scores(q_blocks @ k.view(b, h, nb, bl, d).transpose(-1, -2), allowed)

        # A2: the summary positions of the other blocks (the own block's are in A1), [B, H, nb, bl, nb c]
        blocks = torch.arange(nb, device=q.device)
        offsets = sorted({0, *range(bl - c, bl)} if self.summary_block_start else range(bl - c, bl))
        summary = (blocks[:, None] * bl + torch.tensor(offsets, device=q.device)).flatten()  # [nb c']
        block_of_key, block_of_query = summary // bl, blocks[:, None]
        other = block_of_key < block_of_query if self.causal else block_of_key != block_of_query  # [nb, nb c]
        allowed = keep[:, None, None, None, summary] & other[None, None, :, None, :]
        summaries = masked_scores(q_blocks @ k[:, :, None, summary].transpose(-1, -2), allowed)

        parts = [(own, v.view(b, h, nb, bl, d)), (summaries, v[:, :, None, summary])]
        if extra is not None:
            extra_k, extra_v, extra_mask = extra
            parts.append((masked_scores(q_blocks @ extra_k[:, :, None].transpose(-1, -2),
                                        extra_mask[:, None, None, None, :]), extra_v[:, :, None]))
        out = joint_softmax(parts, self.dropout)
        return out.reshape(b, h, nb * bl, d)[:, :, :n]

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, summary_size={self.summary_size}, causal={self.causal}, "
                f"summary_block_start={self.summary_block_start}, first_token_global={self.first_token_global}")
