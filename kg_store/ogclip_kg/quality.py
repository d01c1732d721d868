"""Quality control of the graph (the paper's entity disambiguation and consistency checks), for ``ogclip kg check``.

Disambiguation merges targets whose normalised names agree while the seed is built (:mod:`ogclip_kg.seeds`);
here the graph as stored is checked: attributes that do not apply to a target's kind (a tank with a wingspan),
quantities that are not non-negative numbers, targets outside the taxonomy, train/test overlap, and, for review,
remaining near-duplicate names by character-trigram embedding similarity, derived categories that a source's facts
contradict, and how many categories are of each confidence (the ``IS_A`` relationship's ``confidence``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ogclip_kg import cypher
from ogclip_kg.store import GraphStore

TRIGRAM_DIMS = 4096


@dataclass
class QualityReport:
    inapplicable_attributes: list[dict] = field(default_factory=list)
    invalid_quantities: list[dict] = field(default_factory=list)
    targets_without_category: list[str] = field(default_factory=list)
    class_set_overlap: list[str] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    contradicted_categories: list[dict] = field(default_factory=list)
    category_confidence: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Violations of the schema's rules (near-duplicates are candidates for review, not errors)."""
        return (len(self.inapplicable_attributes) + len(self.invalid_quantities)
                + len(self.targets_without_category) + len(self.class_set_overlap))

    def render(self, limit: int = 10) -> str:
        lines = []
        for title, items in (
            ("attributes that do not apply to the target's kind", self.inapplicable_attributes),
            ("quantities that are not non-negative numbers", self.invalid_quantities),
            ("targets without a category", self.targets_without_category),
            ("targets in both train and test class sets", self.class_set_overlap),
            ("possible duplicates (review)", self.near_duplicates),
            ("derived categories that a source's facts contradict (review)", self.contradicted_categories),
        ):
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  {item}" for item in items[:limit])
        lines.append("category confidence (IS_A.confidence): " + ", ".join(
            f"{level} {count}" if level != "None" else f"unrated {count} (seeded before ratings; `kg seed` adds them)"
            for level, count in self.category_confidence.items()))
        lines.append(f"errors: {self.errors}")
        return "\n".join(lines)


def _trigram_embeddings(names: list[str]) -> np.ndarray:
    """L2-normalised hashed character-trigram counts: similar spellings give close vectors."""
    vectors = np.zeros((len(names), TRIGRAM_DIMS), dtype=np.float32)
    for row, name in enumerate(names):
        text = f"  {name.lower()} "
        for i in range(len(text) - 2):
            bucket = int.from_bytes(hashlib.blake2b(text[i:i + 3].encode(), digest_size=4).digest(), "big")
            vectors[row, bucket % TRIGRAM_DIMS] += 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


def near_duplicates(rows: list[dict], threshold: float = 0.9) -> list[tuple[str, str, float]]:
    """Pairs of targets in the same super-category whose names are near-identical (cosine ≥ ``threshold``)."""
    pairs = []
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["super_category"] or "", []).append(row)
    for members in groups.values():
        embeddings = _trigram_embeddings([m["name"] for m in members])
        similarity = embeddings @ embeddings.T
        first, second = np.nonzero(np.triu(similarity, k=1) >= threshold)
        pairs.extend((members[i]["key"], members[j]["key"], round(float(similarity[i, j]), 3))
                     for i, j in zip(first, second, strict=True))
    return sorted(pairs, key=lambda p: -p[2])


def check(store: GraphStore, duplicate_threshold: float = 0.9) -> QualityReport:
    return QualityReport(
        inapplicable_attributes=store.read(cypher.INAPPLICABLE_ATTRIBUTES),
        invalid_quantities=store.read(cypher.NON_NUMERIC_QUANTITIES),
        targets_without_category=[r["target"] for r in store.read(cypher.TARGETS_WITHOUT_CATEGORY)],
        class_set_overlap=[r["target"] for r in store.read(cypher.CLASS_SET_OVERLAP)],
        near_duplicates=near_duplicates(store.read(cypher.TARGET_NAMES), duplicate_threshold),
        contradicted_categories=store.read(cypher.CONTRADICTED_CATEGORIES),
        category_confidence={str(r["confidence"]): r["targets"] for r in store.read(cypher.CATEGORY_CONFIDENCE)},
    )
