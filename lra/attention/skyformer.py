"""Skyformer attention (Chen et al., "Skyformer: Remodel Self-Attention with Gaussian Kernel and Nyström
Method", NeurIPS 2021), following the authors' code (pkuzengqi/Skyformer, ``attention_skyformer.py``).

Kernelized attention replaces softmax with an unnormalised Gaussian kernel. With the inputs scaled by
``d^(-1/4)`` (``d = Dh``; ``q̂ = q · d^(-1/4)``, ``k̂ = k · d^(-1/4)``)::

    κ(x, y) = exp(−‖x − y‖² / 2) = exp(x·y − ‖x‖²/2 − ‖y‖²/2)        (= exp(−‖q − k‖² / (2√d)))
    C = κ(Q̂, K̂)  [N, N],      out = C V                                 (no row normalisation)

``C`` is the off-diagonal block of the PSD matrix ``κ(X, X)`` of ``X = [Q̂; K̂]``, which the Nyström method
approximates from ``m`` landmark rows ``S`` of ``X``::

    out ≈ κ(Q̂, S) · (κ(S, S) + γI)⁻¹ · κ(S, K̂) · V          κ(Q̂, S): [B, H, N, m],  κ(S, S): [B, H, m, m]

taken right to left: ``O(N·m·Dh)`` time, ``O(N·m)`` memory, no ``N x N`` matrix. With ``γ = 0`` and every
row of ``X`` a landmark it is exactly ``C V`` (``κ(X, X) pinv(κ(X, X)) κ(X, X) = κ(X, X)``; tested).

As the authors' code (their LRA configs: ``nb_features = 128``, ``accumulation = 1``):

- Landmarks: ``num_landmarks = m`` rows of ``X`` drawn uniformly with replacement among the example's real
  tokens, the first ``⌊m/2⌋`` from ``Q̂`` and the rest from ``K̂``. One vector of uniform fractions
  ``u ∈ [0, 1)^m`` is shared by the batch and the landmark of example ``b`` is its real token of rank
  ``⌊u · L_b⌋`` (``L_b`` real tokens); the authors index position ``⌊u · L_b⌋`` directly, the same thing
  when the padding is at the end. Here ``u = r / 2³¹`` with integers ``r`` (``landmark_draws``), so the
  rank is exact integer arithmetic and the same in every precision the module is cast to.
- ``γ = regularization`` (0.1) is added to the diagonal of ``κ(S, S)``; the inverse is the Nyströmformer
  iteration (``pinv_iterations`` 6) applied to the symmetrically normalised ``D(κ(S, S) + γI)D`` with ``D =
  diag(row sums)^(-1/2)``, i.e. ``(κ(S, S) + γI)⁻¹ ≈ D · pinv(D (κ(S, S) + γI) D) · D`` (a preconditioner:
  exact for the exact inverse).
- ``Q̂`` and ``K̂`` are zeroed at padded positions and ``κ(K̂, S)`` is masked there, so padded keys add
  nothing; ``v`` is already zero there (``QKVAttention``). Landmarks are real tokens only, so padding never
  reaches a real output.

Choices and differences:

- The scale is ``Dh^(-1/4)``; the authors hard-code ``32^(-1/4)`` (their head size, the ``nystrom``
  protocol's, where the two agree).
- Their ``accumulation`` (sums of several sketches per landmark, with signs all ones) is fixed at 1, the
  value of every one of their LRA configs.
- ``init_scaling`` of the iteration: ``per_matrix`` (default) or ``global`` (see
  ``lra.attention.nystromformer.iterative_pinv``). The authors divide ``Aᵀ`` by the batch-wide maximum
  column sum only, not by its product with the maximum row sum; the two are close because the normalised
  matrix is symmetric with row sums near 1. The iteration runs in float32 at least.
- Sampling: the authors draw fresh landmarks at every forward, in training and in evaluation. Here
  ``resample=True`` (default) draws fresh fractions ``u`` at every training forward (global torch RNG) and
  evaluation always uses the buffer ``landmark_draws`` drawn at construction (saved with the model), so
  eval forwards are deterministic; ``resample=False`` uses the buffer in training too.
"""

from __future__ import annotations

import torch

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.nystromformer import check_choice, iterative_pinv

