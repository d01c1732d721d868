"""Shared fixtures and marker handling: ``gpu`` tests skip without CUDA, ``neo4j`` tests without a server URI."""

from __future__ import annotations

import os

import pytest
import torch

import ogclip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_neo4j = pytest.mark.skip(reason="needs OGCLIP_NEO4J_URI pointing at a Neo4j server")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "neo4j" in item.keywords and not os.environ.get("OGCLIP_NEO4J_URI"):
            item.add_marker(skip_neo4j)


# Small versions of the shipped architectures: same code paths, CPU-fast.
MICRO_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MICRO_MINILM = {"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}}


@pytest.fixture(scope="session")
def micro_openclip() -> ogclip.OGCLIP:
    """OG-CLIP with an open_clip text transformer (the ViT-L/14 layout, shrunk)."""
    torch.manual_seed(0)
    return ogclip.create_model("og-clip-vit-l-14", device="cpu", **MICRO_OPENCLIP)


@pytest.fixture(scope="session")
def micro_minilm() -> ogclip.OGCLIP:
    """OG-CLIP with the pretrained MiniLM text tower (the og-clip-tiny layout, shrunk)."""
    torch.manual_seed(0)
    return ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM)


@pytest.fixture(params=["micro_openclip", "micro_minilm"])
def model(request: pytest.FixtureRequest) -> ogclip.OGCLIP:
    """Each text-tower family in turn; tests must not leave the shared model modified."""
    return request.getfixturevalue(request.param)


def images_and_masks(batch: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    masks = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float()
    return images, masks
