"""Reading and writing model weights: safetensors, or weights-only torch files; never arbitrary pickles.

One loader serves OpenCLIP checkpoints (``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``, either
state-dict layout) and OG-CLIP's own: the keys a model adds to a CLIP (``ADDED_PREFIXES``: OG-CLIP's ROI conv and
Matryoshka head, MPS-CLIP's adapters) may be missing, and then keep their initialisation (the ROI conv stays zero
and the adapters start as the identity, so the loaded model equals the checkpoint's CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import convert_to_custom_text_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which keys and why."""


@dataclass(frozen=True)
class LoadReport:
    path: Path
    loaded: int
    initialised: tuple[str, ...]  # the model's added keys the checkpoint lacked


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a safetensors or weights-only torch checkpoint, with wrappers and ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for foreign or unsafe pickles
            raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # open_clip's original CLIP layout keeps the text tower at the top level; ours nests it under "text.".
    return convert_to_custom_text_state_dict(state)


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load ``path`` into ``model``; every model key must be present except the parts the model adds to a CLIP
    (``model.ADDED_PREFIXES``: OG-CLIP's ROI conv and Matryoshka head, an MPS-CLIP's adapters), and nothing extra."""
    path = Path(path)
    state = read_state_dict(path)
    expected = model.state_dict()
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shape_errors:
        raise CheckpointError(f"{path}: shapes do not match the architecture: " + "; ".join(shape_errors[:5]))
    result = model.load_state_dict(state, strict=False)
    added = getattr(model, "ADDED_PREFIXES", ())
    missing = [k for k in result.missing_keys if not k.startswith(added)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit the architecture; missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return LoadReport(path=path, loaded=len(state), initialised=tuple(sorted(result.missing_keys)))


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write the model's full state dict as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
    return path
