"""The shared encoder: token + positional embeddings, pre-LN blocks with a pluggable attention, pooling.

Shapes: ``input_ids: [B, N]`` int, ``mask: [B, N]`` bool (True = real token) -> features ``[B, D]``.

Block (pre-LayerNorm, as in LRA's and the Nyströmformer harness's encoders)::

    x = x + Dropout(Attention(LN(x), mask))
    x = x + Dropout(Linear(Dropout(GELU(Linear(LN(x))))))

followed by a final LayerNorm. Pooling (``x`` the final hidden states ``[B, N, D]``, ``n`` the real tokens):

* ``mean``: ``Σ_real x / n``, the average over real tokens only;
* ``mean_with_padding``: ``Σ_real x / N``, the Nyströmformer harness's pooling (LRA/code/model.py zeroes the
  padded outputs of the final LayerNorm, model_wrapper.py then averages over all ``N`` positions): the
  feature shrinks by ``n / N`` on short inputs;
* ``cls``: a learned token, zero-initialised as in LRA, prepended to the sequence; its output is the feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import lra.attention as attention

POOLINGS = ("mean", "mean_with_padding", "cls")


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position table ``[length, dim]`` (Vaswani et al.; LRA's default, learn_pos_emb=False)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class Block(nn.Module):
    """One pre-LN Transformer block around ``attention.build(attention_name, ...)``.

    ``attention_fp32`` (the ``nystrom`` protocol: attention in fp32 while the rest runs in mixed precision)
    computes the attention in at least float32 with autocast off, whatever the model's precision (``16-mixed``,
    ``bf16-mixed``, ``16-true``, ``bf16-true``): for query/key/value attentions the core after the projections
    (``QKVAttention.fp32_core``, as the harness's attention.py); attentions that own other projections (Reformer,
    Synthesizer, ToST) run whole in float32, their half-precision weights upcast for the computation (gradients
    still reach them), as the harness runs its Reformer.
    """

    def __init__(self, dim, num_heads, mlp_dim, dropout, attention_name, attention_options, attention_fp32):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention.build(attention_name, dim=dim, num_heads=num_heads, **attention_options)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)
        self.attention_fp32 = attention_fp32
        if attention_fp32 and isinstance(self.attention, attention.QKVAttention):
            self.attention.fp32_core = True

    def attend(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.attention_fp32 or isinstance(self.attention, attention.QKVAttention):
            return self.attention(x, mask)
        return attention.in_fp32(self._attention_upcast, x, mask=mask)

    def _attention_upcast(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention module on ``x`` with its floating-point parameters in ``x``'s dtype."""
        upcast = {name: p.to(x.dtype) for name, p in self.attention.named_parameters()
                  if p.is_floating_point() and p.dtype != x.dtype}
        if not upcast:
            return self.attention(x, mask)
        return torch.func.functional_call(self.attention, upcast, (x, mask), strict=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attend(self.norm1(x), mask))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Embeddings -> ``depth`` blocks -> LayerNorm -> pooled features ``[B, dim]``.

    Args:
        vocab_size: number of token ids (0 is padding).
        max_len: longest input accepted (positions table size, plus one for ``cls``).
        pos_emb: ``learned`` (normal(0.02) init) or ``sinusoidal`` (fixed).
        embed_init_std: std of the token embedding init (0.02 in the Nyströmformer harness, 1.0 in LRA).
        pooling: ``mean`` (over real tokens), ``mean_with_padding`` (over all positions) or ``cls``.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        attention_name: str,
        attention_options: dict | None = None,
        depth: int = 2,
        dim: int = 64,
        num_heads: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
        pooling: str = "mean",
        pos_emb: str = "learned",
        embed_init_std: float = 0.02,
        attention_fp32: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"encoder.pooling must be one of {POOLINGS}, got {pooling!r}")
        if pos_emb not in ("learned", "sinusoidal"):
            raise ValueError(f"encoder.pos_emb must be 'learned' or 'sinusoidal', got {pos_emb!r}")
        self.pooling, self.max_len = pooling, max_len
        positions = max_len + (pooling == "cls")
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=embed_init_std)
        if pos_emb == "learned":
            self.position_embedding = nn.Parameter(torch.randn(positions, dim) * 0.02)
        else:
            self.register_buffer("position_embedding", sinusoidal_table(positions, dim), persistent=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pooling == "cls" else None
        self.embed_dropout = nn.Dropout(dropout)
        options = dict(attention_options or {})
        if "seq_len" in options:  # length-sized attentions (Linformer, Synthesizer) see the CLS token too
            options["seq_len"] = positions
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, dropout, attention_name, options, attention_fp32) for _ in range(depth)
        )
        for name in getattr(self.blocks[0].attention, "layer_shared_parameters", ()):
            # an attention's parameters shared by all layers (Linformer's share_layers): one tensor, tied here
            for block in self.blocks[1:]:
                setattr(block.attention, name, getattr(self.blocks[0].attention, name))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        if n > self.max_len:
            raise ValueError(f"input length {n} exceeds the encoder's max_len={self.max_len}")
        x = self.token_embedding(input_ids)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
            mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        x = self.embed_dropout(x + self.position_embedding[: x.shape[1]])
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.cls is not None:
            return x[:, 0]
        weights = mask.to(x.dtype)[..., None]
        if self.pooling == "mean_with_padding":
            return (x * weights).sum(1) / n
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def attentions(self):
        """The attention module of every block (for auxiliary losses and weight transfer)."""
        return [block.attention for block in self.blocks]
