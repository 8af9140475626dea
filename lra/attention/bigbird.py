"""BigBird block-sparse attention (Zaheer et al., NeurIPS 2020), the ITC form: window, global and random blocks.

The sequence is cut into ``nb = ⌈N / b⌉`` blocks of ``b = block_size`` tokens (the last one padded
internally; exactly ``N`` outputs are returned). Per head, query block ``i`` attends, in one softmax of
``S = Q Kᵀ / √Dh``, to the real keys of the key blocks

    window(i) = {i − ⌊(w−1)/2⌋, …, i + ⌊w/2⌋} ∩ [0, nb)        w = num_window_blocks (3)
    global    = the first ⌈g/2⌉ and the last ⌊g/2⌋ blocks        g = num_global_blocks (2: first and last)
    random(i) = r blocks drawn from the blocks in neither set       r = num_random_blocks (3)

each block once. The global blocks' own queries attend to every key (``g x b`` rows of ``N`` keys). This is
the layout of the authors' code and of the Hugging Face port the Nyströmformer harness uses (block 64,
3 window blocks, first and last block global, 3 random blocks); "ETC" extra global tokens are not
implemented. When few blocks exist the sets overlap and are merged, so a short sequence gets dense
attention (the Hugging Face port switches to dense attention there too); with the default window and
global blocks and ``nb <= 3`` (e.g. ``block_size >= N``) the output is exact softmax attention (tested).

Random blocks: drawn per head (as the authors' code does) from a generator seeded with ``seed`` the first
time a block count ``nb`` is met, then cached: the layout is the same in every forward, in training and
evaluation, and in every module built with the same ``seed`` (the authors' TensorFlow code also fixes it
once, when the graph is built). Different layers may use different ``seed`` values; by default they share.

Padding: padded keys are masked inside every gathered block, so padding never reaches a real output;
the "last" global block of a padded sequence is then mostly padding (as in the authors' and Hugging Face
code). Cost: ``O(N b (w + g + r))`` memory for the sparse rows plus ``O(g b N)`` for the global rows,
never ``N x N``. ``dropout`` acts on the attention probabilities.

LRA's BigBird (``models/bigbird/``, ``protocol=lra``: recipe_model/lra_bigbird.yaml sets block 64, no dropout
(its sparse path drops nothing), no biases) differs in what is not reproduced here: its internal padding
slots count as real keys (a bool mask padded with ``-1e9``), its random blocks come from ``numpy.random.seed(
hash(module path))`` among the first ``min(N', 1024)/64`` blocks only, and it masks with ``-10000`` biases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lra.attention import register
from lra.attention.base import QKVAttention
from lra.attention.local import check_positive, joint_softmax, masked_scores, pad_sequence


@register("bigbird")
class BigBirdAttention(QKVAttention):
    """BigBird block-sparse attention (see the module doc). Options: ``block_size`` (64),
    ``num_window_blocks`` (3), ``num_global_blocks`` (2), ``num_random_blocks`` (3), ``seed`` (of the random
    blocks), ``dropout``, ``qkv_bias``, ``qkv_dim``, ``out_bias``."""

    def __init__(self, dim: int, num_heads: int, block_size: int = 64, num_window_blocks: int = 3,
                 num_global_blocks: int = 2, num_random_blocks: int = 3, seed: int = 0, dropout: float = 0.0,
                 qkv_bias: bool = True, qkv_dim: int | None = None, out_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qkv_dim=qkv_dim, out_bias=out_bias)
        check_positive("bigbird attention", block_size=block_size, num_window_blocks=num_window_blocks)
        for name, value in (("num_global_blocks", num_global_blocks), ("num_random_blocks", num_random_blocks)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"bigbird attention: option {name} must be an integer >= 0, got {value!r}. "
                                 f"Fix it in configs/model/bigbird.yaml or on the command line.")
        self.block_size, self.num_window_blocks = block_size, num_window_blocks
        self.num_global_blocks, self.num_random_blocks, self.seed = num_global_blocks, num_random_blocks, seed
        self.dropout = nn.Dropout(dropout)
        self._layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def global_blocks(self, nb: int) -> list[int]:
        """Indices of the global blocks among ``nb``: the first ``⌈g/2⌉`` and the last ``⌊g/2⌋``."""
        front, back = math.ceil(self.num_global_blocks / 2), self.num_global_blocks // 2
        return sorted(set(range(min(front, nb))) | set(range(max(nb - back, 0), nb)))

    def block_layout(self, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key blocks of every query block: ``index: [H, nb, K]`` (long) and ``valid: [H, nb, K]`` (bool).

        Row ``(h, i)`` lists window(i) ∪ global ∪ random(h, i) once each, then unused slots (``valid``
        False). Rows of global query blocks are listed too but not used (those queries see everything).
        """
        if nb not in self._layouts:
            generator = torch.Generator().manual_seed(self.seed)
            fixed_global = set(self.global_blocks(nb))
            before, after = (self.num_window_blocks - 1) // 2, self.num_window_blocks // 2
            rows = []
            for _ in range(self.num_heads):
                for i in range(nb):
                    fixed = set(range(max(0, i - before), min(nb, i + after + 1))) | fixed_global
                    others = [j for j in range(nb) if j not in fixed]
                    drawn = torch.randperm(len(others), generator=generator)[: self.num_random_blocks]
                    rows.append(sorted(fixed) + sorted(others[t] for t in drawn.tolist()))
            width = max(len(row) for row in rows)
            index = torch.zeros(len(rows), width, dtype=torch.long)
            valid = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, row in enumerate(rows):
                index[r, : len(row)], valid[r, : len(row)] = torch.tensor(row), True
            self._layouts[nb] = (index.view(self.num_heads, nb, width), valid.view(self.num_heads, nb, width))
        return self._layouts[nb]

    def attend(self, q, k, v, mask):
        b, h, n, d = q.shape
        bs = self.block_size
        nb = math.ceil(n / bs)
        index, valid = (t.to(q.device) for t in self.block_layout(nb))
        q, k, v = (pad_sequence(t, nb * bs) for t in (q, k, v))
        keep = pad_sequence(mask, nb * bs, dim=1, value=False)  # [B, nb * bs]
        heads = torch.arange(h, device=q.device)[:, None, None]
        k_sel, v_sel = (t.view(b, h, nb, bs, d)[:, heads, index].flatten(3, 4) for t in (k, v))  # [B, H, nb, K bs, Dh]
        keep_sel = (keep.view(b, nb, bs)[:, index] & valid[None, ..., None]).flatten(3, 4)  # [B, H, nb, K bs]
        scores = q.view(b, h, nb, bs, d) @ k_sel.transpose(-1, -2) * d**-0.5  # [B, H, nb, bs, K bs]
        out = joint_softmax([(masked_scores(scores, keep_sel[:, :, :, None, :]), v_sel)], self.dropout)
        out = out.reshape(b, h, nb * bs, d)
        starts = self.global_blocks(nb)
        if starts:  # the global blocks' queries attend to every key
            rows = (torch.tensor(starts)[:, None] * bs + torch.arange(bs)).flatten().to(q.device)
            global_scores = masked_scores(q[:, :, rows] @ k.transpose(-1, -2) * d**-0.5, keep[:, None, None, :])
            out = out.index_copy(2, rows, joint_softmax([(global_scores, v)], self.dropout))
        return out[:, :, :n]

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, num_window_blocks={self.num_window_blocks}, "
                f"num_global_blocks={self.num_global_blocks}, num_random_blocks={self.num_random_blocks}, "
                f"seed={self.seed}")
