"""Attribute linear probes (``ogclip eval probe``): labels, the probe itself, features, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ogclip.models import create_model
from ogclip.synth import COLOURS, PATTERNS, SILHOUETTES, SIZES, TargetClass
from ogclip.zeroshot import class_embeddings
from ogclip_jobs.config import ProbeConfig
from ogclip_jobs.probe import (
    ATTRIBUTES,
    attribute_values,
    probe_accuracy,
    probe_all,
    render_features,
    render_seed,
    text_features,
)


def _target(name: str, silhouette: str, colour: str, size: str, pattern: str, accent: str) -> TargetClass:
    return TargetClass(name, "military aircraft", silhouette, colour, size, pattern, accent)


def test_accent_is_unlabelled_on_plain_paint() -> None:
    plain = attribute_values(_target("a", "delta wing", "grey", "small", "plain", "red"))
    striped = attribute_values(_target("b", "delta wing", "grey", "small", "striped", "red"))
    assert plain == {"silhouette": "delta wing", "colour": "grey", "size": "small", "pattern": "plain",
                     "accent": None}
    assert striped["accent"] == "red" and list(striped) == list(ATTRIBUTES)


def test_probe_scores_held_out_rows_and_skips_unlabelled_ones() -> None:
    rng = np.random.default_rng(0)
    values = ["a", "b", "c"]
    train_y = [values[i % 3] for i in range(60)] + [None] * 5
    test_y = [values[i % 3] for i in range(30)] + [None] * 7
    centres = rng.normal(size=(3, 16))

    def features(labels: list) -> np.ndarray:
        return np.stack([centres[values.index(y)] if y else rng.normal(size=16) * 10 for y in labels]) \
            + 0.1 * rng.normal(size=(len(labels), 16))

    result = probe_accuracy(features(train_y), train_y, features(test_y), test_y)
    assert result["accuracy"] == 1.0 and result["fitted_on"] == 60 and result["scored_on"] == 30
    assert result["majority"] == pytest.approx(1 / 3) and result["values"] == values
    noise = probe_accuracy(rng.normal(size=(65, 16)), train_y, rng.normal(size=(37, 16)), test_y)
    assert noise["accuracy"] < 0.7
    single = probe_accuracy(np.zeros((3, 2)), ["a"] * 3, np.zeros((2, 2)), ["a", "b"])
    assert single["accuracy"] == single["majority"] == 0.5, "one training value: always that value"
    with pytest.raises(ValueError, match="labelled rows"):
        probe_accuracy(np.zeros((2, 2)), [None, None], np.zeros((1, 2)), ["a"])


def test_probe_strength_is_chosen_on_held_out_training_classes_only() -> None:
    """The L2 strength comes from the grid, is chosen on training classes held out (so the scored rows cannot move
    it), and a single strength is used as given."""
    rng = np.random.default_rng(2)
    values = ["a", "b", "c", "d"]
    centres = rng.normal(size=(4, 32))
    train_y = [values[i % 4] for i in range(160)]
    groups = [f"class{i % 40}" for i in range(160)]  # four renders of each of 40 classes
    train_x = np.stack([centres[values.index(y)] for y in train_y]) + rng.normal(size=(160, 32))
    grid = (1e-4, 1e-2, 1.0)
    chosen = {probe_accuracy(train_x, train_y, rng.normal(size=(n, 32)), [values[i % 4] for i in range(n)], grid,
                             groups)["regularisation"] for n in (10, 50, 90)}
    assert len(chosen) == 1 and chosen <= set(grid), chosen
    assert probe_accuracy(train_x, train_y, train_x, train_y, [0.5])["regularisation"] == 0.5


def test_additive_attribute_features_generalise_to_new_combinations() -> None:
    """Features that add one direction per attribute value: the probes, fitted on some combinations, read every
    attribute of combinations they never saw together (what a compositional image tower should give)."""
    rng = np.random.default_rng(1)
    vocabularies = [list(SILHOUETTES), list(COLOURS), list(SIZES), list(PATTERNS), list(COLOURS)]
    directions = [{v: rng.normal(size=64) for v in vocab} for vocab in vocabularies]

    def target(i: int) -> TargetClass:
        look = [vocab[int(rng.integers(len(vocab)))] for vocab in vocabularies]
        return _target(f"t{i}", *look)

    train = [target(i) for i in range(300)]
    test = [t for t in (target(i) for i in range(300, 400)) if t.look() not in {s.look() for s in train}]

    def features(targets: list[TargetClass]) -> np.ndarray:
        return np.stack([sum(d[v] for d, v in zip(directions, t.look(), strict=True)) for t in targets])

    scores = probe_all(features(train), train, features(test), test)
    assert set(scores) == set(ATTRIBUTES)
    assert all(s["accuracy"] > 0.95 for s in scores.values()), {a: s["accuracy"] for a, s in scores.items()}
    assert scores["accent"]["scored_on"] == sum(t.pattern != "plain" for t in test)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("og-clip-tiny", device="cpu").eval()


def test_render_features_are_deterministic_full_size_and_normalised(model) -> None:
    targets = {"a": _target("A", "delta wing", "grey", "large", "striped", "red"),
               "b": _target("B", "cargo hull", "navy blue", "small", "plain", "black")}
    features, owners = render_features(model, targets, renders=3, size=64, seed=0, batch_size=4)
    again, _ = render_features(model, targets, renders=3, size=64, seed=0, batch_size=5)
    assert features.shape == (6, 128) and owners == ["a"] * 3 + ["b"] * 3
    assert torch.allclose(features, again, atol=1e-5), "same seeds, same features, whatever the batching"
    assert torch.allclose(features.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert len({render_seed(0, k, i) for k in targets for i in range(3)}) == 6
    other, _ = render_features(model, targets, renders=3, size=64, seed=1)
    assert not torch.allclose(features, other), "another seed draws other renders"


def test_text_features_are_the_class_embeddings_and_the_frozen_pooled_output(model) -> None:
    from ogclip_kg.prompts import prompt_texts

    rows = [{"key": k, "name": k.upper(), "super_category": "military aircraft", "categories": ["fighter"],
             "aliases": [], "operators": [], "manufacturers": [], "equipment": [],
             "facts": [{"attribute": "silhouette", "value": s}, {"attribute": "colour", "value": c}]}
            for k, s, c in (("f1", "delta wing", "grey"), ("f2", "swept wing", "white"))]
    prompts = {row["key"]: prompt_texts(row, "kg") for row in rows}
    projected, pooled = text_features(model, prompts, batch_size=2)
    assert torch.allclose(projected, class_embeddings(model, prompts).cpu(), atol=1e-6)
    assert pooled.shape == (2, 384) and torch.allclose(pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    alone = model._frozen_text(model.tokenize(prompts["f1"]))
    mean = torch.nn.functional.normalize(torch.nn.functional.normalize(alone, dim=-1).mean(0), dim=0)
    assert torch.allclose(pooled[0], mean, atol=1e-5)


def test_probe_command_writes_its_table(tmp_path: Path, model, graph, job_settings, capsys) -> None:
    from ogclip.bundle import export_bundle
    from ogclip_jobs.cli import main

    bundle = export_bundle(model, tmp_path / "bundle")
    config = tmp_path / "probe.yaml"
    config.write_text(json.dumps({"train_classes": 12, "renders_per_class": 2, "bundle": "ignored"}))
    assert main(["eval", "probe", "--config", str(config), "--bundle", str(bundle.path),
                 "--output-dir", str(tmp_path / "probe")]) == 0
    printed = capsys.readouterr().err  # the job's lines, through logging; stdout is for results
    assert "| attribute | silhouette | colour | size | pattern | accent |" in printed
    assert "| image features (D=128) |" in printed and "| text features (projected, D=128) |" in printed
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert result["model_version"] == bundle.model_version and result["counts"]["train_classes"] == 12
    assert result["counts"]["train_images"] == 24
    assert set(result["image"]) == set(ATTRIBUTES) and set(result["text_pooled"]) == set(ATTRIBUTES)
    assert all(0.0 <= v <= 1.0 for row in result["rows"].values() for v in row.values())
    assert (tmp_path / "probe" / "probe.md").read_text().startswith("# Attribute linear probes")
    assert ProbeConfig.model_validate(result["config"]).train_classes == 12
