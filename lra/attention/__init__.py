"""The one registry of attention methods.

Every method is one module in this package that decorates its class with ``@register("name")``;
the registry name is also the ``configs/model/<name>.yaml`` a user selects. Interface::

    attn = lra.attention.build("softmax", dim=64, num_heads=2, dropout=0.1)
    y = attn(x, mask)        # x: [B, N, dim] float, mask: [B, N] bool (True = real token) -> [B, N, dim]
    lra.attention.available()  # sorted names

Modules found in this package are imported on first use, so adding a method is one file (plus its config).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

from lra.attention.base import AttentionBase, QKVAttention, in_fp32

__all__ = ["AttentionBase", "QKVAttention", "available", "build", "get", "in_fp32", "register"]

_REGISTRY: dict[str, type[nn.Module]] = {}
_loaded = False


def register(name: str):
    """Class decorator adding an attention class to the registry under ``name``."""

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention name {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available() -> list[str]:
    """Sorted names of every registered attention."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    """The class registered as ``name``; a clear error listing the valid names otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown attention {name!r}. Valid names: {', '.join(available())}. "
            f"Pick one of them (e.g. `model=transformer` or `model.attention=sdpa`)."
        )
    return _REGISTRY[name]


def build(name: str, dim: int, num_heads: int, **options) -> nn.Module:
    """Instantiate attention ``name`` for width ``dim`` split into ``num_heads`` heads.

    ``options`` are the method's own keyword arguments (see its docstring); an unknown option is an
    error naming the valid ones rather than a silent ignore.
    """
    cls = get(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p not in ("self", "dim", "num_heads")]
    unknown = [k for k in options if k not in valid]
    if unknown and not accepts_any:
        raise TypeError(
            f"attention {name!r} got unknown option(s) {unknown}; valid options: {valid}. "
            f"Fix the `options:` block of configs/model/<model>.yaml or the command-line override."
        )
    return cls(dim=dim, num_heads=num_heads, **options)
