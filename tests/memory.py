"""The tensor-memory tracker (``lra.bench.measure.LivePeak``) for the attention specifications' "no quadratic
allocation" checks."""

from __future__ import annotations

import torch

from lra.bench.measure import LivePeak

__all__ = ["LivePeak", "tracked_long_forward"]


def tracked_long_forward(attn, n: int, dim: int, pad: int = 1000, seed: int = 1):
    """``attn`` on one ``[1, n, dim]`` N(0, 1) sequence whose last ``pad`` tokens are padding, without gradients,
    under a ``LivePeak``; returns ``(output, tracker)``."""
    x = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, n - pad :] = False
    with torch.no_grad(), LivePeak() as tracker:
        y = attn(x, mask)
    return y, tracker
