"""Classification heads and the full model (encoder + head).

``ClassifierHead``: ``[B, D] -> Linear(D, H) -> ReLU -> Linear(H, C)`` (LRA's classifier_head and the
Nyströmformer harness's SCHead).

Two-input tasks (Retrieval): both inputs go through the *same* encoder (no cross attention), giving features
``u, v: [B, D]``; ``dual_head`` picks the head:

* ``nli`` (``DualClassifierHead``): ``[u, v, u*v, u-v]`` (``[B, 4D]``) ``-> Linear(4D, H) -> ReLU -> Linear(H, C)``
  (the Nyströmformer harness's SCHeadDual);
* ``concat`` (``ConcatDualClassifierHead``): ``[u, v]`` (``[B, 2D]``) ``-> Linear(2D, H) -> ReLU -> Linear(H, H//2)
  -> ReLU -> Linear(H//2, C)`` (LRA: lra_benchmarks/models/layers/common_layers.py ``classifier_head_dual`` with
  ``interaction=None``, the one matching/train.py used; ``H`` = the model's ``mlp_dim``: 512 -> 256 -> 2).

``init``: ``torch`` (PyTorch's defaults) or ``lra`` (flax ``nn.Dense``'s defaults, as LRA's heads use them:
truncated ``lecun_normal`` kernels, zero biases; ``lra.models.encoder.lecun_normal_``).
"""

from __future__ import annotations

import torch
from torch import nn

from lra.models.encoder import Encoder, lecun_normal_

DUAL_HEADS = ("nli", "concat")


def _init_dense_(net: nn.Module, init: str) -> None:
    if init not in ("torch", "lra"):
        raise ValueError(f"encoder.init must be 'torch' or 'lra', got {init!r}")
    if init == "lra":
        for layer in net.modules():
            if isinstance(layer, nn.Linear):
                lecun_normal_(layer.weight)
                nn.init.zeros_(layer.bias)


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, hidden: int, num_classes: int, in_features: int | None = None, init: str = "torch"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features or dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        _init_dense_(self.net, init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class DualClassifierHead(ClassifierHead):
    """``[u, v, u*v, u-v] -> Linear(4D, H) -> ReLU -> Linear(H, C)``."""

    def __init__(self, dim: int, hidden: int, num_classes: int, init: str = "torch"):
        super().__init__(dim, hidden, num_classes, in_features=4 * dim, init=init)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(torch.cat([u, v, u * v, u - v], dim=-1))


class ConcatDualClassifierHead(nn.Module):
    """``[u, v] -> Linear(2D, H) -> ReLU -> Linear(H, H//2) -> ReLU -> Linear(H//2, C)`` (LRA's dual head)."""

    def __init__(self, dim: int, hidden: int, num_classes: int, init: str = "torch"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, num_classes),
        )
        _init_dense_(self.net, init)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([u, v], dim=-1))


class LRAModel(nn.Module):
    """Encoder + head. ``forward(batch)`` takes the datamodules' batch dict and returns logits ``[B, C]``.

    Single input: ``{input_ids, mask}``; two inputs (``dual=True``): also ``{input_ids_2, mask_2}``, with the
    head ``dual_head`` (``nli`` or ``concat``, see the module doc).
    """

    def __init__(self, encoder: Encoder, num_classes: int, head_hidden: int, dual: bool = False,
                 dual_head: str = "nli", init: str = "torch"):
        super().__init__()
        if dual_head not in DUAL_HEADS:
            raise ValueError(f"encoder.dual_head must be one of {DUAL_HEADS}, got {dual_head!r}")
        self.encoder = encoder
        dim = encoder.norm.normalized_shape[0]
        self.dual = dual
        if not dual:
            self.head = ClassifierHead(dim, head_hidden, num_classes, init=init)
        else:
            head = DualClassifierHead if dual_head == "nli" else ConcatDualClassifierHead
            self.head = head(dim, head_hidden, num_classes, init=init)

    def forward(self, batch: dict) -> torch.Tensor:
        u = self.encoder(batch["input_ids"], batch["mask"])
        if not self.dual:
            return self.head(u)
        return self.head(u, self.encoder(batch["input_ids_2"], batch["mask_2"]))

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of every attention from the latest forward, keyed ``layer{i}/{name}``."""
        return {
            f"layer{i}/{name}": value
            for i, attn in enumerate(self.encoder.attentions())
            for name, value in attn.aux_losses.items()
        }


def build_model(encoder_cfg: dict, attention: str, options: dict, vocab_size: int, max_len: int,
                num_classes: int, dual: bool = False) -> LRAModel:
    """The model of a run: ``Encoder(**encoder_cfg)`` with attention ``attention(**options)`` and its head.

    ``encoder_cfg`` is the protocol's ``encoder`` block; ``head_hidden`` and ``dual_head`` go to the head,
    ``init`` to both, the attention dropouts reach the attentions through the model config's ``options`` and
    are dropped here.
    """
    enc = dict(encoder_cfg)
    head_hidden = enc.pop("head_hidden")
    dual_head = enc.pop("dual_head", "nli")
    for key in ("attention_dropout", "efficient_attention_dropout"):  # reach the attentions via model options
        enc.pop(key, None)
    encoder = Encoder(vocab_size=vocab_size, max_len=max_len, attention_name=attention,
                      attention_options=options, **enc)
    return LRAModel(encoder, num_classes=num_classes, head_hidden=head_hidden, dual=dual, dual_head=dual_head,
                    init=enc.get("init", "torch"))
