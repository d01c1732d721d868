"""Data-parallel training sees the global contrastive batch: og_clip_loss and MPS-CLIP's loss gather features
across ranks.

Two gloo processes on 127.0.0.1 each hold part of a fixed batch. Every rank must return the loss (and α) a single
process computes on the whole batch, and the rank gradients averaged the way DDP averages them must equal the
single-process gradients, for the encoders, the logit scale and the BPA projections alike; for MPS-CLIP, with
several captions per image whose owners are renumbered across the ranks, and the perspective features.
"""

from __future__ import annotations

import contextlib
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import MPSCLIPRecipeConfig, MRLConfig
from ogclip.losses import og_clip_loss
from ogclip.models.mrl import MatryoshkaHead
from ogclip.recipes import TrainBatch, create_recipe

WORLD = 2
BATCH = 8
SPLITS = {"halves": (4, 4), "uneven": (5, 3)}


class _Tiny(nn.Module):
    """Stand-in for OG-CLIP: linear image and text encoders, a learnable logit scale and a Matryoshka head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 32)
        self.text = nn.Linear(10, 32)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.mrl = MatryoshkaHead(32, MRLConfig(granularities=4, alpha_momentum=0.0))

    def forward(self, x: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        return {
            "image_features": F.normalize(self.image(x), dim=-1),
            "text_features": F.normalize(self.text(tokens), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 2])  # classes repeat across the ranks' shards
    return torch.randn(BATCH, 12, generator=generator), torch.randn(BATCH, 10, generator=generator), labels


def _step(x: Tensor, tokens: Tensor, labels: Tensor) -> dict[str, object]:
    """One loss evaluation and backward pass of a fresh model; what the test compares."""
    model = _Tiny().train()
    terms = og_clip_loss(model(x, tokens), model.mrl, labels)
    terms.total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {"terms": {k: float(v.detach()) for k, v in vars(terms).items() if v.dim() == 0}, "alpha": terms.alpha,
            "grads": grads}


class _Scenes(nn.Module):
    """Stand-in for MPS-CLIP: linear image, text and K = 3 perspective encoders (the recipe's forward signature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 16)
        self.text = nn.Linear(10, 16)
        self.views = nn.Linear(12, 3 * 16)

    def forward(self, x: Tensor, tokens: Tensor, masks: Tensor, **parts: Tensor) -> dict[str, Tensor]:
        return {"image_features": F.normalize(self.image(x), dim=-1),
                "text_features": F.normalize(self.text(tokens), dim=-1),
                "perspective_features": F.normalize(self.views(x).view(len(x), 3, 16), dim=-1)}


CAPTIONS = 2  # per image: all of an image's captions are its positives


def _mps_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Images and their captions, (BATCH, CAPTIONS, 10): a shard of images brings its own captions."""
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(BATCH, 12, generator=generator), torch.randn(BATCH, CAPTIONS, 10, generator=generator),
            torch.arange(BATCH))


def _mps_step(x: Tensor, captions: Tensor, labels: Tensor) -> dict[str, object]:
    """MPS-CLIP's loss (every term) on images ``x`` and their captions; what the test compares."""
    model = _Scenes().train()
    batch = TrainBatch(images=x, masks=torch.ones(len(x), 1, 2, 2), texts=captions.flatten(0, 1),
                       text_owner=torch.arange(len(x)).repeat_interleave(CAPTIONS), labels=labels,
                       parts=x, part_masks=torch.ones(len(x), 1, 2, 2), part_owner=torch.arange(len(x)))
    terms = create_recipe(MPSCLIPRecipeConfig()).loss(model, batch, torch.Generator().manual_seed(0),
                                                       contextlib.nullcontext)
    terms["loss"].backward()
    return {"terms": {k: float(v.detach()) for k, v in terms.items()},
            "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()}}


STEPS = {"og-clip": (_step, _batch), "mps-clip": (_mps_step, _mps_batch)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for recipe, (step, batch) in STEPS.items():
            x, tokens, labels = batch()
            for name, sizes in SPLITS.items():
                start = sum(sizes[:rank])
                local = slice(start, start + sizes[rank])
                result = step(x[local], tokens[local], labels[local])
                for grad in result["grads"].values():  # DDP: all-reduce and divide by the world size
                    dist.all_reduce(grad)
                    grad /= WORLD
                results[recipe, name] = result
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    references = {recipe: step(*batch()) for recipe, (step, batch) in STEPS.items()}
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert set(results) == {(recipe, split) for recipe in STEPS for split in SPLITS}
        for (recipe, split), result in results.items():
            reference = references[recipe]
            assert result["terms"].keys() == reference["terms"].keys()
            for term, value in reference["terms"].items():
                assert math.isclose(result["terms"][term], value, rel_tol=1e-5, abs_tol=1e-6), (rank, split, term)
            if "alpha" in reference:
                torch.testing.assert_close(result["alpha"], reference["alpha"], rtol=1e-5, atol=1e-7)
            assert result["grads"].keys() == reference["grads"].keys()
            for name, grad in reference["grads"].items():
                assert grad.abs().sum() > 0, name
                torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, r=rank, s=split, n=name: f"rank {r} {s} {n}: {m}")
