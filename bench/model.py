"""Model cost: parameters, FLOPs per image and image-encoder throughput for every registered architecture.

For each model, in one run on one device:
  * params (total / trainable) and FLOPs per image of the image encoder (torch's FLOP counter, mask included);
  * images/s of OG-CLIP's image encoder (with a mask) and of its base CLIP image tower (same weights, no ROI
    branch), and their ratio: the ROI module's inference overhead (the paper's Table 4 compares the same pair);
  * the FLOP-bound limit: this device's measured dense matmul rate divided by FLOPs per image, and the achieved
    share of it (model FLOP utilisation).
On CUDA the encoders run under bf16 autocast and the matmul peak is measured in bf16.

    python bench/model.py [--device auto] [--models og-clip-tiny og-clip-vit-l-14] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import open_clip
import torch

from ogclip.device import resolve_device
from ogclip.metrics import image_flops
from ogclip.models import OGCLIP, create_model, list_models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, batch: int, device: torch.device, min_seconds: float) -> float:
    """Items per second of ``fn`` (called on a batch of ``batch``) after one warm-up call."""
    fn()
    _sync(device)
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and calls >= 2:
            return calls * batch / elapsed


def matmul_peak(device: torch.device, min_seconds: float) -> float:
    """Dense matmul FLOP/s this device sustains: the FLOP-bound ceiling for transformer inference."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _rate(lambda: a @ b, 1, device, min_seconds) * 2 * n**3


def bench_model(name: str, device: torch.device, batch: int, min_seconds: float, peak: float) -> dict:
    model: OGCLIP = create_model(name, device=device).eval()
    size = model.cfg.image_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    base = open_clip.model._build_vision_tower(model.cfg.embed_dim, model.cfg.vision_cfg).to(device).eval()
    base.load_state_dict({k: v for k, v in model.visual.state_dict().items() if not k.startswith("conv1.roi.")})

    images = torch.randn(batch, 3, size, size, device=device)
    masks = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    with torch.no_grad(), autocast:
        flops = image_flops(model, size)
        ogclip_rate = _rate(lambda: model.encode_image(images, masks), batch, device, min_seconds)
        base_rate = _rate(lambda: base(images), batch, device, min_seconds)
    limit = peak / flops
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "image_params_M": sum(p.numel() for p in model.visual.parameters()) / 1e6,
        "base_image_params_M": sum(p.numel() for p in base.parameters()) / 1e6,
        "gflops_per_image": flops / 1e9,
        "images_per_s": ogclip_rate,
        "base_clip_images_per_s": base_rate,
        "ratio_vs_base": ogclip_rate / base_rate,
        "flop_bound_images_per_s": limit,
        "ratio_vs_flop_bound": ogclip_rate / limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 4)
    torch.manual_seed(0)
    peak = matmul_peak(device, args.seconds)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device: {where}; {precision}; batch {batch}; measured matmul peak {peak / 1e12:.3f} TFLOP/s")
    header = (f"{'model':<18}{'params M':>9}{'img M':>8}{'base M':>8}{'GFLOP/img':>10}{'img/s':>10}{'base img/s':>11}"
              f"{'vs base':>8}{'bound img/s':>12}{'vs bound':>9}")
    print(header)
    rows = []
    for name in args.models:
        r = bench_model(name, device, batch, args.seconds, peak)
        rows.append(r)
        print(f"{r['model']:<18}{r['params_M']:>9.1f}{r['image_params_M']:>8.2f}{r['base_image_params_M']:>8.2f}"
              f"{r['gflops_per_image']:>10.2f}{r['images_per_s']:>10.1f}{r['base_clip_images_per_s']:>11.1f}"
              f"{r['ratio_vs_base']:>8.3f}{r['flop_bound_images_per_s']:>12.1f}{r['ratio_vs_flop_bound']:>9.3f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": where, "precision": precision, "batch": batch, "matmul_peak_flops": peak,
                       "models": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
