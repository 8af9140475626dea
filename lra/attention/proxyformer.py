"""Proxyformer attention (Lee, Lee & Shin, "Proxyformer: Nyström-Based Linear Transformer with Trainable
Proxy Tokens", AAAI 2024).

No public code exists: this module is written from the paper's description. What follows the paper's
text: trainable proxy tokens take the place of Nyströmformer's segment-mean landmarks in the Nyström
decomposition ``K1 · pinv(K2) · K3 · V``; a contrastive loss keeps the proxies distinct and input-aware; an
input-injection module mixes input information into the proxies; a "decomposed dropout" drops columns of
the landmark-landmark factor during training; 128 proxies in the LRA runs. Everything below marked
*choice* is this implementation's reading of what the text leaves open.

Shapes and math, per head (``d = Dh``, ``m = num_proxies``, ``S(X) = softmax(X / √d)`` over the last
axis, padded keys masked wherever keys are attended)::

    P_q, P_k: [H, m, Dh]   trainable proxies (parameter ``proxies: [1 or 2, H, m, Dh]``)
    injection:  Q̃ = P_q + α · S(P_q Qᵀ) Q,   K̃ = P_k + α · S(P_k Kᵀ) K       [B, H, m, Dh]
    no injection:  Q̃ = P_q, K̃ = P_k
    K1 = S(Q K̃ᵀ) [B, H, N, m],   K2 = S(Q̃ K̃ᵀ) [., H, m, m],   K3 = S(Q̃ Kᵀ) [B, H, m, N]
    out = K1 · (Z · (K3 · V)) + conv(V),   Z ≈ pinv(K2 · diag(δ)),   δ_j ~ Bernoulli(1 − p) in training

*Choices*:

- Proxies live in the head dimension, one set per head, initialised ``N(0, 1)`` (so that ``K2`` starts
  diagonally dominant: ``‖p‖²/√d ≈ √d``). ``shared_proxies=True`` (default) uses one set for both roles
  (``P_q = P_k``); ``False`` learns separate query and key proxies.
- Input injection (``injection``, strength ``injection_strength = α``, 1.0): each proxy attends over the
  real tokens (query proxies over the queries, key proxies over the keys) and is shifted by what it reads.
  This costs two more ``O(N·m·Dh)`` passes and makes K2 input-dependent.
- Contrastive loss (InfoNCE, temperature ``τ = contrastive_temperature``, 0.1), for each role
  ``(X̃, P) ∈ {(Q̃, P_q), (K̃, P_k)}``: ``L = mean_{b,h,i} −log softmax_j(cos(x̃_i, p_j) / τ)[i]``: the proxy
  actually used (input-aware after injection) must stay closest to its own trainable vector and away from
  every other proxy. Without injection it is a pure spreading term on the proxies. It is computed in float32
  and ``contrastive_weight · mean over roles`` (weight 0.1) is stored as ``aux_losses["proxy_contrastive"]``
  during training forwards only (an empty dict in eval or with weight 0).
- Decomposed dropout (``landmark_dropout = p``, 0.1; ``landmark_dropout_on``): the paper drops columns of
  the landmark-landmark matrix ``K2`` in training. ``k2`` (default) does that: per sample and head each
  column ``j`` of ``K2`` is zeroed with probability ``p`` before the pseudo-inverse, without rescaling
  (*choice*: the paper's formula could not be consulted; a ``1/(1 − p)`` factor would only scale ``Z`` by
  ``1 − p``, a train/eval mismatch). Row ``j`` of ``Z`` is then exactly zero and the others are the
  pseudo-inverse of the kept columns, so landmark ``j`` leaves the decomposition through ``K1`` (*choice*: if
  every column of a sample and head is drawn for dropping, that sample and head keeps them all). This costs
  a pseudo-inverse per sample also without injection. ``pinv`` (this suite's choice before commit df94b93,
  made so that without injection one pseudo-inverse serves the whole batch; kept so that its runs can be
  repeated) drops columns of ``Z = pinv(K2)`` instead, with ``1 / (1 − p)`` rescaling (``Z · D``): each
  removes landmark ``j``'s value summary ``(K3 V)_j``.
- Pseudo-inverse: Nyströmformer's iteration (``pinv_iterations`` 6, ``init_scaling`` ``per_matrix`` |
  ``global``), in float32 for half-precision inputs; see ``lra.attention.nystromformer``. Without
  injection ``K2 = S(P_q P_kᵀ)`` does not depend on the input, so ``Z: [1, H, m, m]`` is computed once per
  forward for the whole batch, and in eval with gradients off it is cached until the proxies change
  (keyed on their version counter, storage, dtype and device).
- ``conv_kernel`` (35, as the Nyströmformer LRA harness that the paper reuses; 0/None disables): the
  depthwise convolution skip of V of Nyströmformer.
- Proxies need no landmark mask (they are never padding); padded tokens are excluded from the injection's
  softmax and from K3, so padding never reaches a real token's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.nystromformer import (
    check_choice,
    landmark_pinv,
    nystrom_product,
    sequence_conv,
    softmax_attend,
)


def inject(proxies: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, strength: float) -> torch.Tensor:
    """``P + α · S(P Xᵀ) X`` -> ``[B, H, m, Dh]``, ``S`` over the real tokens only.

    ``proxies: [H, m, Dh]``, ``x: [B, H, N, Dh]``, ``mask: [B, N]``.
    """
    return proxies + strength * softmax_attend(proxies, x, x, mask)


def info_nce(anchors: torch.Tensor, proxies: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean of ``−log softmax_j(cos(anchor_i, proxy_j) / τ)[i]``, in float32.

    ``anchors: [..., H, m, Dh]`` (the landmarks used), ``proxies: [H, m, Dh]`` (the trainable vectors).
    """
    logits = F.normalize(anchors.float(), dim=-1) @ F.normalize(proxies.float(), dim=-1).transpose(-1, -2)
    return -torch.log_softmax(logits / temperature, dim=-1).diagonal(dim1=-2, dim2=-1).mean()


