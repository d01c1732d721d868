"""OG-CLIP core: model registry, model, losses, training recipes, transforms, export bundle, settings.

This package imports torch, open_clip and pydantic only; Ray, the graph store and serving live in
``ogclip_jobs``, ``ogclip_kg`` and ``ogclip_serve``. The public names below load on first use, so that light
consumers (the command line's ``--help``, config validation) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OGCLIP": "ogclip.models",
    "create_model": "ogclip.models",
    "get_model_config": "ogclip.models",
    "list_models": "ogclip.models",
    "load_checkpoint": "ogclip.models",
    "save_checkpoint": "ogclip.models",
    "BundleError": "ogclip.bundle",
    "BundleInfo": "ogclip.bundle",
    "BundleVersionError": "ogclip.bundle",
    "export_bundle": "ogclip.bundle",
    "load_bundle": "ogclip.bundle",
    "LossTerms": "ogclip.losses",
    "contrastive_loss": "ogclip.losses",
    "og_clip_loss": "ogclip.losses",
    "Recipe": "ogclip.recipes",
    "create_recipe": "ogclip.recipes",
    "list_recipes": "ogclip.recipes",
    "register_recipe": "ogclip.recipes",
    "resolve_device": "ogclip.device",
    "Settings": "ogclip.settings",
    "get_settings": "ogclip.settings",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ogclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
