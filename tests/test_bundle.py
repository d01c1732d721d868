"""Export bundles: round trip, content-hash versions, refusal of mismatched or tampered bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import images_and_masks

import ogclip
from ogclip.bundle import read_bundle_info


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, micro_minilm: ogclip.OGCLIP) -> ogclip.BundleInfo:
    return ogclip.export_bundle(micro_minilm, tmp_path_factory.mktemp("bundle"))


def test_round_trip_gives_identical_embeddings(exported: ogclip.BundleInfo, micro_minilm: ogclip.OGCLIP) -> None:
    model, info = ogclip.load_bundle(exported.path, expected_version=exported.model_version, device="cpu")
    assert info.model_version == exported.model_version and info.name == "og-clip-tiny"
    assert info.preprocess.image_size == 32
    assert not model.training
    images, masks = images_and_masks()
    micro_minilm.eval()
    with torch.no_grad():
        for dim in (16, 128):
            assert torch.equal(model.encode_image(images, masks, dim=dim),
                               micro_minilm.encode_image(images, masks, dim=dim))
            # The frozen text output is cached per token row, computed in whatever batch first held the row: equal
            # up to float rounding of the batched matmuls.
            torch.testing.assert_close(model.encode_text(["a grey fighter"], dim=dim),
                                       micro_minilm.encode_text(["a grey fighter"], dim=dim), rtol=0, atol=1e-5)


def test_version_is_a_content_hash(tmp_path: Path, exported: ogclip.BundleInfo, micro_minilm: ogclip.OGCLIP) -> None:
    again = ogclip.export_bundle(micro_minilm, tmp_path / "again")
    assert again.model_version == exported.model_version
    model, _ = ogclip.load_bundle(exported.path, device="cpu")
    with torch.no_grad():
        model.logit_scale.add_(0.01)
    assert ogclip.export_bundle(model, tmp_path / "changed").model_version != exported.model_version


def test_version_mismatch_is_refused(exported: ogclip.BundleInfo) -> None:
    with pytest.raises(ogclip.BundleVersionError, match="expected ogc-0000"):
        ogclip.load_bundle(exported.path, expected_version="ogc-0000000000000000", device="cpu")


def test_tampered_or_incomplete_bundles_are_refused(tmp_path: Path, micro_minilm: ogclip.OGCLIP) -> None:
    bundle = ogclip.export_bundle(micro_minilm, tmp_path / "b")
    config = json.loads((bundle.path / "model_config.json").read_text())
    config["config"]["embed_dim"] = 64
    (bundle.path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ogclip.BundleError, match="model_config.json does not match"):
        read_bundle_info(bundle.path)
    (bundle.path / "model.safetensors").unlink()
    with pytest.raises(ogclip.BundleError, match="missing model.safetensors"):
        read_bundle_info(bundle.path)
    with pytest.raises(ogclip.BundleError, match="not a bundle"):
        read_bundle_info(tmp_path / "nowhere")


def test_a_bundle_records_its_architecture_and_recipe(tmp_path: Path, micro_minilm: ogclip.OGCLIP) -> None:
    bundle = ogclip.export_bundle(micro_minilm, tmp_path / "b", recipe="og-clip")
    info = read_bundle_info(bundle.path)
    assert (info.architecture, info.recipe) == ("og-clip", "og-clip") == (bundle.architecture, bundle.recipe)
    assert ogclip.export_bundle(micro_minilm, tmp_path / "c").model_version != bundle.model_version, \
        "the recipe is part of what the version names"


def test_a_bundle_of_another_architecture_loads_through_the_registry(tmp_path: Path,
                                                                     micro_minilm: ogclip.OGCLIP) -> None:
    from ogclip.models import build_model, register_architecture
    from ogclip.models.registry import _ARCHITECTURES

    class Variant(ogclip.OGCLIP):
        pass

    register_architecture("variant-for-test")(Variant)
    try:
        cfg = micro_minilm.cfg.model_copy(update={"architecture": "variant-for-test"})
        model = build_model(cfg, name="variant")
        assert type(model) is Variant
        bundle = ogclip.export_bundle(model, tmp_path / "variant")
        loaded, info = ogclip.load_bundle(bundle.path, device="cpu")
        assert type(loaded) is Variant and info.architecture == "variant-for-test"
        with pytest.raises(ValueError, match="already registered"):
            register_architecture("variant-for-test")(ogclip.OGCLIP)
    finally:
        _ARCHITECTURES.pop("variant-for-test")
    with pytest.raises(ValueError, match="unknown architecture 'variant-for-test'"):
        ogclip.load_bundle(bundle.path, device="cpu")


def test_a_bundle_from_before_the_architecture_key_reads_as_og_clip(tmp_path: Path,
                                                                     micro_minilm: ogclip.OGCLIP) -> None:
    from ogclip.bundle import MANIFEST, PAYLOAD, _sha256, _version

    bundle = ogclip.export_bundle(micro_minilm, tmp_path / "old")
    config = json.loads((bundle.path / "model_config.json").read_text())
    del config["config"]["architecture"], config["recipe"]
    (bundle.path / "model_config.json").write_text(json.dumps(config))
    hashes = {name: _sha256(bundle.path / name) for name in PAYLOAD}
    (bundle.path / MANIFEST).write_text(json.dumps({"model_version": _version(hashes), "files": hashes}))
    model, info = ogclip.load_bundle(bundle.path, device="cpu")
    assert isinstance(model, ogclip.OGCLIP) and (info.architecture, info.recipe) == ("og-clip", None)
