"""Safe decoding and joint image/mask preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ogclip.config import PreprocessConfig
from ogclip.decode import JPEG_MAX_SCANS, JPEG_MAX_SEGMENTS, ImageDecodeError, decode_image, jpeg_segments
from ogclip.transforms import ROI_MARGIN, central_part, image_mask_transform, roi_window, upright_window


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decodes_valid_images_to_rgb() -> None:
    image = decode_image(_png(Image.new("L", (10, 7), 128)))
    assert image.mode == "RGB" and image.size == (10, 7)


def test_refuses_decompression_bombs_before_decoding() -> None:
    bomb = _png(Image.new("1", (20_000, 20_000)))  # 400 Mpx of one bit: a few kB compressed
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(bomb, max_pixels=10_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(data)


def test_refuses_a_jpeg_of_more_segments_or_scans_than_encoders_write() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    encoded = {}
    metadata = {"icc_profile": bytes(range(256)) * 1000, "exif": b"Exif\x00\x00" + b"x" * 60000}
    for name, options in (("baseline", {}), ("progressive", {"progressive": True}), ("metadata", metadata)):
        buffer = io.BytesIO()
        noise.save(buffer, "JPEG", quality=90, **options)
        encoded[name] = buffer.getvalue()
        assert decode_image(encoded[name]).size == (400, 300)  # what encoders write decodes
    assert jpeg_segments(encoded["baseline"], JPEG_MAX_SEGMENTS)[1] == 1
    assert jpeg_segments(encoded["progressive"], JPEG_MAX_SEGMENTS)[1] == 10
    progressive = encoded["progressive"]
    last_scan, end = progressive.rfind(b"\xff\xda"), progressive.rfind(b"\xff\xd9")
    rescanned = progressive[:end] + progressive[last_scan:end] * JPEG_MAX_SCANS + progressive[end:]
    flooded = progressive[:2] + b"\xff\xe1\x00\x02" * 1_000_000 + progressive[2:]  # 4 MB of empty APP1 segments
    assert jpeg_segments(flooded, JPEG_MAX_SEGMENTS) == (JPEG_MAX_SEGMENTS + 1, 0)  # counting stops there
    for data in (rescanned, flooded):
        with pytest.raises(ImageDecodeError, match="segments or 100 scans"):
            decode_image(data)


def test_refuses_truncated_files() -> None:
    rng = np.random.default_rng(0)
    data = _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("zoom", [1.0, 2.0])
@pytest.mark.parametrize("train", [False, True])
def test_mask_stays_aligned_with_its_image(train: bool, zoom: float) -> None:
    """A red square and its mask: after any geometric transform the masked pixels are the red ones."""
    pixels = np.zeros((80, 100, 3), dtype=np.uint8)
    pixels[20:50, 30:70] = (255, 0, 0)
    mask = np.zeros((80, 100), dtype=np.uint8)
    mask[20:50, 30:70] = 255
    cfg = PreprocessConfig(image_size=48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), roi_zoom=zoom)
    torch.manual_seed(0)
    transform = image_mask_transform(cfg, train=train)
    for _ in range(5):
        image, out_mask = transform(Image.fromarray(pixels), mask)
        assert image.shape == (3, 48, 48) and out_mask.shape == (1, 48, 48)
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        inside = out_mask[0] > 0.5
        assert inside.any()
        assert image[0][inside].mean() > 0.9 and image[0][~inside].mean() < 0.1


def test_missing_mask_is_all_ones_and_mismatched_mask_is_refused() -> None:
    transform = image_mask_transform(PreprocessConfig(image_size=32))
    image, mask = transform(Image.new("RGB", (40, 40)), None)
    assert torch.equal(mask, torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="mask is"):
        transform(Image.new("RGB", (40, 40)), np.zeros((20, 20)))


def _square_mask(height: int, width: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(1, height, width)
    mask[0, top:top + side, left:left + side] = 1.0
    return mask


def test_roi_window_zooms_onto_the_object_and_stays_inside_the_image() -> None:
    # A 10 px object in the middle of 64 px: a 32 px window around it.
    assert roi_window(_square_mask(64, 64, 27, 27, 10), 2.0) == (16, 16, 32)
    # Near a corner the window moves inside the image rather than leaving it.
    assert roi_window(_square_mask(64, 64, 0, 58, 6), 2.0) == (0, 32, 32)
    # Non-square: the window is a fraction of the short side.
    assert roi_window(_square_mask(60, 120, 25, 110, 10), 3.0) == (20, 100, 20)


def test_roi_window_never_cuts_the_object() -> None:
    row, col, side = roi_window(_square_mask(64, 64, 10, 12, 40), 2.0)
    assert side == int(np.ceil(ROI_MARGIN * 40)) and row <= 10 and col <= 12
    assert row + side >= 50 and col + side >= 52
    # An object as large as the frame leaves the frame whole: nothing to cut.
    assert roi_window(torch.ones(1, 64, 64), 4.0) is None
    # On a non-square frame the short side is still a cut.
    assert roi_window(torch.ones(1, 40, 64), 4.0) == (0, 12, 40)


def test_roi_window_is_off_without_zoom_or_object() -> None:
    assert roi_window(_square_mask(64, 64, 27, 27, 10), 1.0) is None
    assert roi_window(torch.zeros(1, 64, 64), 2.0) is None


def test_zoom_keeps_relative_size() -> None:
    """A fixed fraction of the frame, not the object's box: a larger object stays larger after the zoom."""
    transform = image_mask_transform(PreprocessConfig(image_size=64, roi_zoom=2.0))
    areas = []
    for side in (8, 16):
        mask = _square_mask(64, 64, 20, 20, side)[0].numpy()
        _, out = transform(Image.new("RGB", (64, 64)), mask)
        areas.append(float(out.mean()))
    assert areas == pytest.approx([(16 / 64) ** 2, (32 / 64) ** 2], abs=0.01)
    image, mask = transform(Image.new("RGB", (64, 64)), None)  # no mask: the whole frame, all ones
    assert torch.equal(mask, torch.ones(1, 64, 64))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_evaluation_transform_equals_torchvisions_pipeline(interpolation: str) -> None:
    """The evaluation path calls torchvision's kernels directly: bit for bit what Resize, CenterCrop, ToDtype and
    Normalize give through v2.Compose (on the window the ROI zoom cuts)."""
    from torchvision import tv_tensors
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(0)
    for size, (height, width) in ((64, (64, 64)), (32, (50, 80)), (96, (130, 200))):
        cfg = PreprocessConfig(image_size=size, roi_zoom=1.0, interpolation=interpolation)
        mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
        reference = T.Compose([T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size),
                               T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32,
                                          "others": None}, scale=True),
                               T.Normalize(mean=list(cfg.mean), std=list(cfg.std))])
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = (rng.random((height, width)) > 0.6).astype(np.uint8) * 255
        image, out_mask = image_mask_transform(cfg)(Image.fromarray(pixels), mask)
        want_image, want_mask = reference(tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1)),
                                          tv_tensors.Mask(torch.from_numpy(mask / 255.0).float()[None]))
        assert torch.equal(image, want_image.as_subclass(torch.Tensor))
        assert torch.equal(out_mask, want_mask.as_subclass(torch.Tensor))
        assert type(image) is torch.Tensor and type(out_mask) is torch.Tensor


