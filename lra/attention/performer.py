"""Performer attention, FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

Softmax's kernel ``exp(q·k/√d)`` (``d = Dh``) is estimated with ``m`` positive random features. With the
inputs scaled once, ``x̂ = x · d^(-1/4)`` (so ``q̂·k̂ = q·k/√d``), and rows ``w_1..w_m`` of a random matrix
``W: [m, d]``::

    φ(x̂) = m^(-1/2) · (exp(W x̂ − ‖x̂‖²/2 − c) + ε)          [m]
    E_W[φ(q̂)·φ(k̂)] = exp(q̂·k̂)                              (for c = 0 and ε = 0)
    out_i = φ(q̂_i)ᵀ (Σ_j φ(k̂_j) v_jᵀ) / φ(q̂_i)ᵀ (Σ_j φ(k̂_j))

Shapes: ``q, k, v: [B, H, N, Dh]`` -> ``[B, H, N, Dh]``; features ``[B, H, N, m]``. Cost ``O(N·m·Dh)`` time,
``O(N·m)`` memory; no ``N x N`` matrix.

``variant="favor_plus"`` (default; the correct FAVOR+), as the authors' code (google-research
``performer/fast_attention/jax/fast_attention.py``, the ``make_fast_softmax_attention`` defaults):
``m = num_features`` (256); orthogonal random features (``orthogonal=True``): ``⌈m/d⌉`` independent blocks of
``d`` orthonormal rows, each row then scaled by the norm of an independent ``N(0, I_d)`` vector so that every
row is marginally Gaussian (their ``scaling=0``); ``orthogonal=False`` draws i.i.d. Gaussian rows. One ``W``
per module, shared by its heads. The numerical stabiliser ``c`` is, for a query, the maximum of ``W q̂`` over
its features and, for the keys, the maximum over all (real) keys and features of one example and head;
``ε = eps`` (1e-6, their ``numerical_stabilizer``) is added inside ``φ``; a normaliser ``R`` with ``|R| ≤ ε``
is replaced by ``R + 2ε``. ``c`` is a factor shared by all of a query's features (resp. all of an example's
key features), so it cancels between numerator and normaliser (up to ``ε``) and is treated as a constant (no
gradient through it). Choices and differences from the authors' code:

- Orthogonal blocks come from the QR decomposition of a Gaussian matrix with the signs of ``diag(R)``
  folded into ``Q``, which makes each block exactly Haar-distributed (the authors' code omits the sign
  fix).
- ``W`` lives in the buffer ``features`` (saved with the model). ``redraw = r > 0``: every ``r``-th training
  forward after the first starts with a fresh draw from the global torch RNG (the construction draw serves
  the first ``r``); ``r = 1`` (default) is a new ``W`` at every training forward, as the authors' code
  (``redraw_features=True``; theirs seeds each draw from the sum of the queries, which ties an example's
  features to the rest of its batch). ``redraw = 0`` never redraws. The forward counter is not saved: a
  resumed run restarts it. In eval the buffer is used as it is, so eval forwards are deterministic.
- Padding: the keys' stabiliser is taken over real keys only and ``φ(k̂)`` is zeroed at padded keys, so
  padded keys are in neither sum; ``v`` is already zero there (``QKVAttention``).

``variant="harness"`` reproduces the Nyströmformer PyTorch harness (mlpen/Nystromformer
``LRA/code/attention_performer.py`` around lucidrains' performer-pytorch 0.15.0 ``FastAttention``; the
Skyformer repository vendors the same code), selected by ``protocol=nystrom``. It computes, with
``s = d^(-1/2)``, ``ε = 1e-4`` and ``mask`` the real tokens::

    q̃ = s·q        k̃ = s·mask·k                                  (padded keys become zero vectors)
    φq = m^(-1/2) (exp(W q̃ − ‖q̃‖²/2 − max_features(W q̃)) + ε)
    φk = m^(-1/2) (exp(W k̃ − ‖k̃‖²/2 − M) + ε),  M = max of W k̃ over the whole [B, H, N, m] tensor
    out = φq (φkᵀ v) / (φq · Σ_{all N} φk)                          (no guard on the normaliser)

Its upstream bugs, all reproduced by this variant: (1) the inputs are scaled by ``d^(-1/4)`` twice (the
harness, then FastAttention), so the estimate is of ``exp(q·k/d)``, not ``exp(q·k/√d)``; (2) padded keys are
zero keys, not masked: each adds ``m^(-1/2)(e^(−M) + ε)·1`` to the normaliser (≈ one extra key of logit 0 and
value 0), so real outputs depend on how much padding an example has; (3) the key stabiliser ``M`` is one
scalar over the whole micro-batch, coupling the examples through ``ε`` and the padded keys. Its other
settings: ``ε = 1e-4``, no normaliser guard, ``W`` drawn once at construction and never redrawn
(``redraw = 0``: FastAttention ≥ 0.14.0 never redraws itself), QR blocks without the sign fix (``W`` is not
isotropic), the two maxima not detached (gradient flows through them to the maximising entry, as upstream;
:func:`_maximum`). Measured: with the same
weights and ``W``, the ListOps logits of ``protocol=nystrom model=performer`` equal those of the harness's
model running performer-pytorch 0.15.0 to 2.3e-15 in float64 on a padded batch (0.57 apart with
``protocol.quirks=fixed``).

``harness_fixes`` (harness variant only; default none) corrects any subset of the three bugs and nothing else, so
their effects can be measured one at a time: ``scale`` (inputs scaled by ``d^(-1/4)`` once), ``padding`` (padded
keys left out of the key stabiliser and given zero features, so real outputs do not depend on the padding) and
``stabiliser`` (one key stabiliser per example and head instead of per micro-batch). With all three it computes
``variant="favor_plus"`` with the harness's settings up to FAVOR+'s own details (a test): the QR sign fix, the
normaliser guard and the detached stabilisers, which change the estimate by at most O(ε).

``variant="lra"`` and ``kernel="relu"`` reproduce the original LRA code
(google-research/long-range-arena ``models/performer/performer_attention.py``), selected by ``protocol=lra``:

- ``kernel="relu"`` (LRA's default ``attention_fn_cls='generalized'`` = ``make_fast_generalized_attention``
  with ``features_type='deterministic'``): no random features at all, ``φ(x) = relu(x) + ε`` on the raw
  (unscaled) ``q, k`` with ``ε = 1e-3`` (``kernel_epsilon``), ``out = φq (φkᵀ v) / (φq · Σ φk)`` with no
  guard (``numerical_stabilizer=0``). ``num_features``/``orthogonal``/``redraw`` do not apply. This is a
  linear attention with ReLU features, not a softmax estimate; LRA uses it on Text, Retrieval, Image and
  Pathfinder. With ``variant="favor_plus"`` the same kernel is computed with padded keys masked.
- ``kernel="softmax"`` with ``variant="lra"`` (LRA's ListOps ``performer_base.py``: ``make_fast_softmax_
  attention`` with ``nb_features=2``): FAVOR+ as above with ``ε = 1e-6`` and the ``|R| ≤ ε`` guard, but the
  key stabiliser is the maximum over *all* keys of an example and head, the maxima are not detached, the QR
  blocks have no sign fix, and ``W`` is redrawn at every forward, training and evaluation alike, from a
  generator seeded by ``⌈Σ q · 1e7⌉`` (the whole batch's queries; LRA seeds JAX's ``PRNGKey`` with that
  number, so its draws are a function of the batch, but not these draws). ``redraw`` must be left unset.
- Both LRA variants ignore the padding mask (upstream bug: the fast attention functions drop the ``bias``
  argument that carries it): padded positions are keys with their projected keys *and values*
  (``zero_padded_values = False``), so real outputs depend on the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lra.attention import register
from lra.attention.base import QKVAttention

VARIANTS = ("favor_plus", "harness", "lra")
HARNESS_FIXES = ("scale", "padding", "stabiliser")  # the harness's three bugs, each correctable on its own
KERNELS = ("softmax", "relu")
# per variant: (eps of the softmax kernel, redraw), and the relu kernel's eps (LRA's kernel_epsilon)
_SOFTMAX_DEFAULTS = {"favor_plus": (1e-6, 1), "harness": (1e-4, 0), "lra": (1e-6, None)}
_RELU_EPS = 1e-3
_CONFIG = "configs/model/performer.yaml (or the `model.options.*` override)"


def gaussian_orthogonal_features(num_features: int, dim: int, orthogonal: bool = True, *,
                                 sign_fix: bool = True, generator: torch.Generator | None = None,
                                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Random projection ``W: [num_features, dim]`` with marginally ``N(0, I_dim)`` rows (see the module doc).

    ``orthogonal``: rows within each block of ``dim`` are exactly orthogonal (QR of a Gaussian block, with
    ``sign_fix`` the signs of ``diag(R)`` folded in so the block is Haar-distributed), then scaled by
    chi-distributed norms; otherwise i.i.d. rows. ``generator``: draw on the CPU from it (then move to
    ``device``) instead of from the global RNG on ``device``.
    """
    draw_device = "cpu" if generator is not None else device

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=draw_device, generator=generator)

    if not orthogonal:
        return randn(num_features, dim).to(device)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, r = torch.linalg.qr(randn(dim, dim))
        blocks.append((q * torch.sign(torch.diagonal(r)) if sign_fix else q).T)  # rows orthonormal
    norms = randn(num_features, dim).norm(dim=-1, keepdim=True)
    return (torch.cat(blocks)[:num_features] * norms).to(device)


