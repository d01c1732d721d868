"""Export bundle: the contract between training and serving.

A bundle is a folder::

    model.safetensors   all weights (the frozen text tower too, so serving needs nothing else)
    model_config.json   the resolved architecture (ModelConfig, with its ``architecture`` key), its registry name and
                        the training recipe that made it
    preprocess.json     image size, mean, std, interpolation
    bundle.json         model_version, per-file SHA-256, ogclip version

``model_version`` is a content hash of the three payload files: the same weights and config always give the same
version, and any change gives a new one. Class embeddings in the graph are tagged with it; a consumer that asks for
a version the bundle does not carry is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ogclip.config import ModelConfig, PreprocessConfig
from ogclip.device import resolve_device
from ogclip.models.checkpoint import load_checkpoint, save_checkpoint
from ogclip.models.ogclip import OGCLIP
from ogclip.models.registry import build_model

WEIGHTS, CONFIG, PREPROCESS, MANIFEST = "model.safetensors", "model_config.json", "preprocess.json", "bundle.json"
PAYLOAD = (WEIGHTS, CONFIG, PREPROCESS)


class BundleError(ValueError):
    """A bundle that is incomplete, corrupted or tampered with."""


class BundleVersionError(BundleError):
    """The bundle's model_version is not the one the caller expects."""


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    model_version: str
    name: str | None
    preprocess: PreprocessConfig
    architecture: str = "og-clip"
    recipe: str | None = None  # the recipe's kind; None for a model not exported by a training run


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(file_hashes: dict[str, str]) -> str:
    joined = "\n".join(f"{name}:{file_hashes[name]}" for name in PAYLOAD)
    return "ogc-" + hashlib.sha256(joined.encode()).hexdigest()[:16]


def export_bundle(model: OGCLIP, out_dir: str | Path, recipe: str | None = None) -> BundleInfo:
    """Write ``model`` as a bundle into ``out_dir`` (created if needed) and return its version; ``recipe`` is the
    kind of the recipe that trained it (recorded, part of the version)."""
    from ogclip import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / WEIGHTS)
    config = {"name": model.name, "config": model.cfg.model_dump(mode="json"), "recipe": recipe}
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / PREPROCESS).write_text(model.cfg.preprocess.model_dump_json(indent=2))
    hashes = {name: _sha256(out / name) for name in PAYLOAD}
    version = _version(hashes)
    manifest = {"model_version": version, "files": hashes, "ogclip_version": __version__}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return BundleInfo(path=out, model_version=version, name=model.name, preprocess=model.cfg.preprocess,
                      architecture=model.cfg.architecture, recipe=recipe)


def read_bundle_info(path: str | Path, expected_version: str | None = None) -> BundleInfo:
    """Verify a bundle's files against its manifest (and ``expected_version``) without building the model."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        recorded = manifest["files"]
        version = manifest["model_version"]
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: not a bundle ({exc})") from exc
    for name in PAYLOAD:
        if not (path / name).is_file():
            raise BundleError(f"{path}: missing {name}")
        if _sha256(path / name) != recorded.get(name):
            raise BundleError(f"{path}: {name} does not match its recorded hash (corrupted or modified)")
    if _version(recorded) != version:
        raise BundleError(f"{path}: model_version {version} does not match the files' content hash")
    if expected_version is not None and version != expected_version:
        raise BundleVersionError(f"{path}: bundle is model_version {version}, expected {expected_version}")
    config = json.loads((path / CONFIG).read_text())
    preprocess = PreprocessConfig.model_validate_json((path / PREPROCESS).read_text())
    return BundleInfo(path=path, model_version=version, name=config.get("name"), preprocess=preprocess,
                      architecture=config["config"].get("architecture", "og-clip"), recipe=config.get("recipe"))


def load_bundle(
    path: str | Path, expected_version: str | None = None, device: str | torch.device = "auto"
) -> tuple[OGCLIP, BundleInfo]:
    """Verify and load a bundle, whatever its architecture (built through the registry); the model comes back in
    eval mode."""
    info = read_bundle_info(path, expected_version)
    config = json.loads((info.path / CONFIG).read_text())
    model = build_model(ModelConfig.model_validate(config["config"]), name=config.get("name"))
    load_checkpoint(model, info.path / WEIGHTS)
    return model.to(resolve_device(device)).eval(), info