@pytest.mark.parametrize(("height", "width"), [(20, 1000), (1000, 7), (1, 400)])
def test_a_long_image_is_cut_to_its_middle_first_and_reads_the_same(height: int, width: int) -> None:
    """A strip is cut to what the centre crop keeps (plus the filter's margin) before its short side is scaled up:
    a 1×100,000 image with an empty mask made a replica build a 64×6.4M image; cut, the model sees what the whole
    strip would give it, up to sub-pixel rounding of the crop's offset."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    cut, _ = central_part(torch.zeros(3, 1, 100_000), torch.zeros(1, 1, 100_000))
    assert cut.shape == (3, 1, 17)
    cut, _ = central_part(torch.zeros(3, 50, 150), torch.zeros(1, 50, 150))
    assert cut.shape == (3, 50, 150), "a side within the margins is left whole"
    cfg = PreprocessConfig(image_size=64, roi_zoom=2.0)
    # smooth content: a sub-pixel shift of the crop moves values by the local gradient only
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([128 + 100 * np.sin(xs / 40 + c) * np.cos(ys / 40 - c) for c in range(3)], -1).astype(np.uint8)
    empty = np.zeros((height, width), np.uint8)  # no object: the zoom has nothing to cut, the whole strip is read
    image, mask = image_mask_transform(cfg)(Image.fromarray(pixels), empty)
    whole = T.Compose([T.Resize(64, antialias=True), T.CenterCrop(64), T.ToDtype(torch.float32, scale=True),
                       T.Normalize(mean=list(cfg.mean), std=list(cfg.std))])(
        tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))).as_subclass(torch.Tensor)
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and not mask.any()
    assert (image - whole).abs().mean() < 0.05 * whole.std(), "the same picture as the uncut strip gives"


def _arrow(angle: float, size: int = 64) -> np.ndarray:
    """An arrow-shaped mask (8-bit) turned ``angle`` radians about the middle of a ``size`` px frame."""
    outline = [(0, -1), (0.5, -0.2), (0.15, -0.2), (0.15, 0.9), (-0.15, 0.9), (-0.15, -0.2), (-0.5, -0.2)]
    cos, sin = np.cos(angle), np.sin(angle)
    centre, scale = size * 0.45, size * 0.25
    polygon = [(centre + scale * (x * cos - y * sin), centre + scale * (x * sin + y * cos)) for x, y in outline]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=255)
    return np.asarray(canvas)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.bool() & b.bool()).sum() / (a.bool() | b.bool()).sum())


def test_orient_turns_an_outline_upright_from_any_rotation() -> None:
    """The same outline at eight rotations: upright, the masks coincide (they do not without the turn), and the
    image turns with its mask."""
    outs = {}
    for orient in (False, True):
        cfg = PreprocessConfig(image_size=48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), roi_zoom=2.0,
                               roi_orient=orient)
        transform = image_mask_transform(cfg)
        outs[orient] = []
        for k in range(8):
            mask = _arrow(2 * np.pi * k / 8 + 0.3)
            pixels = np.zeros((*mask.shape, 3), dtype=np.uint8)
            pixels[mask > 0] = (255, 0, 0)
            image, out_mask = transform(Image.fromarray(pixels), mask)
            inside = out_mask[0] > 0.5
            assert image[0][inside].mean() > 0.8 > 0.3 > image[0][~inside].mean(), "the image turns with its mask"
            outs[orient].append(out_mask[0])
    upright = [_iou(outs[True][0], m) for m in outs[True][1:]]
    unturned = [_iou(outs[False][0], m) for m in outs[False][1:]]
    assert min(upright) > 0.65 and np.median(unturned) < 0.4, (upright, unturned)


def test_orient_leaves_images_without_an_object_alone() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    turned = image_mask_transform(PreprocessConfig(image_size=32, roi_zoom=2.0, roi_orient=True))
    plain = image_mask_transform(PreprocessConfig(image_size=32, roi_zoom=2.0))
    for mask in (None, np.ones((40, 56), dtype=np.uint8), np.zeros((40, 56), dtype=np.uint8)):
        assert all(torch.equal(a, b) for a, b in zip(turned(image, mask), plain(image, mask), strict=True))
    assert upright_window(torch.ones(1, 40, 56), 2.0) is None and upright_window(torch.zeros(1, 40, 56), 2.0) is None
    dot = torch.zeros(1, 40, 56)
    dot[0, 5, 50] = 1.0  # one pixel: no axis to find, still a window around it (and no warning on the way)
    assert upright_window(dot, 2.0)[2] == 20


def test_upright_window_keeps_the_apparent_size_and_centres_the_object() -> None:
    """A bar 24 px long at any angle: once upright it is vertical, 24 / 32 of the 32 px window's height (the zoom's
    fixed fraction of the frame, as without the turn), and centred, even beside the frame's edge."""
    transform = image_mask_transform(PreprocessConfig(image_size=64, roi_zoom=2.0, roi_orient=True))
    for degrees, centre in ((0, 32), (30, 32), (75, 32), (130, 14)):
        canvas = Image.new("L", (64, 64), 0)
        cos, sin = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        corners = [(-2, -12), (2, -12), (2, 12), (-2, 12)]
        ImageDraw.Draw(canvas).polygon([(centre + x * cos - y * sin, centre + x * sin + y * cos) for x, y in corners],
                                       fill=255)
        mask = np.asarray(canvas)
        x, y, side, _ = upright_window(torch.tensor(mask, dtype=torch.float32)[None] / 255, 2.0)
        assert side == 32 and abs(x - centre) < 1 and abs(y - centre) < 1
        _, out = transform(Image.new("RGB", (64, 64)), mask)
        rows, cols = np.flatnonzero(out[0].numpy().any(axis=1)), np.flatnonzero(out[0].numpy().any(axis=0))
        assert 46 <= len(rows) <= 54 and len(cols) <= 14, (degrees, len(rows), len(cols))
        assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 2 and abs((cols[0] + cols[-1]) / 2 - 31.5) <= 2
