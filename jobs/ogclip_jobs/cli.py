"""The ``ogclip`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ogclip.config import DemoConfig, load_yaml_config


def _models(args: argparse.Namespace) -> int:
    from ogclip.models import get_model_config, list_models  # torch-heavy; keep `ogclip --help` fast

    rows = []
    for name in list_models():
        cfg = get_model_config(name)
        text = cfg.text_cfg.get("hf_model_name") or f"open_clip text {cfg.text_cfg.get('layers', 12)} layers"
        rows.append({
            "name": name,
            "image_size": cfg.image_size,
            "vision_layers": cfg.vision_cfg.get("layers"),
            "vision_width": cfg.vision_cfg.get("width"),
            "patch_size": cfg.vision_cfg.get("patch_size"),
            "embed_dim": cfg.embed_dim,
            "mrl": cfg.mrl.weighting,
            "text_tower": text,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<20}{'image':>6}{'layers':>8}{'width':>7}{'patch':>7}{'embed':>7}  {'mrl':<9}text tower"
    print(header)
    for r in rows:
        print(f"{r['name']:<20}{r['image_size']:>6}{r['vision_layers']:>8}{r['vision_width']:>7}{r['patch_size']:>7}"
              f"{r['embed_dim']:>7}  {r['mrl']:<9}{r['text_tower']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ogclip_jobs.demo import run_demo  # torch-heavy; keep `ogclip --help` fast

    cfg = load_yaml_config(args.config, DemoConfig) if args.config else DemoConfig()
    updates = {"device": args.device} if args.device else {}
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    if args.steps:
        updates["train"] = cfg.train.model_copy(update={"steps": args.steps})
    run_demo(DemoConfig.model_validate({**cfg.model_dump(), **updates}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ogclip", description="OG-CLIP zero-shot target recognition platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the registered model architectures")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_models)

    demo = commands.add_parser("demo", help="run the main job end to end on the embedded defaults")
    demo.add_argument("--config", type=Path, help="demo YAML (default: built-in defaults)")
    demo.add_argument("--device", help="torch device, default 'auto'")
    demo.add_argument("--steps", type=int, help="override the number of training steps")
    demo.add_argument("--output-dir", type=Path, help="where figures and the bundle go")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ogclip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
