"""Model registry in the manner of open_clip and timm: JSON architecture configs, ``create_model``, ``list_models``.

Configs shipped in ``configs/`` are registered at import; ``add_model_config`` registers more (a file or a folder).
A config's ``architecture`` key names the model class that builds it, registered with
``@register_architecture(name)`` as timm's ``register_model`` does; :func:`build_model` dispatches on it (creating
a model by name and loading a bundle both go through it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ogclip.config import ModelConfig
from ogclip.device import resolve_device
from ogclip.models.checkpoint import load_checkpoint
from ogclip.models.ogclip import OGCLIP

_CONFIGS: dict[str, dict[str, Any]] = {}
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``builder(cfg: ModelConfig, name: str | None) -> nn.Module`` builds configs whose
    ``architecture`` is ``name`` (a class with that constructor works)."""

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not builder:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = builder
        return builder

    return register


register_architecture("og-clip")(OGCLIP)


def build_model(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """A fresh model of ``cfg``, built by the class its ``architecture`` names."""
    if cfg.architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; registered: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[cfg.architecture](cfg, name=name)


def add_model_config(path: str | Path) -> list[str]:
    """Register ``name.json`` files (a file, or every one in a folder); returns the registered names."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    for file in files:
        data = json.loads(file.read_text())
        ModelConfig.model_validate(data)  # fail at registration, not at first use
        _CONFIGS[file.stem] = data
    return [f.stem for f in files]


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_CONFIGS)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The validated config of ``name``; nested dict overrides merge key by key (``vision_cfg={"layers": 2}``)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return ModelConfig.model_validate(_merge(_CONFIGS[name], overrides))


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    device: str | torch.device = "auto",
    **overrides: Any,
) -> OGCLIP:
    """Build a registered architecture, optionally loading weights from a local checkpoint path.

    ``pretrained`` is an OpenCLIP or OG-CLIP checkpoint file (safetensors or weights-only torch); nothing is
    downloaded. The model is returned in train mode with its text transformer frozen.
    """
    model = build_model(get_model_config(name, **overrides), name=name)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model.to(resolve_device(device))


add_model_config(Path(__file__).parent / "configs")
