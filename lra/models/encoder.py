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
* ``mean_all``: ``Σ_all x / N``, LRA's ``MEAN`` (lra_benchmarks/models/layers/common_layers.py
  ``classifier_head``: ``jnp.mean(encoded, axis=1)``): every row counts as it is, padded ones included, so
  whatever the padded positions computed reaches the feature;
* ``cls``: a learned token, zero-initialised as in LRA, prepended to the sequence; its output is the feature;
* ``first``: the output at position 0, no token prepended (LRA's dual encoder for Retrieval,
  models/transformer/transformer.py ``TransformerDualEncoder``: its shared encoder is built without
  ``classifier``, so no CLS token, and ``classifier_head_dual``'s ``CLS`` pooling takes ``encoded[:, 0]``, the
  first byte's output).

Options that exist to compute what LRA's flax code computed (``protocol=lra``; the defaults are PyTorch's):

* ``ln_eps``: LayerNorm epsilon (flax ``nn.LayerNorm``: 1e-6; torch: 1e-5);
* ``gelu``: ``erf`` (exact, torch's default) or ``tanh`` (``0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))``, flax
  ``nn.gelu`` = ``jax.nn.gelu(approximate=True)``, layers/common_layers.py ``MlpBlock``);
* ``init``: ``torch`` (PyTorch's defaults) or ``lra`` (see ``init_lra_``);
* ``qkv_dim``: attention width apart from the model width (LRA's ``qkv_dim``: Image 64 at width 128,
  Pathfinder/Path-X 16 at 32), given to the attention as its ``qkv_dim`` option; ``None`` = ``dim``;
* ``cls_mask``: ``real`` (the CLS token is always a real key) or ``first_token`` (transformer.py: the CLS mask
  entry is a copy of token 0's mask, so the CLS is masked when token 0 is padding: a black first pixel when
  pixel 0 counts as padding).

The fixed sinusoidal table is computed in float64 and stored in float32 (as layers/common_layers.py
``sinusoidal_init`` does in numpy): a float32 ``pos * freq`` is off by ~2e-4 rad at position 4000.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

import lra.attention as attention

POOLINGS = ("mean", "mean_with_padding", "mean_all", "cls", "first")
GELUS = ("erf", "tanh")
INITS = ("torch", "lra")
CLS_MASKS = ("real", "first_token")


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position table ``[length, dim]`` (Vaswani et al.; LRA's default, learn_pos_emb=False).

    Interleaved: ``table[p, 2i] = sin(p·f_i)``, ``table[p, 2i+1] = cos(p·f_i)``, ``f_i = 10000^(-2i/dim)``;
    computed in float64, returned in float32 (LRA's ``sinusoidal_init``).
    """
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """flax ``nn.Dense``'s default kernel init (jax ``lecun_normal``) on a torch ``Linear.weight [out, in]``.

    A normal truncated to ±2 standard units, scaled so that the truncated draw has std ``1/√fan_in``
    (jax divides the scale by 0.87962566103423978, the std of a standard normal truncated to [-2, 2]).
    """
    std = (1.0 / weight.shape[1]) ** 0.5 / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _xavier_linear_(linear: nn.Linear, bias_std: float) -> None:
    nn.init.xavier_uniform_(linear.weight)  # U(±√(6 / (fan_in + fan_out)))
    if linear.bias is not None:
        nn.init.normal_(linear.bias, std=bias_std)


def init_lra_(encoder: Encoder) -> None:
    """LRA's initialisation (flax ``nn.Dense``/``nn.SelfAttention`` initialisers as models/transformer/transformer.py
    and layers/common_layers.py pass them), in place:

    * query/key/value/output projections of a ``QKVAttention``: ``xavier_uniform`` kernels (flax
      ``DenseGeneral`` applies it to the kernel flattened to ``(D, A)`` / ``(A, D)``, the bound of a torch
      ``Linear(D, A)``'s weight), biases (none under LRA) ``N(0, 1e-6²)``; attentions with projections of their
      own keep their init;
    * MLP (``MlpBlock``): ``xavier_uniform`` kernels, ``N(0, 1e-6²)`` biases;
    * LayerNorms: scale 1, bias 0 (torch's too); CLS zeros; token embeddings ``N(0, embed_init_std²)`` and
      learned positions ``N(0, 0.02²)``, as every init of this encoder does.
    The heads' ``lecun_normal`` kernels and zero biases are the heads' own (``lra.models.heads``).
    """
    for block in encoder.blocks:
        attn = block.attention
        if isinstance(attn, attention.QKVAttention):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                _xavier_linear_(proj, bias_std=1e-6)
        _xavier_linear_(block.mlp[0], bias_std=1e-6)
        _xavier_linear_(block.mlp[3], bias_std=1e-6)


class Block(nn.Module):
    """One pre-LN Transformer block around ``attention.build(attention_name, ...)``.

    ``ln_eps`` and ``gelu`` as in ``Encoder``. ``attention_fp32`` (the ``nystrom`` protocol: attention in fp32
    while the rest runs in mixed precision) computes the attention in at least float32 with autocast off, whatever
    the model's precision (``16-mixed``, ``bf16-mixed``, ``16-true``, ``bf16-true``): for query/key/value
    attentions the core after the projections (``QKVAttention.fp32_core``, as the harness's attention.py);
    attentions that own other projections (Reformer, Synthesizer, ToST) run whole in float32, their half-precision
    weights upcast for the computation (gradients still reach them), as the harness runs its Reformer.
    """

    def __init__(self, dim, num_heads, mlp_dim, dropout, attention_name, attention_options, attention_fp32,
                 ln_eps: float = 1e-5, gelu: str = "erf"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attention = attention.build(attention_name, dim=dim, num_heads=num_heads, **attention_options)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(approximate="tanh" if gelu == "tanh" else "none"), nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim), nn.Dropout(dropout),
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


def _choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"encoder.{option} must be one of {choices}, got {value!r}")


class Encoder(nn.Module):
    """Embeddings -> ``depth`` blocks -> LayerNorm -> pooled features ``[B, dim]``.

    Args:
        vocab_size: number of token ids (0 is padding).
        max_len: longest input accepted (positions table size, plus one for ``cls``).
        pos_emb: ``learned`` (normal(0.02) init) or ``sinusoidal`` (fixed).
        embed_init_std: std of the token embedding init (0.02 in the Nyströmformer harness, 1.0 in LRA).
        pooling: ``mean`` (over real tokens), ``mean_with_padding`` (padded rows zeroed, divided by ``N``),
            ``mean_all`` (every row, LRA's MEAN), ``cls`` or ``first`` (see the module doc).
        ln_eps, gelu, init, qkv_dim, cls_mask: see the module doc (defaults: PyTorch's behaviour).
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
        ln_eps: float = 1e-5,
        gelu: str = "erf",
        init: str = "torch",
        qkv_dim: int | None = None,
        cls_mask: str = "real",
    ):
        super().__init__()
        _choice("pooling", pooling, POOLINGS)
        _choice("pos_emb", pos_emb, ("learned", "sinusoidal"))
        _choice("gelu", gelu, GELUS)
        _choice("init", init, INITS)
        _choice("cls_mask", cls_mask, CLS_MASKS)
        self.pooling, self.max_len, self.cls_mask = pooling, max_len, cls_mask
        positions = max_len + (pooling == "cls")
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=embed_init_std)
        if pos_emb == "learned":
            self.position_embedding = nn.Parameter(torch.randn(positions, dim) * 0.02)
        else:
            self.register_buffer("position_embedding", sinusoidal_table(positions, dim), persistent=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pooling == "cls" else None
        self.embed_dropout = nn.Dropout(dropout)
        options = self._attention_options(attention_name, dict(attention_options or {}), dim, qkv_dim)
        if "seq_len" in options:  # length-sized attentions (Linformer, Synthesizer) see the CLS token too
            options["seq_len"] = positions
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, dropout, attention_name, options, attention_fp32, ln_eps=ln_eps, gelu=gelu)
            for _ in range(depth)
        )
        for name in getattr(self.blocks[0].attention, "layer_shared_parameters", ()) if depth else ():
            # an attention's parameters shared by all layers (Linformer's share_layers): one tensor, tied here
            for block in self.blocks[1:]:
                setattr(block.attention, name, getattr(self.blocks[0].attention, name))
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        if init == "lra":
            init_lra_(self)

    @staticmethod
    def _attention_options(name: str, options: dict, dim: int, qkv_dim: int | None) -> dict:
        """``options`` plus ``qkv_dim`` when it differs from ``dim``; an attention without that option fails."""
        if qkv_dim is None or qkv_dim == dim:
            return options
        if "qkv_dim" not in inspect.signature(attention.get(name).__init__).parameters:
            raise ValueError(
                f"encoder.qkv_dim={qkv_dim} (attention width apart from the model width {dim}), but attention "
                f"{name!r} has no qkv_dim option: it runs at the model width. Add encoder.qkv_dim=null to run it "
                f"at width {dim}."
            )
        if options.get("qkv_dim", qkv_dim) != qkv_dim:
            raise ValueError(f"encoder.qkv_dim={qkv_dim} and model.options.qkv_dim={options['qkv_dim']} disagree; "
                             f"set one of them.")
        return {**options, "qkv_dim": qkv_dim}

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        if n > self.max_len:
            raise ValueError(f"input length {n} exceeds the encoder's max_len={self.max_len}")
        x = self.token_embedding(input_ids)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
            cls_real = mask[:, :1] if self.cls_mask == "first_token" else mask.new_ones(b, 1)
            mask = torch.cat([cls_real, mask], dim=1)
        x = self.embed_dropout(x + self.position_embedding[: x.shape[1]])
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.pooling in ("cls", "first"):
            return x[:, 0]
        if self.pooling == "mean_all":
            return x.mean(1)
        weights = mask.to(x.dtype)[..., None]
        if self.pooling == "mean_with_padding":
            return (x * weights).sum(1) / n
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def attentions(self):
        """The attention module of every block (for auxiliary losses and weight transfer)."""
        return [block.attention for block in self.blocks]
