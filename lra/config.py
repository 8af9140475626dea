"""Config resolvers every entry point needs (registered on ``import lra``).

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

from omegaconf import OmegaConf

QUIRK_MODES = ("upstream", "fixed")


def quirk(upstream, fixed, *, _root_):
    mode = OmegaConf.select(_root_, "protocol.quirks", default="fixed")
    if mode not in QUIRK_MODES:
        raise ValueError(f"protocol.quirks must be one of {QUIRK_MODES}, got {mode!r}")
    return upstream if mode == "upstream" else fixed


RUN_ID = secrets.token_hex(3)

if not OmegaConf.has_resolver("quirk"):
    OmegaConf.register_new_resolver("quirk", quirk)
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: RUN_ID)