@register("proxyformer")
class ProxyAttention(QKVAttention):
    """Nyström attention with trainable proxy landmarks (see the module doc for the math and choices).

    Options: ``num_proxies`` (128), ``shared_proxies`` (True), ``injection`` (True), ``injection_strength``
    (1.0), ``contrastive_weight`` (0.1), ``contrastive_temperature`` (0.1), ``landmark_dropout`` (0.1),
    ``landmark_dropout_on`` (``k2`` | ``pinv``), ``pinv_iterations`` (6), ``init_scaling`` (``per_matrix`` |
    ``global``), ``conv_kernel`` (35), ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, num_proxies: int = 128, shared_proxies: bool = True,
                 injection: bool = True, injection_strength: float = 1.0, contrastive_weight: float = 0.1,
                 contrastive_temperature: float = 0.1, landmark_dropout: float = 0.1,
                 landmark_dropout_on: str = "k2", pinv_iterations: int = 6, init_scaling: str = "per_matrix",
                 conv_kernel: int | None = 35, qkv_bias: bool = True, qkv_dim: int | None = None,
                 out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_choice("init_scaling", init_scaling, ("per_matrix", "global"))
        check_choice("landmark_dropout_on", landmark_dropout_on, ("k2", "pinv"))
        roles = 1 if shared_proxies else 2
        self.proxies = nn.Parameter(torch.randn(roles, num_heads, num_proxies, self.head_dim))
        self.injection, self.injection_strength = injection, injection_strength
        self.contrastive_weight, self.contrastive_temperature = contrastive_weight, contrastive_temperature
        self.landmark_dropout, self.landmark_dropout_on = landmark_dropout, landmark_dropout_on
        self.pinv_iterations, self.init_scaling = pinv_iterations, init_scaling
        self.conv = sequence_conv(num_heads, conv_kernel)
        self._pinv_cache: tuple[tuple, torch.Tensor] | None = None

    def _proxy_pinv(self, p_q: torch.Tensor, p_k: torch.Tensor) -> torch.Tensor:
        """``pinv(S(P_q P_kᵀ))`` as ``[1, H, m, m]``.

        In eval without gradients it is cached until the proxies change (in-place updates bump ``_version``).
        """
        if self.training or torch.is_grad_enabled():
            return landmark_pinv(p_q, p_k, self.pinv_iterations, self.init_scaling)[None]
        p = self.proxies
        key = (p._version, p.data_ptr(), p.dtype, p.device)
        if self._pinv_cache is None or self._pinv_cache[0] != key:
            self._pinv_cache = (key, landmark_pinv(p_q, p_k, self.pinv_iterations, self.init_scaling)[None])
        return self._pinv_cache[1]

    def attend(self, q, k, v, mask):
        # one tensor when shared; cast to the core's dtype (fp32 core with half weights)
        p_q, p_k = self.proxies[0].to(q.dtype), self.proxies[-1].to(q.dtype)
        drop = self.training and self.landmark_dropout > 0
        keep = None  # K2's columns kept by the decomposed dropout: [B, H, 1, m]
        if drop and self.landmark_dropout_on == "k2":
            keep = torch.rand(q.shape[0], self.num_heads, 1, p_q.shape[-2], device=q.device) >= self.landmark_dropout
            keep |= ~keep.any(-1, keepdim=True)  # never drop every column of a sample and head
        if self.injection:
            q_landmarks = inject(p_q, q, mask, self.injection_strength)
            k_landmarks = inject(p_k, k, mask, self.injection_strength)
            z = landmark_pinv(q_landmarks, k_landmarks, self.pinv_iterations, self.init_scaling, column_keep=keep)
        else:
            q_landmarks, k_landmarks = p_q, p_k
            z = (self._proxy_pinv(p_q, p_k) if keep is None else
                 landmark_pinv(p_q, p_k, self.pinv_iterations, self.init_scaling, column_keep=keep))
        if drop and self.landmark_dropout_on == "pinv":
            ones = torch.ones(q.shape[0], self.num_heads, 1, z.shape[-1], dtype=z.dtype, device=z.device)
            z = z * F.dropout(ones, self.landmark_dropout)  # drop columns of Z, per sample and head
        out = nystrom_product(q, k, v, q_landmarks, k_landmarks, z, mask)
        self.aux_losses = {}
        if self.training and self.contrastive_weight:
            roles = [(q_landmarks, p_q), (k_landmarks, p_k)]
            loss = sum(info_nce(x, p, self.contrastive_temperature) for x, p in roles) / len(roles)
            self.aux_losses = {"proxy_contrastive": self.contrastive_weight * loss}
        return out if self.conv is None else out + self.conv(v)

    def extra_repr(self) -> str:
        return (f"num_proxies={self.proxies.shape[-2]}, shared_proxies={self.proxies.shape[0] == 1}, "
                f"injection={self.injection}, landmark_dropout={self.landmark_dropout} "
                f"(on {self.landmark_dropout_on})")