DRAW_RANGE = 2**31  # landmark fractions are u = r / DRAW_RANGE with integer r


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``κ(x_i, y_j) = exp(x_i·y_j − ‖x_i‖²/2 − ‖y_j‖²/2)``.

    ``x: [..., N, d]``, ``y: [..., M, d]`` -> ``[..., N, M]``.
    """
    half_sq_x = x.pow(2).sum(-1, keepdim=True) / 2
    half_sq_y = y.pow(2).sum(-1)[..., None, :] / 2
    return torch.exp(x @ y.transpose(-1, -2) - half_sq_x - half_sq_y)


def nystrom_kernel_attention(q_hat, k_hat, v, landmarks, key_mask, regularization, iterations,
                             init_scaling="per_matrix"):
    """``κ(Q̂, S) (κ(S, S) + γI)⁻¹ κ(S, K̂) V`` -> ``[B, H, N, Dh]``, the inverse by the preconditioned iteration.

    ``q_hat, k_hat, v: [B, H, N, Dh]`` (already scaled), ``landmarks: [B, H, m, Dh]``, ``key_mask: [B, N]``.
    The ``m x m`` part runs in float32 at least (float64 for float64 inputs).
    """
    a_q = gaussian_kernel(q_hat, landmarks)  # [B, H, N, m]
    a_k = gaussian_kernel(k_hat, landmarks) * key_mask[:, None, :, None].to(k_hat.dtype)
    summary = a_k.transpose(-1, -2) @ v  # κ(S, K̂) V: [B, H, m, Dh]
    dtype = torch.promote_types(landmarks.dtype, torch.float32)
    with torch.autocast(landmarks.device.type, enabled=False):
        s = landmarks.to(dtype)
        gram = gaussian_kernel(s, s) + regularization * torch.eye(s.shape[-2], dtype=dtype, device=s.device)
        d = gram.sum(-1).rsqrt()  # [B, H, m]
        z = iterative_pinv(d[..., :, None] * gram * d[..., None, :], iterations, init_scaling)
        inverse = d[..., :, None] * z * d[..., None, :]  # ≈ (κ(S, S) + γI)⁻¹
        context = inverse @ summary.to(dtype)  # [B, H, m, Dh]
    return a_q @ context.to(v.dtype)


@register("skyformer")
class SkyformerAttention(QKVAttention):
    """Gaussian-kernel attention with the Nyström approximation on sampled landmarks (see the module doc).

    Options: ``num_landmarks`` (128), ``regularization`` (0.1), ``pinv_iterations`` (6), ``init_scaling``
    (``per_matrix`` | ``global``), ``resample`` (True), ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, num_landmarks: int = 128, regularization: float = 0.1,
                 pinv_iterations: int = 6, init_scaling: str = "per_matrix", resample: bool = True,
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_choice("init_scaling", init_scaling, ("per_matrix", "global"))
        if num_landmarks < 2:
            raise ValueError(f"skyformer: num_landmarks must be >= 2 (half from the queries, half from the "
                             f"keys), got {num_landmarks}; fix configs/model/skyformer.yaml")
        self.num_landmarks, self.regularization = num_landmarks, regularization
        self.pinv_iterations, self.init_scaling, self.resample = pinv_iterations, init_scaling, resample
        self.register_buffer("landmark_draws", torch.randint(DRAW_RANGE, (num_landmarks,)))  # u = r / 2³¹

    @staticmethod
    def landmark_positions(mask: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Position of each landmark, the real token of rank ``⌊r · L_b / 2³¹⌋`` -> ``[B, m]`` (``L_b = 0``: 0).

        ``mask: [B, N]``, ``draws: [m]`` integers in ``[0, 2³¹)``.
        """
        real_first = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)  # real positions, in order
        count = mask.sum(-1, keepdim=True)  # [B, 1]
        rank = (draws[None] * count) // DRAW_RANGE  # < L_b
        return real_first.gather(1, rank)

    def attend(self, q, k, v, mask):
        use_fresh = self.training and self.resample
        draws = torch.randint_like(self.landmark_draws, DRAW_RANGE) if use_fresh else self.landmark_draws
        keep = mask[:, None, :, None].to(q.dtype)
        scale = self.head_dim ** -0.25
        q_hat, k_hat = q * (scale * keep), k * (scale * keep)
        positions = self.landmark_positions(mask, draws)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        half = self.num_landmarks // 2
        landmarks = torch.cat([q_hat.gather(2, positions[:, :, :half]), k_hat.gather(2, positions[:, :, half:])],
                              dim=2)  # S: [B, H, m, Dh]
        return nystrom_kernel_attention(q_hat, k_hat, v, landmarks, mask, self.regularization,
                                        self.pinv_iterations, self.init_scaling)

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, regularization={self.regularization}, "
                f"pinv_iterations={self.pinv_iterations}, resample={self.resample}")
