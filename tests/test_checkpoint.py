"""Loading OpenCLIP checkpoints written by open_clip itself, and OG-CLIP's own checkpoints."""

from __future__ import annotations

import pickle
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_OPENCLIP, images_and_masks
from safetensors.torch import save_file

import ogclip
from ogclip.models import CheckpointError


@pytest.fixture(scope="module")
def openclip_model() -> open_clip.CLIP:
    torch.manual_seed(1)
    cfg = MICRO_OPENCLIP
    return open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "wrapped"])
def test_load_openclip_checkpoint(tmp_path: Path, openclip_model: open_clip.CLIP, fmt: str) -> None:
    state = openclip_model.state_dict()
    if fmt == "bin":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # open_clip training checkpoints: {"epoch": ..., "state_dict": {"module.…": …}}
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    model = ogclip.create_model("og-clip-vit-l-14", pretrained=path, device="cpu", **MICRO_OPENCLIP).eval()
    assert model.visual.conv1.roi.weight.abs().sum() == 0
    images, masks = images_and_masks()
    tokens = open_clip.tokenizer.tokenize(["a grey fighter", "a white destroyer"], context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, masks),
                                   F.normalize(openclip_model.encode_image(images), dim=-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tokens),
                                   F.normalize(openclip_model.encode_text(tokens), dim=-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.logit_scale, openclip_model.logit_scale)


def test_wrong_architecture_is_refused_with_the_keys(tmp_path: Path, openclip_model: open_clip.CLIP) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in openclip_model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        ogclip.create_model("og-clip-vit-l-14", pretrained=path, device="cpu",
                            **{**MICRO_OPENCLIP, "embed_dim": 64})
    partial = tmp_path / "partial.safetensors"
    state = {k: v.contiguous() for k, v in openclip_model.state_dict().items() if not k.startswith("visual.ln_post")}
    save_file(state, str(partial))
    with pytest.raises(CheckpointError, match="visual.ln_post"):
        ogclip.create_model("og-clip-vit-l-14", pretrained=partial, device="cpu", **MICRO_OPENCLIP)


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_pickles_with_code_are_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"visual.proj": _Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="weights-only"):
        ogclip.load_checkpoint(torch.nn.Linear(1, 1), path)
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="not found"):
        ogclip.load_checkpoint(torch.nn.Linear(1, 1), tmp_path / "missing.safetensors")


def test_ogclip_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = ogclip.create_model("og-clip-tiny", device="cpu", vision_cfg={"image_size": 32, "layers": 1,
                                 "width": 64, "head_width": 32, "patch_size": 8}).eval()
    with torch.no_grad():
        torch.nn.init.normal_(source.visual.conv1.roi.weight, std=0.05)
        source.mrl.alpha.copy_(torch.linspace(1, 2, 8) / torch.linspace(1, 2, 8).sum())
    path = ogclip.save_checkpoint(source, tmp_path / "ogclip.safetensors")
    target = ogclip.create_model("og-clip-tiny", pretrained=path, device="cpu", vision_cfg={"image_size": 32,
                                 "layers": 1, "width": 64, "head_width": 32, "patch_size": 8}).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    images, masks = images_and_masks()
    with torch.no_grad():
        assert torch.equal(source.encode_image(images, masks, dim=32), target.encode_image(images, masks, dim=32))
