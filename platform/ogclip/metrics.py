"""Zero-shot classification metrics: per-class top-1 accuracy and its mean over classes (mAcc)."""

from __future__ import annotations

import torch
from torch import Tensor


def zero_shot_predict(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """Index of the most similar class for each image (both inputs L2-normalised, same dimension)."""
    if image_embeddings.shape[-1] != class_embeddings.shape[-1]:
        raise ValueError(
            f"embedding dims differ: images {image_embeddings.shape[-1]}, classes {class_embeddings.shape[-1]}"
        )
    return (image_embeddings @ class_embeddings.T).argmax(dim=-1)


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Top-1 accuracy of each class; NaN for classes with no sample (they are left out of mAcc)."""
    correct = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    total.index_add_(0, labels.cpu(), torch.ones_like(labels, dtype=torch.float64).cpu())
    correct.index_add_(0, labels.cpu(), (predictions.cpu() == labels.cpu()).to(torch.float64))
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))


def mean_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """mAcc: the mean of per-class top-1 accuracies over the classes that have samples (the paper's Avg-Acc)."""
    return float(per_class_accuracy(predictions, labels, num_classes).nanmean())


@torch.no_grad()
def image_flops(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of encoding one image with its mask (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    image = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(image, torch.ones(1, 1, image_size, image_size, device=device))
    return int(counter.get_total_flops())
