"""Config resolvers every entry point needs (registered on ``import lra``).

``${lra_groups:}`` lists the config groups a user picks from (``group: option, option``), for ``lra-train --help``
(``configs/hydra/help/lra.yaml``): every folder of ``configs/`` but the ones chosen for the user (``recipe``,
``recipe_model``: by protocol, task and model) and those of other tools (``bench``, ``hydra``).

``${run_id:}`` is a short random id drawn once per process: run and sweep folders carry it after their
timestamp, so two runs started in the same second never share a folder (logs, checkpoints).

``${quirk:UPSTREAM,FIXED}`` is ``UPSTREAM`` when the run's ``protocol.quirks`` is ``upstream`` and ``FIXED`` when it
is ``fixed``. A protocol named after a published harness (``nystrom``, ``lra``) sets ``quirks: upstream``, so it
computes what that code computed, bugs included; ``protocol.quirks=fixed`` runs the same recipe with every
upstream bug the suite knows of corrected. Only the settings that are bugs upstream use it (each with a comment
naming the upstream file); deliberate upstream choices are plain settings.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from omegaconf import OmegaConf

QUIRK_MODES = ("upstream", "fixed")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HIDDEN_GROUPS = ("recipe", "recipe_model", "bench", "hydra")


def user_groups() -> str:
    """``group: option, option`` per line for every config group a user chooses from (see the module doc)."""
    lines = []
    for folder in sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name not in HIDDEN_GROUPS):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            lines.append(f"{folder.name}: {', '.join(options)}")
    return "\n".join(lines)


def quirk(upstream, fixed, *, _root_):
    mode = OmegaConf.select(_root_, "protocol.quirks", default="fixed")
    if mode not in QUIRK_MODES:
        raise ValueError(f"protocol.quirks must be one of {QUIRK_MODES}, got {mode!r}")
    return upstream if mode == "upstream" else fixed


RUN_ID = secrets.token_hex(3)

if not OmegaConf.has_resolver("quirk"):
    OmegaConf.register_new_resolver("quirk", quirk)
if not OmegaConf.has_resolver("lra_groups"):
    OmegaConf.register_new_resolver("lra_groups", user_groups)
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: RUN_ID)
