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


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scaled dot-product attention as CPUs run it (an op torch's FLOP counter has no formula for): the same count
    as the GPU kernels, Q·Kᵀ and its product with V."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def image_flops(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of encoding one image with its mask: 2 per multiply-accumulate of every matmul (attention's included)
    and convolution, forward only; normalisation, activations and softmax are not counted (fvcore's and open_clip's
    convention, × 2).

    Counted with torch's FLOP counter, which sees neither ``nn.MultiheadAttention``'s fused inference path (its
    in-projection, attention and out-projection are one op) nor the CPU's attention kernel: the fused path is
    switched off while counting (the same arithmetic, run op by op) and the CPU kernel gets the GPU kernels' formula.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    image = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            model.encode_image(image, torch.ones(1, 1, image_size, image_size, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())
