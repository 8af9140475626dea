"""Reformer's LSH attention (Kitaev, Kaiser & Levskaya, ICLR 2020), after the authors' trax ``LSHSelfAttention``.

``variant="trax"`` (default). Per head, with shared query/key vectors ``q_i`` (one projection, ``q_proj``) and
values ``v_i``:

1. Keys are the queries rescaled to unit length, ``k_j = q_j / sqrt(‖q_j‖² + Dh·1e-6)`` (trax's
   ``length_normalized`` followed by ``/ √Dh``); scores are ``s_ij = q_i · k_j`` with no further scaling.
2. Angular LSH, ``num_hashes`` rounds: a random rotation ``R_r: [Dh, b/2]`` (``b`` = number of buckets,
   even) gives ``h_r(q) = argmax([q R_r ; −q R_r])``. With factors ``[b1, b2, ...]`` (trax's factorised
   hashing) each factor hashes with its own slice of ``R_r`` and ``h = h¹ + b1·h² + b1·b2·h³ ...``, so
   ``b = b1·b2·...`` buckets cost only ``(b1 + b2 + ...)/2`` rotated coordinates per token.
   ``num_buckets=None`` takes trax's rule ``b = 2·max(1, N' // chunk_size)`` (the paper's
   ``chunk = 2N/b``), factorised as ``[2^⌈log2 √b⌉, 2·(b // (2·2^⌈log2 √b⌉))]`` when ``b > 128``.
3. Sorting, as trax and HuggingFace: the rounds are concatenated (round-major) and each round sorted by
   ``(bucket, position)``; the merged ``R·N'`` sorted slots are cut into ``R·N'/chunk_size`` chunks, and each
   chunk attends to its own keys and to those of the chunk before it on that merged axis, circularly. So
   round ``r``'s first chunk looks back at round ``r−1``'s last chunk, and round 0's first chunk at the last
   round's last chunk (a key can then sit twice in one window; it is counted twice, as upstream). With a
   single chunk in all it attends to that chunk once.
4. A query never attends to itself unless no other real key is in its window: its own score (every copy) is
   replaced by ``finfo.min / 2`` (above padding's ``finfo.min``): trax's ``−1e5`` self penalty made exact.
   Padded keys get ``finfo.min``.
5. Round ``r`` gives ``o_i^r = Σ_j softmax_j(s_ij) v_j`` and ``z_i^r = logsumexp_j s_ij`` over its window;
   rounds are combined as ``o_i = Σ_r softmax_r(z_i^r) o_i^r`` (trax's combination of rounds).
   ``count_duplicates=True`` also subtracts ``log N_ij`` from ``s_ij``, ``N_ij`` = number of times ``j`` sits
   in query ``i``'s windows over all rounds (the paper's duplicate correction; trax's released layer and
   HuggingFace omit it). With it, the output is exactly softmax attention over the union of the windows.

Shapes: ``q, v: [B, H, N, Dh]`` -> merged chunks ``[B, H, R·C, chunk, Dh]`` with ``C = N' / chunk``, where
``N'`` is ``N`` rounded up to a multiple of ``chunk_size`` (internal padding, sliced off at the end).
Scores are ``[B, H, R·C, chunk, 2·chunk]``: memory ``O(R·N·chunk)``, no ``N x N`` matrix.

Padding: padded tokens (and the internal padding) are put in an extra bucket after every real bucket (as trax
does with a mask, and HuggingFace 3.3.1 whenever the batch has padding), so they sort after all real tokens in
every round and never change which real tokens share a chunk; they are also masked as keys. Real outputs
therefore do not depend on the padded tokens' values. They do depend on the padded length ``N'`` through the
round boundaries of step 3 (round ``r``'s first chunk looks back at round ``r−1``'s last ``chunk_size``
slots, padding when there is enough of it), as in trax and HuggingFace; batches here are padded to a fixed
``data.seq_len``, so an example's outputs do not depend on the rest of its batch.

Randomness (``redraw_hashes``): the rotations (one set per head and round) are drawn from a generator seeded
by the ``hash_seed`` buffer (drawn from torch's RNG at construction, saved in checkpoints) unless redrawn.
``train`` (default): fresh rotations from torch's RNG at every training forward, as trax, and seeded ones in
eval, so eval forwards are deterministic; ``always``: fresh at every forward, eval included (HuggingFace's
``LSHSelfAttention`` with ``hash_seed=None``, so the Nyströmformer harness's evaluations are random: an
upstream quirk, selected by ``${quirk:always,train}`` in recipe_model/nystrom_reformer.yaml); ``never``: the
seeded ones always.

The Nyströmformer harness (``LRA/code/attention_reformer.py``: HuggingFace transformers 3.3.1 ``LSHSelfAttention``
with ``ReformerConfig()`` defaults, 2 hashes) is this variant with ``num_hashes=2``, ``chunk_size=64``,
``qkv_bias=False``, ``redraw_hashes=always``, dropout 0 (measured: max |Δ| ≈ 3e-7 against the verbatim HF layer
given the same rotations; the ListOps logits of ``protocol=nystrom model=reformer`` are within 6e-8 of the
harness's model running HF 3.3.1, float32, padded batch, same weights and rotations). Remaining differences, none
changing outputs at the harness's power-of-two lengths: HF derives ``b`` as the power of two ≤ ``2N/64`` (cached at
the first forward), the same as the rule above for N = 1024/2048/4096; HF does not pad internally (it needs ``R·N``
divisible by 64); HF's masks are ``−1e9``/``−1e5`` constants (the same weights for real queries); HF's LSH layer
has no output projection, the harness's ``ff`` (a Linear with bias) plays the role of ``out_proj``.

``variant="lra"`` reproduces LRA's code (google-research/long-range-arena ``models/reformer/
reformer_attention.py``, selected by ``protocol=lra``), every upstream quirk included: the input is zero-padded
by ``chunk_size − N mod chunk_size`` (a whole ``chunk_size`` when it divides ``N``; LRA's ``chunk_len`` 10);
``num_hashes × num_buckets`` chunks (LRA: ``chunk_size = n_hashes·n_buckets``, a number of chunks, so each is
``N'/num_buckets`` long) over the sorted rounds, each with the chunk before it (circular); keys are the
queries themselves (no unit length), scores ``q·k · √Dh`` (multiplied, not divided: an upstream bug); no self
exclusion, no padding mask (padded and internally padded tokens are ordinary keys, their values not zeroed),
no attention dropout; one rotation per round shared by all heads and examples, fixed for the whole run (LRA
uses ``PRNGKey(0)`` at every call; the rotation here comes from the ``hash_seed`` generator, so its draw
differs); the attention width is the model width (LRA ignores ``qkv_dim`` here: ``qkv_dim`` is not used) and
there is no output projection (the merged heads are the output). Options that do not apply to it:
``count_duplicates``, ``redraw_hashes`` (always ``never``), ``dropout`` (must be 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import AttentionBase, QKVAttention

_CONFIG = "configs/model/reformer.yaml (or the `model.options.*` override)"
VARIANTS = ("trax", "lra")
REDRAWS = ("train", "always", "never")


def auto_bucket_factors(length: int, chunk_size: int) -> list[int]:
    """trax's bucket count for ``length`` tokens: ``[b]``, or its two factors when ``b > 128`` (module doc)."""
    buckets = 2 * max(1, length // chunk_size)
    if buckets <= 128:
        return [buckets]
    first = 2 ** math.ceil(math.log2(math.sqrt(buckets)))
    return [first, 2 * (buckets // (2 * first))]


def look_back(t: torch.Tensor, chunk_dim: int) -> torch.Tensor:
    """Each chunk followed by the chunk before it (circular): ``[..., C, c, ...] -> [..., C, 2c, ...]``.

    ``chunk_dim`` is the merged (round × chunk) axis, so the first chunk of a round is followed by the last
    chunk of the previous round. With a single chunk it returns ``t`` unchanged.
    """
    if t.shape[chunk_dim] == 1:
        return t
    return torch.cat([t, t.roll(1, dims=chunk_dim)], dim=chunk_dim + 1)


def take_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t: [B, H, R or 1, N, D]`` at the token ids ``index: [B, H, R, N]`` -> ``[B, H, R, N, D]``."""
    b, h, r, n = index.shape
    return t.expand(b, h, r, -1, -1).gather(3, index[..., None].expand(-1, -1, -1, -1, t.shape[-1]))


@register("reformer")
class ReformerAttention(AttentionBase):
    """LSH attention with shared query/key projection (see the module doc for the math and choices).

    Options: ``num_hashes`` (2, the Nyströmformer harness), ``chunk_size`` (64), ``num_buckets`` (None: from
    the length; an even int; or a list of even factors), ``count_duplicates`` (False), ``redraw_hashes``
    (``train`` | ``always`` | ``never``), ``dropout`` (on the attention probabilities of each round),
    ``variant`` (``trax`` | ``lra``), ``qkv_bias``, ``qkv_dim``, ``out_bias``.
    Parameters: ``q_proj`` (queries = keys), ``v_proj``, ``out_proj`` (the names of ``softmax``; no
    ``out_proj`` in the ``lra`` variant).
    """

    split_heads = QKVAttention.split_heads
    merge_heads = QKVAttention.merge_heads

    def __init__(self, dim: int, num_heads: int, num_hashes: int = 2, chunk_size: int = 64,
                 num_buckets: int | Sequence[int] | None = None, count_duplicates: bool = False,
                 redraw_hashes: str = "train", dropout: float = 0.0, variant: str = "trax",
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        lra = variant == "lra"
        super().__init__(dim, num_heads, inner_dim=None if lra else qkv_dim)
        factors = None if num_buckets is None else [num_buckets] if isinstance(num_buckets, int) else list(num_buckets)
        bad_buckets = factors is not None and (not factors or any(b < 2 or b % 2 for b in factors))
        if num_hashes < 1 or chunk_size < 1 or bad_buckets:
            raise ValueError(
                f"reformer: num_hashes={num_hashes} and chunk_size={chunk_size} must be >= 1, and num_buckets="
                f"{num_buckets} must be null (from the length), an even int >= 2 or a list of such factors "
                f"(angular LSH hashes into argmax[xR; -xR], an even count). Fix {_CONFIG}.")
        if variant not in VARIANTS or redraw_hashes not in REDRAWS:
            raise ValueError(f"reformer: variant must be one of {VARIANTS} and redraw_hashes one of {REDRAWS}, "
                             f"got {variant!r}, {redraw_hashes!r}. Fix {_CONFIG}.")
        if lra and (factors is None or len(factors) != 1 or count_duplicates or dropout or redraw_hashes != "never"):
            raise ValueError(f"reformer: variant lra needs one even num_buckets (LRA: 10), count_duplicates false, "
                             f"dropout 0 and redraw_hashes never (LRA's hashes are fixed). Fix {_CONFIG}.")
        self.variant, self.num_hashes, self.chunk_size = variant, num_hashes, chunk_size
        self.bucket_factors = factors  # None: from the length at each forward
        self.count_duplicates, self.redraw_hashes = count_duplicates, redraw_hashes
        self.q_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)  # queries, and keys (trax: at unit length)
        self.v_proj = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.out_proj = None if lra else nn.Linear(self.inner_dim, dim, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("hash_seed", torch.randint(0, 2**62, ()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.variant == "lra":
            n = x.shape[1]
            x = nn.functional.pad(x, (0, 0, 0, self.chunk_size - n % self.chunk_size))  # zero inputs
            q, v = self.split_heads(self.q_proj(x)), self.split_heads(self.v_proj(x))
            return self.merge_heads(self.attend_lra(q, v))[:, :n]
        q = self.split_heads(self.q_proj(x))
        v = self.split_heads(self.v_proj(x) * mask[..., None].to(x.dtype))
        return self.out_proj(self.merge_heads(self.attend(q, v, mask)))

    def rotations(self, rotated_size: int, device: torch.device, heads: int | None = None) -> torch.Tensor:
        """Random rotations ``[H, Dh, R, rotated_size]`` in float32: seeded, or fresh (``redraw_hashes``)."""
        shape = (heads or self.num_heads, self.head_dim, self.num_hashes, rotated_size)
        if self.redraw_hashes == "always" or (self.training and self.redraw_hashes == "train"):
            return torch.randn(shape, device=device)
        generator = torch.Generator().manual_seed(int(self.hash_seed))
        return torch.randn(shape, generator=generator).to(device)

    def hash_buckets(self, q: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Bucket of every token in every round, ``[B, H, R, N]``, and the number of real buckets ``b``.

        ``q: [B, H, N, Dh]``, ``mask: [B, N]``: padded tokens get bucket ``b`` (after all real ones); ``None``:
        every token is hashed (the ``lra`` variant, whose rotations are shared by the heads).
        """
        factors = self.bucket_factors or auto_bucket_factors(q.shape[-2], self.chunk_size)
        dtype = torch.promote_types(q.dtype, torch.float32)
        heads = 1 if self.variant == "lra" else None
        rotations = self.rotations(sum(factors) // 2, q.device, heads).to(dtype)
        rotations = rotations.expand(self.num_heads, -1, -1, -1)
        rotated = torch.einsum("bhnd,hdrk->bhrnk", q.to(dtype), rotations)  # [B, H, R, N, sum(b_f)/2]
        buckets = torch.zeros(rotated.shape[:-1], dtype=torch.long, device=q.device)
        start, stride = 0, 1
        for factor in factors:
            part = rotated[..., start : start + factor // 2]
            buckets += stride * torch.cat([part, -part], dim=-1).argmax(-1)
            start, stride = start + factor // 2, stride * factor
        if mask is None:
            return buckets, stride
        return buckets.masked_fill(~mask[:, None, None, :], stride), stride

    def sorted_chunks(self, q, v, buckets, chunk):
        """Sort every round by ``(bucket, position)``, concatenate the rounds and cut the merged ``R·N`` slots
        into chunks of ``chunk``. Returns the sorted ``q`` and ``v`` ``[B, H, R·C, chunk, Dh]``, the token id
        of every slot ``[B, H, R·C, chunk]`` and each token's sorted slot within its round ``[B, H, R, N]``."""
        length = q.shape[-2]
        positions = torch.arange(length, device=q.device)
        order = (buckets * length + positions).argsort(dim=-1)  # token id in each sorted slot, [B, H, R, N]
        slot = torch.empty_like(order).scatter_(3, order, positions.expand_as(order))  # sorted slot of each token

        def merged(t):  # [B, H, R, N, ...] -> [B, H, R·N / chunk, chunk, ...]
            return t.flatten(2, 3).unflatten(2, (-1, chunk))

        return (merged(take_tokens(q[:, :, None], order)), merged(take_tokens(v[:, :, None], order)),
                merged(order), slot)

    def unsort(self, out, lse, slot):
        """Per-slot outputs ``[B, H, R·C, chunk, Dh]`` and logsumexps back to token order, rounds combined."""
        b, h, r, length = slot.shape
        out = take_tokens(out.reshape(b, h, r, length, -1), slot)  # [B, H, R, N, Dh]
        lse = lse.reshape(b, h, r, length).gather(3, slot)  # [B, H, R, N]
        return (torch.softmax(lse, dim=2)[..., None] * out).sum(2)

    def attend(self, q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """LSH attention of shared query/keys ``q`` and values ``v`` (``[B, H, N, Dh]``) -> ``[B, H, N, Dh]``."""
        n, c = q.shape[-2], self.chunk_size
        extra = -n % c
        if extra:  # internal padding up to a multiple of the chunk size
            q, v = (nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, v))
            mask = nn.functional.pad(mask, (0, extra), value=False)
        buckets, _ = self.hash_buckets(q, mask)
        sq, sv, q_ids, slot = self.sorted_chunks(q, v, buckets, c)
        sk = look_back(sq * torch.rsqrt(sq.pow(2).sum(-1, keepdim=True) + self.head_dim * 1e-6), 2)
        sv, k_ids = look_back(sv, 2), look_back(q_ids, 2)  # [B, H, R·C, 2c, Dh] / [B, H, R·C, 2c]
        k_real = mask[:, None, :].expand(-1, q.shape[1], -1).gather(2, k_ids.flatten(2)).view_as(k_ids)

        scores = sq @ sk.transpose(-1, -2)  # [B, H, R·C, c, 2c]
        if self.count_duplicates:
            scores = scores - duplicate_counts(slot, q_ids, k_ids, c).to(scores.dtype).log()
        low = torch.finfo(scores.dtype).min
        # a token's own key gets low / 2 (used only when it has no other), a padded key low: one pass over scores
        fill = torch.where(k_real, scores.new_tensor(low / 2), scores.new_tensor(low))[..., None, :]  # [.., 1, 2c]
        masked = (q_ids[..., :, None] == k_ids[..., None, :]) | ~k_real[..., None, :]
        scores = torch.where(masked, fill, scores)
        out = self.dropout(torch.softmax(scores, dim=-1)) @ sv  # [B, H, R·C, c, Dh]
        return self.unsort(out, torch.logsumexp(scores, dim=-1), slot)[:, :, :n]

    def attend_lra(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """LRA's LSH attention on the (already padded) ``q, v: [B, H, N', Dh]`` (module doc, variant lra)."""
        length, (buckets_per_round,) = q.shape[-2], self.bucket_factors
        if length % buckets_per_round:
            raise ValueError(f"reformer (variant lra): the padded length {length} must be a multiple of "
                             f"num_buckets={buckets_per_round} (LRA cuts it into that many chunks per round). "
                             f"Fix {_CONFIG}.")
        buckets, _ = self.hash_buckets(q, None)
        sq, sv, _, slot = self.sorted_chunks(q, v, buckets, length // buckets_per_round)
        scores = sq @ look_back(sq, 2).transpose(-1, -2) * self.head_dim**0.5  # multiplied by √Dh, as LRA
        out = torch.softmax(scores, dim=-1) @ look_back(sv, 2)
        return self.unsort(out, torch.logsumexp(scores, dim=-1), slot)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, num_hashes={self.num_hashes}, chunk_size={self.chunk_size}, "
                f"num_buckets={self.bucket_factors}, count_duplicates={self.count_duplicates}, "
                f"redraw_hashes={self.redraw_hashes}")


def duplicate_counts(slot: torch.Tensor, q_ids: torch.Tensor, k_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """``N_ij``: how many times key ``j`` sits in query ``i``'s windows over all rounds -> ``[B, H, R·C, c, w]``.

    ``slot: [B, H, R, N']`` is each token's sorted slot within each round; ``q_ids: [B, H, R·C, c]`` and
    ``k_ids: [B, H, R·C, w]`` the token ids of every merged chunk's queries and window. In round ``r'`` query
    ``i`` sits in merged chunk ``G = (r' N' + slot) // c``; its window is chunk ``G`` and chunk ``G − 1``
    (mod ``R·C``; only ``G`` when there is one chunk in all), which for ``G`` first in its round is the last
    chunk of round ``r' − 1``.
    """
    b, h, r, length = slot.shape
    per_round = length // chunk
    merged_chunks = r * per_round
    chunk_of = slot // chunk + per_round * torch.arange(r, device=slot.device)[:, None]  # merged chunk, [B, H, R, N']

    def in_every_round(of, ids):  # chunk of each id in each round: [B, H, R', R·C, w]
        return of.gather(3, ids.flatten(2)[:, :, None].expand(-1, -1, r, -1)).unflatten(3, ids.shape[2:])

    q_chunk = in_every_round(chunk_of, q_ids)[..., :, None]  # [B, H, R', R·C, c, 1]
    k_chunk = in_every_round(chunk_of, k_ids)[..., None, :]  # [B, H, R', R·C, 1, w]
    count = (k_chunk == q_chunk).to(torch.long)
    if merged_chunks > 1:
        before = (q_chunk - 1) % merged_chunks
        k_chunk_round_before = in_every_round(chunk_of.roll(1, dims=2), k_ids)[..., None, :]
        count += torch.where(q_chunk % per_round > 0, k_chunk == before, k_chunk_round_before == before)
    return count.sum(2)
