"""Synthesizer attention (Tay et al., "Synthesizer: Rethinking Self-Attention for Transformer Models", ICML 2021).

The attention weights are synthesised instead of computed from query-key dot products. Per head ``h``, with
values ``v = x W_v`` (``v_proj``), ``ℓ = seq_len`` and an input of ``N <= ℓ`` tokens::

    dense:   B_h[i] = W2_h · ReLU(W1 x_i + b1)_h + b2_h ∈ R^ℓ      (token i's logits over the ℓ positions)
             W1: [D, A] (``dense_hidden``; A = ``qkv_dim``, D by default, split into H heads of Dh),
             W2_h: [Dh, ℓ], b2_h: [ℓ]
    random:  B_h = R_h ∈ R^{ℓ×ℓ}, learned and the same for every input (``random_logits``)
             factorised (``factor_rank = k``): R_h = R1_h R2_h, R1_h: [ℓ, k], R2_h: [k, ℓ]
    out_h = softmax(B_h[:N, :N] + M) · v_h,     M = the dtype's lowest value on padded keys,   then ``out_proj``

``dot_product=True`` adds ``Q Kᵀ / √Dh`` (with ``q_proj``, ``k_proj``) to the synthetic logits, as LRA's
Synthesizer encoder runs it (``ignore_dot_product=False``: a plain sum, the paper's "R+V"-style mixture
without mixing weights); ``False`` is the paper's pure Synthesizer.

*Choices*:

- Lengths: an input shorter than ``seq_len`` uses the leading ``N x N`` block (``N`` columns of ``W2``), as
  LRA slices its matrices; a longer one is an error. The model config sets ``seq_len: ${data.seq_len}``,
  the length every batch is padded to, so the whole matrix is used in training.
- Dense second layer: one ``W2_h`` per head (the paper's ``d·ℓ`` parameters). LRA's code shares one
  ``[Dh, ℓ]`` layer across heads and then *reshapes* ``[B, N, H, ℓ]`` to ``[B, H, N, ℓ]``, mixing tokens
  and heads; neither is reproduced.
- Initialisation: random matrices as LRA (flax ``xavier_uniform``: ``U(±√(6 / (fan_in + fan_out)))`` with
  the head axis counted in both fans, so the first softmaxes are nearly uniform); the dense layers as
  ``nn.Linear`` (``U(±1/√fan_in)``).
- Padding: padded keys are masked out of every softmax and padded values are zero. LRA's pure Synthesizer
  (``ignore_dot_product=True``) applies no padding mask at all.
- Dropout (``dropout``) on the attention probabilities, as LRA.
- The paper's factorised dense and fixed-random variants are not provided.
- LRA's runs (``protocol=lra``, recipe_model/lra_synthesizer.yaml): ``variant: random`` with ``dot_product:
  true`` and no biases (``qkv_dim``/``out_bias`` set the attention width and the output bias).

Memory is ``O(B·H·N²)`` like softmax attention (the logits are an ``N x N`` matrix per head), plus ``H·ℓ²``
parameters for the unfactorised random variant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import AttentionBase, QKVAttention

_CONFIG = "configs/model/synthesizer.yaml (or the `model.options.*` override)"
VARIANTS = ("dense", "random")


def xavier_uniform(*shape: int) -> torch.Tensor:
    """flax's ``xavier_uniform`` for ``[..., fan_in, fan_out]``: leading axes multiply both fans."""
    receptive = math.prod(shape[:-2])
    bound = math.sqrt(6.0 / ((shape[-2] + shape[-1]) * receptive))
    return torch.empty(shape).uniform_(-bound, bound)


@register("synthesizer")
class SynthesizerAttention(AttentionBase):
    """Dense or random Synthesizer (see the module doc for the math and choices).

    Options: ``seq_len`` (4096, as Linformer; the model config sets ``${data.seq_len}``), ``variant`` (``random`` |
    ``dense``), ``factor_rank`` (None: a full ``ℓ x ℓ`` matrix; k: ``R1 R2``, random only), ``dot_product``
    (False), ``dropout``, ``qkv_bias`` (bias of ``v_proj``, and of ``q_proj``/``k_proj`` with ``dot_product``),
    ``qkv_dim`` (attention width, default ``dim``), ``out_bias``.
    """

    split_heads = QKVAttention.split_heads
    merge_heads = QKVAttention.merge_heads

    def __init__(self, dim: int, num_heads: int, seq_len: int = 4096, variant: str = "random",
                 factor_rank: int | None = None, dot_product: bool = False, dropout: float = 0.0,
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, inner_dim=qkv_dim)
        if variant not in VARIANTS or seq_len < 1 or (factor_rank is not None and
                                                       (variant != "random" or factor_rank < 1)):
            raise ValueError(
                f"synthesizer: got variant={variant!r}, seq_len={seq_len}, factor_rank={factor_rank}; variant must "
                f"be one of {VARIANTS}, seq_len >= 1, and factor_rank null or >= 1 (it factorises the random "
                f"matrix only). Fix {_CONFIG}.")
        self.seq_len, self.variant, self.factor_rank, self.dot_product = seq_len, variant, factor_rank, dot_product
        heads, head_dim = num_heads, self.head_dim
        if variant == "dense":
            self.dense_hidden = nn.Linear(dim, self.inner_dim)
            bound = head_dim**-0.5
            self.dense_logits_weight = nn.Parameter(torch.empty(heads, head_dim, seq_len).uniform_(-bound, bound))
            self.dense_logits_bias = nn.Parameter(torch.empty(heads, seq_len).uniform_(-bound, bound))
        elif factor_rank is None:
            self.random_logits = nn.Parameter(xavier_uniform(heads, seq_len, seq_len))
        else:
            self.random_left = nn.Parameter(xavier_uniform(heads, seq_len, factor_rank))
            self.random_right = nn.Parameter(xavier_uniform(heads, factor_rank, seq_len))
        if dot_product:
            self.q_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(self.inner_dim, dim, bias=out_bias)
        self.dropout = nn.Dropout(dropout)

    def synthetic_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``B[:N, :N]`` per head: ``[B, H, N, N]`` (dense) or ``[1, H, N, N]`` (random), for ``x: [B, N, D]``."""
        n = x.shape[1]
        if self.variant == "dense":
            hidden = self.split_heads(torch.relu(self.dense_hidden(x)))  # [B, H, N, Dh]
            return hidden @ self.dense_logits_weight[..., :n] + self.dense_logits_bias[:, None, :n]
        if self.factor_rank is None:
            return self.random_logits[None, :, :n, :n]
        return (self.random_left[:, :n] @ self.random_right[..., :n])[None]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.seq_len:
            raise ValueError(
                f"synthesizer: the input has N={n} tokens but seq_len={self.seq_len}: its synthetic attention "
                f"matrices cover seq_len positions. Set seq_len >= N in {_CONFIG}; the shipped config uses "
                f"${{data.seq_len}}, the length batches are padded to.")
        logits = self.synthetic_logits(x)
        if self.dot_product:
            q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
            logits = logits + q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)  # [B, H, N, N]
        probs = self.dropout(torch.softmax(logits, dim=-1))
        v = self.split_heads(self.v_proj(x) * mask[..., None].to(x.dtype))
        return self.out_proj(self.merge_heads(probs @ v))

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, variant={self.variant}, factor_rank={self.factor_rank}, "
                f"dot_product={self.dot_product}")