def positive_random_features(x: torch.Tensor, projection: torch.Tensor, eps: float,
                             keep: torch.Tensor | None = None, *, stabiliser: str | None = None,
                             detach: bool = True) -> torch.Tensor:
    """FAVOR+ features ``φ(x̂)`` of ``x: [B, H, N, d]`` (already scaled) -> ``[B, H, N, m]``.

    ``stabiliser`` (the constant ``c`` in ``exp(W x̂ − ‖x̂‖²/2 − c)``): ``row`` (the maximum over the features
    of each row; queries), ``example`` (over the keys and features of each example and head) or ``batch`` (one
    maximum over the whole tensor). Default: ``row`` without ``keep``, ``example`` with it. ``keep: [B, N]``
    (keys only): the maximum is over real keys only and padded keys get zero features (an example, or with
    ``batch`` a batch, without real keys has ``c = 0``). ``detach``: no gradient through ``c``; otherwise ``c``'s
    gradient is that of the maximising entry ``w_j · x̂_n`` (:func:`_maximum`), computed on ``[.., d]`` rows
    rather than routed through the ``[B, H, N, m]`` tensor.
    """
    stabiliser = stabiliser or ("row" if keep is None else "example")
    if keep is not None and stabiliser == "row":
        raise ValueError("positive_random_features: keep (a key mask) needs the example or batch stabiliser")
    proj = F.linear(x.reshape(-1, x.shape[-1]), projection).view(*x.shape[:-1], -1)  # W x̂: [B, H, N, m], one mm
    source = proj.detach()
    if keep is not None:
        source = source.masked_fill(~keep[:, None, :, None], -torch.inf)
    c = _maximum(source, x, projection, stabiliser, detach)
    # m^(-1/2) (exp(a) + ε) = exp(a − log √m) + ε / √m, one fewer [B, H, N, m] temporary
    log_ratio = 0.5 * math.log(projection.shape[0])
    offset = x.pow(2).sum(-1, keepdim=True) / 2 + c + log_ratio
    features = torch.exp(proj + -offset) + eps * math.exp(-log_ratio)  # + -offset: no [B, H, N, m] negation in backward
    return features if keep is None else features * keep[:, None, :, None].to(features.dtype)


