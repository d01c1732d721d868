"""Attribute linear probes: what a bundle's image and text features know about each visual attribute.

Zero-shot works only if the image tower encodes the attributes the class descriptions name (silhouette, colour,
size, pattern, accent) in a form that carries over to classes it never saw. For each attribute a linear classifier
(logistic regression on standardised, L2-normalised features, :func:`fit_linear_probe`) is fitted on features of
the training class set's classes and scored on the held-out test classes, whose attribute values come in
combinations the probe never saw together. Image side: renders of each class (``ogclip.synth.render``,
deterministic seeds) with their exact masks, through the bundle's full-D ``image_features``. Text side: the same
probes on each class's prompts (the ones export and evaluation embed, :func:`ogclip_kg.prompts.prompt_texts`),
projected into the joint space as the classifier uses them, and the frozen tower's pooled output before that
projection; one vector per class, so fitted on every training class. A text probe far above the image probe says
the image tower, not the prompts, is what limits zero-shot.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from ogclip.bundle import load_bundle
from ogclip.models import OGCLIP
from ogclip.synth import TargetClass, render, spread_classes
from ogclip.transforms import image_mask_transform
from ogclip.zeroshot import class_embeddings
from ogclip_jobs.config import ProbeConfig

_log = logging.getLogger(__name__)

ATTRIBUTES = ("silhouette", "colour", "size", "pattern", "accent")  # the order of TargetClass.look()


def attribute_values(target: TargetClass) -> dict[str, str | None]:
    """A class's value of each attribute; accent is None on plain paint, where the renderer draws no accent (it is
    invisible there, so it is neither fitted nor scored)."""
    values: dict[str, str | None] = dict(zip(ATTRIBUTES, target.look(), strict=True))
    if target.pattern == "plain":
        values["accent"] = None
    return values


def render_seed(seed: int, key: str, index: int) -> int:
    """The render seed of a class's ``index``-th probe image: stable across runs, machines and class orders."""
    return int(hashlib.sha256(f"probe:{seed}:{key}:{index}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def render_features(model: OGCLIP, targets: Mapping[str, TargetClass], renders: int, size: int, seed: int,
                    batch_size: int = 256) -> tuple[torch.Tensor, list[str]]:
    """L2-normalised full-D image features of ``renders`` renders per class with their exact masks, and each
    row's class key."""
    transform = image_mask_transform(model.cfg.preprocess)
    items = [(key, i) for key in targets for i in range(renders)]
    model.eval()
    features = []
    for start in range(0, len(items), batch_size):
        images, masks = [], []
        for key, i in items[start:start + batch_size]:
            sample = render(targets[key], seed=render_seed(seed, key, i), size=size)
            image, mask = transform(sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
        out = model.image_features(torch.stack(images).to(model.device), torch.stack(masks).to(model.device))
        features.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(features), [key for key, _ in items]


@torch.no_grad()
def text_features(model: OGCLIP, prompts: Mapping[str, Sequence[str]], batch_size: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (rows in ``prompts``' order): the class embedding the classifier uses (projected into the joint
    space, :func:`ogclip.zeroshot.class_embeddings`) and the mean L2-normalised pooled output of the frozen text
    tower over the same prompts (what the projection starts from)."""
    projected = class_embeddings(model, prompts, batch_size).cpu()
    texts = [text for key in prompts for text in prompts[key]]
    distinct = list(dict.fromkeys(texts))  # classes share prompts (one per attribute value): encode each once
    pooled = torch.cat([F.normalize(model._frozen_text(model.tokenize(distinct[i:i + batch_size])).float(), dim=-1)
                        .cpu() for i in range(0, len(distinct), batch_size)])
    where = {text: i for i, text in enumerate(distinct)}
    owners = torch.tensor([row for row, key in enumerate(prompts) for _ in prompts[key]])
    sums = torch.zeros(len(prompts), pooled.shape[-1]).index_add_(0, owners, pooled[[where[t] for t in texts]])
    return projected, F.normalize(sums, dim=-1)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, regularisation: float,
                     max_iter: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (standardised inputs, mean cross-entropy + ``regularisation`` · ‖W‖²,
    full-batch L-BFGS) from rows of ``features`` (N, width) to ``labels`` (N,) in [0, classes); returns ``logits(x)``
    for new rows. Deterministic. The one linear probe of the platform: the attribute probes here and the per-patch
    probe of ``ogclip eval dense``."""
    x = features.float()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-6,
                                  line_search_fn="strong_wolfe")
    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + regularisation * weight.square().sum()
        loss.backward()
        return loss

    # One thread: beside other work on a small machine, two threads spent ~25x longer per step than one (0.9 s
    # against 0.04 s for a 384-row fit on 2 cores; 1.4 s against 0.9 s for 96,000 rows).
    with threadpool_limits(limits=1):
        optimiser.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda rows: ((rows.float() - mean) / std) @ weight + bias


def probe_accuracy(train_x: np.ndarray, train_y: Sequence[str | None], test_x: np.ndarray,
                   test_y: Sequence[str | None], regularisation: Sequence[float] = (1e-4, 1e-3, 1e-2),
                   groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit :func:`fit_linear_probe` on (train_x, train_y) and score it on (test_x, test_y); rows labelled None are
    left out of both. Also the majority baseline: always answering the training set's commonest value.

    With several ``regularisation`` strengths, the probe takes the one that scores best on a quarter of the
    training ``groups`` (the rows' classes; a stable hash picks them) fitted on the other three quarters, then
    refits on every training row: the strength is chosen on training classes, never on the scored ones."""
    fit = [i for i, y in enumerate(train_y) if y is not None]
    score = [i for i, y in enumerate(test_y) if y is not None]
    y_fit, y_score = [train_y[i] for i in fit], np.asarray([test_y[i] for i in score])
    if not fit or not score:
        raise ValueError("a probe needs labelled rows on both sides")
    values = sorted(set(y_fit))
    majority = Counter(y_fit).most_common(1)[0][0]
    x_fit, x_score = torch.from_numpy(np.asarray(train_x)[fit]), torch.from_numpy(np.asarray(test_x)[score])
    labels = torch.tensor([values.index(y) for y in y_fit])
    strengths = list(regularisation)
    chosen = strengths[0]
    if len(values) < 2:  # one value only: the best linear answer is that value
        predictions = np.full(len(score), majority)
    else:
        if len(strengths) > 1:
            names = [str(groups[i]) if groups is not None else str(i) for i in fit]
            held = torch.tensor([int(hashlib.sha256(f"probe-holdout:{n}".encode()).hexdigest(), 16) % 4 == 0
                                 for n in names])
            if 0 < int(held.sum()) < len(held):
                def held_out_accuracy(strength: float) -> float:
                    logits = fit_linear_probe(x_fit[~held], labels[~held], len(values), strength)
                    return float((logits(x_fit[held]).argmax(dim=1) == labels[held]).float().mean())

                # ties go to the strongest regularisation: the simplest probe that does as well
                chosen = max(sorted(strengths, reverse=True), key=held_out_accuracy)
        logits = fit_linear_probe(x_fit, labels, len(values), chosen)
        predictions = np.asarray(values)[logits(x_score).argmax(dim=1).numpy()]
    return {"accuracy": float(np.mean(predictions == y_score)), "majority": float(np.mean(y_score == majority)),
            "fitted_on": len(fit), "scored_on": len(score), "values": values, "regularisation": chosen}


def probe_all(train_x: np.ndarray, train_targets: Sequence[TargetClass], test_x: np.ndarray,
              test_targets: Sequence[TargetClass], regularisation: Sequence[float] = (1e-4, 1e-3, 1e-2)
              ) -> dict[str, dict[str, Any]]:
    """:func:`probe_accuracy` for every attribute; row i of each matrix belongs to target i of its list (the
    strength is chosen on held-out training targets)."""
    train_values = [attribute_values(t) for t in train_targets]
    test_values = [attribute_values(t) for t in test_targets]
    groups = [t.name for t in train_targets]
    return {name: probe_accuracy(train_x, [v[name] for v in train_values], test_x, [v[name] for v in test_values],
                                 regularisation, groups) for name in ATTRIBUTES}


def probe_markdown(name: str, result: dict[str, Any]) -> str:
    """The probe table (one row per feature kind, one column per attribute) and how it was made."""
    rows = result["rows"]
    header = "| attribute | " + " | ".join(ATTRIBUTES) + " |"
    lines = [header, "|" + "---|" * (len(ATTRIBUTES) + 1)]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[a]:.0f}%" for a in ATTRIBUTES) + " |")
    counts = result["counts"]
    return (f"# Attribute linear probes: {name}\n\n"
            "Logistic regression per attribute, fitted on training classes and scored on the "
            f"{counts['test_classes']} held-out test classes. Image features: {counts['renders_per_class']} renders "
            f"per class with exact masks, {counts['train_classes']} training classes ({counts['train_images']} + "
            f"{counts['test_images']} images). Text features: each class's prompts, averaged, fitted on all "
            f"{counts['text_train_classes']} training classes. Accent only where the paint is not plain. Majority: "
            "always the commonest training value.\n\n" + "\n".join(lines) + "\n")


def run_probe(cfg: ProbeConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``ogclip eval probe``: load the bundle, probe its image and text features, write ``probe.{md,json}``."""
    from ogclip_jobs.evaluate import class_set_rows, write_report
    from ogclip_jobs.runtime import open_graph
    from ogclip_kg.prompts import prompts_for

    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - started - sum(phases.values()), 1)

    model, info = load_bundle(cfg.bundle)
    with open_graph() as store:
        train_rows = {r["key"]: r for r in class_set_rows(store, cfg.train_class_set)}
        test_rows = class_set_rows(store, cfg.test_class_set)
    every_train = {key: TargetClass.from_facts(row) for key, row in train_rows.items()}
    train_keys = spread_classes(every_train, cfg.train_classes, cfg.seed)
    train_targets = {key: every_train[key] for key in train_keys}
    test_targets = {row["key"]: TargetClass.from_facts(row) for row in test_rows}
    lap("bundle_and_classes")

    train_images, train_owner = render_features(model, train_targets, cfg.renders_per_class, cfg.image_size,
                                                cfg.seed, cfg.batch_size)
    test_images, test_owner = render_features(model, test_targets, cfg.renders_per_class, cfg.image_size,
                                              cfg.seed + 1, cfg.batch_size)
    lap("render_and_encode")
    image = probe_all(train_images.numpy(), [train_targets[k] for k in train_owner], test_images.numpy(),
                      [test_targets[k] for k in test_owner], cfg.regularisation)
    lap("image_probes")

    # The text side has one vector per class, so it is fitted on every training class (a few seconds): on the image
    # probe's 160 classes the accent had 120 examples in 384 dimensions (frozen tower: 84% there, 97% on all).
    train_text, train_pooled = text_features(model, prompts_for(list(train_rows.values()), "kg", cfg.prompt_seed),
                                             cfg.batch_size)
    test_text, test_pooled = text_features(model, prompts_for(test_rows, "kg", cfg.prompt_seed), cfg.batch_size)
    lap("text_features")
    train_list, test_list = list(every_train.values()), list(test_targets.values())
    text = probe_all(train_text.numpy(), train_list, test_text.numpy(), test_list, cfg.regularisation)
    pooled = probe_all(train_pooled.numpy(), train_list, test_pooled.numpy(), test_list, cfg.regularisation)
    lap("text_probes")

    dim, width = train_images.shape[-1], train_pooled.shape[-1]
    result = {
        "model_version": info.model_version, "bundle": str(cfg.bundle),
        "rows": {f"image features (D={dim})": {a: image[a]["accuracy"] for a in ATTRIBUTES},
                 f"text features (projected, D={train_text.shape[-1]})": {a: text[a]["accuracy"] for a in ATTRIBUTES},
                 f"frozen text tower (pooled, {width})": {a: pooled[a]["accuracy"] for a in ATTRIBUTES},
                 "majority value (renders)": {a: image[a]["majority"] for a in ATTRIBUTES}},
        "image": image, "text": text, "text_pooled": pooled,
        "counts": {"train_classes": len(train_keys), "text_train_classes": len(every_train),
                   "test_classes": len(test_targets),
                   "renders_per_class": cfg.renders_per_class, "train_images": len(train_owner),
                   "test_images": len(test_owner)},
        "config": cfg.model_dump(mode="json"),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["phase_seconds"] = phases
    write_report(cfg.output_dir, "probe", result, probe_markdown(info.model_version, result), log, "attribute probes")
    return result
