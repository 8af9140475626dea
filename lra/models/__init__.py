"""Encoder (embeddings, pre-LN blocks with a pluggable attention, pooling) and classification heads."""

from lra.models.encoder import Encoder
from lra.models.heads import ClassifierHead, ConcatDualClassifierHead, DualClassifierHead, LRAModel, build_model

__all__ = ["ClassifierHead", "ConcatDualClassifierHead", "DualClassifierHead", "Encoder", "LRAModel", "build_model"]
