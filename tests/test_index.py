"""Retrieval collections: the folder format and its revisions, and `ogclip index build` on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ogclip.collection import CollectionError, current_revision, read_collection, write_collection
from ogclip_jobs.index import unique_ids


def _vectors(count: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_collection_round_trips_and_a_new_revision_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "collection"
    assert current_revision(folder) is None
    with pytest.raises(CollectionError, match="no collection"):
        read_collection(folder)
    first = write_collection(folder, "ogc-a", ["x", "y", "z"], ["k1", "k2", "k1"], ["one.", "two.", ""],
                             _vectors(3), _vectors(3, seed=1))
    found = read_collection(folder, expected_version="ogc-a")
    assert (found.revision, found.model_version, found.ids, found.labels) == (first, "ogc-a", ["x", "y", "z"],
                                                                           ["k1", "k2", "k1"])
    np.testing.assert_array_equal(found.images, _vectors(3))
    assert first == write_collection(folder, "ogc-a", ["x", "y", "z"], ["k1", "k2", "k1"], ["one.", "two.", ""],
                                     _vectors(3), _vectors(3, seed=1)), "the revision is a content hash"
    with pytest.raises(CollectionError, match="not ogc-b"):
        read_collection(folder, expected_version="ogc-b")
    revisions = [write_collection(folder, "ogc-a", [f"i{n}"], ["k"], ["c."], _vectors(1, seed=n), _vectors(1))
                 for n in range(3)]
    assert current_revision(folder) == revisions[-1] and len(read_collection(folder)) == 1
    kept = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert revisions[-1] in kept and len(kept) == 2, "the two newest revisions are kept"
    for ids, labels, images in ((["a", "a"], ["k", "k"], _vectors(2)), (["a"], ["k", "k"], _vectors(1)),
                                (["a"], ["k"], _vectors(2))):
        with pytest.raises(CollectionError):
            write_collection(folder, "ogc-a", ids, labels, ["c."] * len(labels), images, images)
    (folder / revisions[-1] / "images.npy").write_bytes(b"damaged")
    with pytest.raises(CollectionError, match="cannot be read"):
        read_collection(folder)


def test_a_float16_collection_ranks_as_the_exact_index_does() -> None:
    from ogclip_serve.index import VectorIndex

    rng = np.random.default_rng(0)
    centres = _vectors(50, dim=64)  # clustered, as embeddings are: near-ties exist but are rare
    vectors = centres[rng.integers(0, 50, 5000)] + 0.5 * rng.normal(size=(5000, 64)).astype(np.float32)
    queries = centres[rng.integers(0, 50, 40)] + 0.5 * rng.normal(size=(40, 64)).astype(np.float32)
    dims = [16, 64]
    exact, half = VectorIndex(vectors, dims), VectorIndex(vectors, dims, float16=True)
    for dim in dims:
        (want_s, want_i), (got_s, got_i) = exact.search(queries, dim, 10), half.search(queries, dim, 10)
        np.testing.assert_allclose(got_s, want_s, atol=2e-3)
        overlap = np.mean([len(set(w) & set(g)) / 10 for w, g in zip(want_i, got_i, strict=True)])
        assert overlap >= 0.98, f"d={dim}: {overlap:.3f} of the exact top 10"
        assert (got_i >= 0).all()
    assert half.search(queries[:1], 64, 10_000)[1].shape == (1, 5000), "k beyond the size: every row"
    empty = VectorIndex(np.zeros((0, 64), np.float32), dims, float16=True)
    assert empty.search(queries[:2], 16, 10)[1].shape == (2, 0)


def test_repeated_ids_are_told_apart() -> None:
    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]


@pytest.mark.slow
def test_index_build_embeds_every_row_as_the_model_does(tmp_path: Path, graph, job_settings, local_ray) -> None:
    from conftest import write_shards

    import ogclip
    from ogclip.transforms import image_mask_transform
    from ogclip_jobs.cli import main

    torch.manual_seed(0)
    model = ogclip.create_model("og-clip-tiny", device="cpu")
    with torch.no_grad():
        model.visual.conv1.roi.weight.normal_(0.0, 0.05)
    bundle = ogclip.export_bundle(model, tmp_path / "bundle")
    write_shards(graph, tmp_path / "shards", classes=3, per_class=4)
    assert main(["index", "build", "--bundle", str(bundle.path), "--data", str(tmp_path / "shards"),
                 "--output-dir", str(tmp_path / "collection")]) == 0
    found = read_collection(tmp_path / "collection", expected_version=bundle.model_version)
    assert len(found) == 12 and len(set(found.ids)) == 12 and found.images.shape == (12, model.dims[-1])
    np.testing.assert_allclose(np.linalg.norm(found.images, axis=1), 1.0, atol=1e-5)
    # an item's vector is the model's embedding of its image read through its mask, its caption's the text's
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(next((tmp_path / "shards").glob("*.parquet"))).to_pylist()
    row = next(r for r in table if r["caption"] == found.captions[0] and r["label"] == found.labels[0])
    image, mask = image_mask_transform(bundle.preprocess)(Image.open(io.BytesIO(row["image"])).convert("RGB"),
                                                           Image.open(io.BytesIO(row["mask"])).convert("L"))
    with torch.no_grad():
        expected = model.eval().encode_image(image[None], mask[None])[0].numpy()
        text = model.encode_text([row["caption"]])[0].numpy()
    rows = [i for i, caption in enumerate(found.captions) if caption == row["caption"]]
    assert any(np.allclose(found.images[i], expected, atol=1e-4) for i in rows)
    np.testing.assert_allclose(found.caption_vectors[rows[0]], text, atol=1e-4)
    assert json.loads((tmp_path / "collection" / found.revision / "collection.json").read_text())["items"] == 12
    assert main(["index", "build", "--bundle", str(bundle.path), "--data", str(tmp_path / "nowhere"),
                 "--output-dir", str(tmp_path / "collection")]) == 1
