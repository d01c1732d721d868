"""Zero-shot class embeddings: one vector per class from its prompts, as open_clip builds a zero-shot classifier.

A class is described by several prompts (the graph's templates). Each prompt is embedded at the full joint
dimension, L2-normalised, averaged over the class's prompts and normalised again. Vectors are stored and served at
the full dimension; a smaller granularity is the leading ``dim`` components re-normalised
(``ogclip.models.truncate``), which is what ``OGCLIP.encode_text(..., dim=d)`` gives for a single prompt, because
the MRL head nests its granularities as prefixes of one vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ogclip.models import OGCLIP
from ogclip.models.ogclip import ensemble


@torch.no_grad()
def class_embeddings(model: OGCLIP, prompts: Mapping[str, Sequence[str]], batch_size: int = 256) -> Tensor:
    """A ``[len(prompts), D]`` tensor of L2-normalised class embeddings, rows in ``prompts``' key order."""
    empty = [key for key, texts in prompts.items() if not texts]
    if empty:
        raise ValueError(f"classes without prompts: {', '.join(empty[:10])}")
    texts = [text for key in prompts for text in prompts[key]]
    owners = torch.tensor([row for row, key in enumerate(prompts) for _ in prompts[key]])
    was_training = model.training
    model.eval()
    try:
        features = torch.cat([model.text_features(texts[i:i + batch_size]).float()
                              for i in range(0, len(texts), batch_size)])
    finally:
        model.train(was_training)
    return ensemble(features, owners, len(prompts))