def _maximum(source: torch.Tensor, x: torch.Tensor, projection: torch.Tensor, stabiliser: str,
             detach: bool) -> torch.Tensor:
    """The stabiliser ``c``: the maximum of ``source = W x̂: [B, H, N, m]`` (detached) over the stabiliser's
    entries, kept with singleton dimensions (``row`` ``[B, H, N, 1]``, ``example`` ``[B, H, 1, 1]``, ``batch`` a
    scalar); entries masked with ``-inf`` (padded keys) never maximise, and a maximum over none of them is 0.

    With ``detach=False`` it carries the gradient of its maximising entry: ``c + (t − t.detach())`` with
    ``t = w_j · x̂_n`` at the (first) argmax ``(n, j)``, exactly ``c`` in value and ``w_j`` in gradient with
    respect to ``x̂_n``. That is the gradient of ``torch.max(dim=-1).values`` (the harness's query maximum) and,
    away from ties (probability zero for real-valued inputs), of ``amax``, which would split it among equal
    maxima.
    """
    b, h, n, m = source.shape
    if stabiliser == "row":
        c, j = source.max(-1, keepdim=True)  # [B, H, N, 1]
        return c if detach else c + _carrier(x, projection[j[..., 0]])
    if stabiliser == "batch":
        flat = source.argmax()
        c = torch.nan_to_num(source.reshape(-1)[flat], neginf=0.0)
        if detach:
            return c
        bi, hi, ni, ji = torch.unravel_index(flat, source.shape)
        return c + _carrier(x[bi, hi, ni], projection[ji]).squeeze(-1)
    c, flat = source.reshape(b, h, n * m).max(-1)  # example: [B, H]
    c = torch.nan_to_num(c[..., None, None], neginf=0.0)  # an example without real keys has c = 0
    if detach:
        return c
    rows = x.gather(2, (flat // m)[:, :, None, None].expand(b, h, 1, x.shape[-1]))  # x̂_n: [B, H, 1, d]
    return c + _carrier(rows, projection[flat % m][:, :, None, :])


def _carrier(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``t − t.detach()`` with ``t = (x · w)`` summed over the last dimension (kept): zero, with gradient ``w``."""
    t = (x * w).sum(-1, keepdim=True)
    return t - t.detach()


def linear_attention_sums(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor):
    """``φq (φkᵀ v)`` ``[B, H, N, Dh]`` and ``φq Σ_j φk_j`` ``[B, H, N, 1]`` from features ``[B, H, N, m]``.

    Both come from one pair of products, ``φq ((v | 1)ᵀ φk)ᵀ`` (``v`` with a column of ones), ordered so that the
    gradients of the ``[B, H, N, m]`` features come out contiguous (no copies of them in backward).
    """
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)  # [B, H, N, Dh + 1]
    out = phi_q @ (values.transpose(-1, -2) @ phi_k).transpose(-1, -2)  # [B, H, N, Dh + 1]
    return out[..., :-1], out[..., -1:]


@register("performer")
class PerformerAttention(QKVAttention):
    """FAVOR+ attention with positive orthogonal random features, and the LRA harnesses' variants (module doc).

    Options: ``num_features`` (256), ``orthogonal`` (True), ``redraw`` (training forwards between fresh
    features, 0: never; None: the variant's, favor_plus 1, harness 0), ``eps`` (None: the variant's, 1e-6,
    harness 1e-4, relu kernel 1e-3), ``variant`` (``favor_plus`` | ``harness`` | ``lra``), ``harness_fixes``
    (with ``harness``: any of ``scale``, ``padding``, ``stabiliser``), ``kernel`` (``softmax`` | ``relu``),
    ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    """

    def __init__(self, dim: int, num_heads: int, num_features: int = 256, orthogonal: bool = True,
                 redraw: int | None = None, eps: float | None = None, variant: str = "favor_plus",
                 harness_fixes: tuple[str, ...] | list[str] = (), kernel: str = "softmax", qkv_bias: bool = True,
                 qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        if variant not in VARIANTS or kernel not in KERNELS:
            raise ValueError(f"performer: variant must be one of {VARIANTS} and kernel one of {KERNELS}, got "
                             f"variant={variant!r}, kernel={kernel!r}; fix {_CONFIG}")
        if kernel == "relu" and variant == "harness":
            raise ValueError(f"performer: the harness variant has the softmax kernel only (its kernel_fn is "
                             f"ignored upstream); fix {_CONFIG}")
        if variant == "lra" and kernel == "softmax" and redraw is not None:
            raise ValueError(f"performer: variant lra redraws at every forward from the queries' sum; leave "
                             f"redraw unset (null); fix {_CONFIG}")
        harness_fixes = tuple(harness_fixes or ())
        if harness_fixes and (variant != "harness" or not set(harness_fixes) <= set(HARNESS_FIXES)):
            raise ValueError(f"performer: harness_fixes applies to variant harness and takes any of "
                             f"{HARNESS_FIXES}, got variant={variant!r}, harness_fixes={list(harness_fixes)} "
                             f"(protocol.quirks=fixed selects favor_plus); fix {_CONFIG}")
        default_eps, default_redraw = _SOFTMAX_DEFAULTS[variant]
        redraw = default_redraw if redraw is None else redraw
        if num_features < 1 or (redraw is not None and redraw < 0):
            raise ValueError(f"performer: num_features must be >= 1 and redraw >= 0 (0 = never), got "
                             f"num_features={num_features}, redraw={redraw}; fix {_CONFIG}")
        self.variant, self.kernel, self.harness_fixes = variant, kernel, frozenset(harness_fixes)
        self.eps = eps if eps is not None else (_RELU_EPS if kernel == "relu" else default_eps)
        self.num_features, self.orthogonal, self.redraw = num_features, orthogonal, redraw
        self.sign_fix = variant == "favor_plus"  # the harness's and LRA's QR blocks have no sign fix
        self.zero_padded_values = variant != "lra"  # LRA's fast attention ignores the padding mask
        if kernel == "softmax":
            self.register_buffer("features", gaussian_orthogonal_features(
                num_features, self.head_dim, orthogonal, sign_fix=self.sign_fix))
        else:  # deterministic features: no projection
            self.register_buffer("features", None)
        self.training_forwards = 0

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Replace ``W`` in place with a fresh draw (from ``generator``, else the global torch RNG; float32 at
        least)."""
        w = self.features
        dtype = torch.promote_types(w.dtype, torch.float32)  # no QR in half precision
        w.copy_(gaussian_orthogonal_features(*w.shape, self.orthogonal, sign_fix=self.sign_fix,
                                             generator=generator, dtype=dtype, device=w.device))

    def attend(self, q, k, v, mask):
        if self.kernel == "relu":
            return self._relu_kernel(q, k, v, mask)
        if self.variant == "lra":  # a fresh W at every forward, seeded by the batch's queries
            seed = math.ceil(q.detach().double().sum().item() * 1e7) % 2**63
            self.redraw_features(torch.Generator().manual_seed(seed))
        elif self.training and self.redraw:
            if self.training_forwards and self.training_forwards % self.redraw == 0:
                self.redraw_features()
            self.training_forwards += 1
        w = self.features.to(q.dtype)
        if self.variant == "harness":
            return self._harness(q, k, v, mask, w)
        scale = self.head_dim ** -0.25  # applied once: q̂·k̂ = q·k/√d
        lra = self.variant == "lra"
        phi_q = positive_random_features(q * scale, w, self.eps, stabiliser="row", detach=not lra)
        if lra:  # every key, padded ones included, in the stabiliser and the sums
            phi_k = positive_random_features(k * scale, w, self.eps, stabiliser="example", detach=False)
        else:
            phi_k = positive_random_features(k * scale, w, self.eps, keep=mask)
        numerator, normaliser = linear_attention_sums(phi_q, phi_k, v)
        normaliser = torch.where(normaliser.abs() <= self.eps, normaliser + 2 * self.eps, normaliser)
        return numerator / normaliser

    def _harness(self, q, k, v, mask, w):
        """The harness's forward, with the bugs named in ``harness_fixes`` corrected (module doc)."""
        fixes = self.harness_fixes
        scale = self.head_dim ** (-0.25 if "scale" in fixes else -0.5)  # upstream: d^(-1/4) twice (bug 1)
        keys = k * mask[:, None, :, None].to(k.dtype) * scale  # upstream: padded keys are zero keys, counted (bug 2)
        keep = mask if "padding" in fixes else None  # the fix: out of the stabiliser, zero features
        stabiliser = "example" if "stabiliser" in fixes else "batch"  # upstream: one per micro-batch (bug 3)
        phi_q = positive_random_features(q * scale, w, self.eps, stabiliser="row", detach=False)
        phi_k = positive_random_features(keys, w, self.eps, keep, stabiliser=stabiliser, detach=False)
        numerator, normaliser = linear_attention_sums(phi_q, phi_k, v)
        return numerator / normaliser

    def _relu_kernel(self, q, k, v, mask):
        """Deterministic generalized attention ``φ(x) = relu(x) + ε`` (LRA's default Performer)."""
        phi_q, phi_k = torch.relu(q) + self.eps, torch.relu(k) + self.eps
        if self.variant == "lra":  # LRA: no padding mask, no guard
            numerator, normaliser = linear_attention_sums(phi_q, phi_k, v)
            return numerator / normaliser
        numerator, normaliser = linear_attention_sums(phi_q, phi_k * mask[:, None, :, None].to(phi_k.dtype), v)
        return numerator / normaliser.clamp_min(torch.finfo(phi_q.dtype).tiny)

    def extra_repr(self) -> str:
        fixes = f", harness_fixes={sorted(self.harness_fixes)}" if self.harness_fixes else ""
        return (f"variant={self.variant}{fixes}, kernel={self.kernel}, num_features={self.num_features}, "
                f"orthogonal={self.orthogonal}, redraw={self.redraw}, eps={self.eps}")
