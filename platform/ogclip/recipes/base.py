"""The recipe interface and its registry (``@register_recipe``, as timm registers models)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ogclip.config import RecipeConfig


@dataclass
class TrainBatch:
    """One training step's batch on the device: images (B,3,S,S) and masks (B,1,S,S) as the data gives them, the
    texts as token ids with the image each belongs to (``OGCLIP.forward``'s ``text_owner``; owners past the last
    image are hard negatives), and the class index of each image (same-class pairs are positives).

    Scenes (``data: {kind: scenes}``) also bring their sub-perspectives: ``parts`` (P,3,S,S) and ``part_masks``
    (P,1,S,S), one masked view per visible target, as the image tower reads them, and ``part_owner`` (P,), the
    image each belongs to; their texts are captions, several per image."""

    images: Tensor
    masks: Tensor
    texts: Tensor
    text_owner: Tensor
    labels: Tensor
    parts: Tensor | None = None
    part_masks: Tensor | None = None
    part_owner: Tensor | None = None


Autocast = Callable[[], AbstractContextManager[Any]]


class Recipe(ABC):
    """One training method. Subclasses set ``kind`` (the config's discriminator) and implement :meth:`loss`."""

    kind: ClassVar[str]

    def __init__(self, cfg: RecipeConfig) -> None:
        if cfg.kind != self.kind:
            raise ValueError(f"a {type(self).__name__} takes a {self.kind!r} config, not {cfg.kind!r}")
        self.cfg = cfg

    def model_overrides(self) -> dict[str, Any]:
        """What the recipe changes in the registered architecture's config (nested dicts merge key by key)."""
        return {}

    def build_model(self, architecture: str, pretrained: str | Path | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        """The recipe's model: the registered architecture with :meth:`model_overrides`, optional local weights."""
        from ogclip.models import create_model

        return create_model(architecture, pretrained=pretrained, device=device, **self.model_overrides())

    @abstractmethod
    def loss(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator,
             autocast: Autocast) -> dict[str, Tensor]:
        """The step's loss terms: ``loss`` (what is backpropagated) and any others to log (scalars or vectors).

        ``model`` may be the DDP wrapper (its ``module`` is the recipe's model); ``generator`` draws the step's
        random choices; the forward pass runs under ``autocast()`` (bf16 on GPU), the losses in fp32."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:  # noqa: B027 (optional hook)
        """Called after each optimiser step with the unwrapped model, the number of steps done and the run's total
        (an EMA teacher's update follows a schedule over the run). Nothing by default."""


_RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make ``cls`` the recipe of configs whose ``kind`` is ``cls.kind``."""
    if cls.kind in _RECIPES and _RECIPES[cls.kind] is not cls:
        raise ValueError(f"recipe {cls.kind!r} is already registered by {_RECIPES[cls.kind].__name__}")
    _RECIPES[cls.kind] = cls
    return cls


def list_recipes() -> list[str]:
    """The registered recipes' kinds."""
    return sorted(_RECIPES)


def create_recipe(cfg: RecipeConfig) -> Recipe:
    """The recipe of ``cfg`` (dispatched on its ``kind``)."""
    if cfg.kind not in _RECIPES:
        raise ValueError(f"unknown recipe {cfg.kind!r}; registered: {', '.join(list_recipes())}")
    return _RECIPES[cfg.kind](cfg)
