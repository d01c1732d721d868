"""Knowledge-infused prompts: text for each class built from its graph facts (the paper's KG-Aug).

Five templates per class: the label alone; label and category; label and attributes; a natural-language
description; the appearance alone (the visual attributes without the name). Wording variants and fact order are
chosen by a seeded hash, so the same graph and seed always give the same prompts. The captioning stage's VLM prompt
is built from the same facts. A class embedding (:func:`prompt_texts`) averages one sentence per visual attribute
instead (:func:`attribute_prompts`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ogclip.synth import COLOURS, PATTERNS, SILHOUETTES, SIZES
from ogclip_kg import cypher
from ogclip_kg.store import GraphStore

if TYPE_CHECKING:
    from torch import Tensor, nn

TEMPLATES = ("label", "label_category", "label_attributes", "description", "appearance")
_OPENERS = ("a photo of", "an image of", "a picture of", "a photograph of")


def fetch_class_facts(store: GraphStore, keys: Iterable[str], batch_size: int = 1000) -> list[dict[str, Any]]:
    """Facts of many classes with one query per ``batch_size`` keys (UNWIND), in the order of ``keys``."""
    keys = list(keys)
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(keys), batch_size):
        for row in store.read(cypher.CLASS_FACTS, keys=keys[start:start + batch_size]):
            rows[row["key"]] = row
    missing = [k for k in keys if k not in rows]
    if missing:
        raise KeyError(f"unknown classes: {', '.join(missing[:10])}")
    return [rows[k] for k in keys]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _rng(seed: int, key: str, salt: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()[:8], "big"))


def _facts(row: dict[str, Any]) -> dict[str, Any]:
    return {f["attribute"]: f["value"] for f in row["facts"]}


def _category(row: dict[str, Any]) -> str:
    return row["categories"][0] if row["categories"] else row["super_category"]


def _kind(facts: Mapping[str, Any]) -> str:
    """'ship' or 'aircraft', as the silhouette says."""
    return "ship" if str(facts.get("silhouette", "")).endswith("hull") else "aircraft"


def appearance(row: dict[str, Any]) -> str:
    """'a large grey aircraft with a swept wing silhouette, two-tone paint and red accents'."""
    facts = _facts(row)
    kind = _kind(facts)
    size, colour = facts.get("size_class", ""), facts.get("colour", "")
    text = f"{_article(size or colour or kind)} {' '.join(w for w in (size, colour) if w)} {kind}".replace("  ", " ")
    details = []
    if "silhouette" in facts:
        details.append(f"a {facts['silhouette']} silhouette")
    if facts.get("pattern") and facts["pattern"] != "plain":
        details.append(f"{facts['pattern']} paint")
    if "accent" in facts:
        details.append(f"{facts['accent']} accents")
    return text + (" with " + ", ".join(details[:-1]) + (" and " if len(details) > 1 else "") + details[-1]
                   if details else "")


def attribute_prompts(row: dict[str, Any]) -> list[str]:
    """One sentence per visual attribute, each binding its value to the part it describes, plus the category.

    'an aircraft with a swept wing silhouette.', 'a large aircraft, large in the picture.', 'an aircraft whose body
    is painted grey.', 'an aircraft with two-tone paint.', 'an aircraft whose markings are red.', 'a fighter, a
    military aircraft.'. A frozen sentence encoder mean-pools its tokens, so one sentence naming two colours ("a grey
    aircraft ... red accents") barely tells which colour is the body's: a linear probe on such embeddings finds the
    accent colour 31% of the time. One sentence per attribute keeps every attribute separable, and a class embedding
    (the mean over its prompts) becomes a sum of attribute parts: what lets an unseen combination of seen attributes
    be recognised. The accent colour is only visible on patterned paint, so plain paint says so instead.
    """
    facts = _facts(row)
    kind = _kind(facts)
    thing = f"{_article(kind)} {kind}"
    prompts = []
    if "silhouette" in facts:
        prompts.append(f"{thing} with a {facts['silhouette']} silhouette.")
    if "size_class" in facts:
        prompts.append(f"{_article(facts['size_class'])} {facts['size_class']} {kind}, {facts['size_class']} in the "
                       "picture.")
    if "colour" in facts:
        prompts.append(f"{thing} whose body is painted {facts['colour']}.")
    pattern = facts.get("pattern", "plain")
    if pattern == "plain":
        prompts.append(f"{thing} in plain paint of a single colour, without markings.")
    else:
        prompts.append(f"{thing} with {pattern} paint.")
        if "accent" in facts:
            prompts.append(f"{thing} whose markings are {facts['accent']}.")
    category = _category(row)
    prompts.append(f"{_article(category)} {category}, {_article(row['super_category'])} {row['super_category']}.")
    return prompts


# The visual attributes a look is made of (graph attribute keys) and the values the synthetic world renders.
LOOK_VALUES: dict[str, tuple[str, ...]] = {
    "silhouette": tuple(SILHOUETTES), "colour": tuple(COLOURS), "size_class": tuple(SIZES), "pattern": PATTERNS,
    "accent": tuple(COLOURS),
}


def contrast_looks(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every look that differs from the class's in exactly one visual attribute: the hard negatives of
    contrastive training. A random batch of thousands of classes almost never holds two classes one attribute
    apart, so nothing would push the image tower to tell, say, red markings from orange ones.

    A silhouette only changes within its kind (aircraft or ship), and the accent colour not at all on plain paint,
    where it is invisible (and the prompts do not mention it): such a "negative" would look exactly like the class.
    The rows keep the class's key, name and category; only their facts change.
    """
    facts = _facts(row)
    looks = []
    for attribute, values in LOOK_VALUES.items():
        if attribute not in facts or (attribute == "accent" and facts.get("pattern", "plain") == "plain"):
            continue
        for value in values:
            if value == facts[attribute] or (attribute == "silhouette" and
                                             value.endswith("hull") != facts[attribute].endswith("hull")):
                continue
            changed = {**facts, attribute: value}
            looks.append({**row, "facts": [{"attribute": a, "value": v} for a, v in changed.items()]})
    return looks


def _known_facts(row: dict[str, Any]) -> list[str]:
    facts = _facts(row)
    sentences = []
    if row["manufacturers"]:
        sentences.append(f"It is made by {row['manufacturers'][0]}.")
    if row["operators"]:
        operators = sorted(row["operators"])[:3]
        sentences.append("It is operated by " + (" and ".join(operators) if len(operators) < 3
                                                 else f"{operators[0]}, {operators[1]} and {operators[2]}") + ".")
    if "engine_count" in facts and "engine_type" in facts:
        engine = str(facts["engine_type"]).split("/")[0].lower()
        count = facts["engine_count"]
        sentences.append(f"It has {count} {engine} engine{'s' if count != 1 else ''}.")
    if "length" in facts:
        sentences.append(f"It is about {facts['length']:.0f} m long.")
    if row["equipment"]:
        sentences.append("It can carry " + " and ".join(sorted(row["equipment"])[:2]) + ".")
    return sentences


def description(row: dict[str, Any], seed: int = 0) -> str:
    """A natural-language description of the class from its facts."""
    rng = _rng(seed, row["key"], "description")
    category = _category(row)
    facts = _known_facts(row)
    rng.shuffle(facts)
    looks = appearance(row)
    return " ".join([f"The {row['name']} is {_article(category)} {category}.", *facts,
                     f"It looks like {looks}." if looks else ""]).strip()


def class_prompts(row: dict[str, Any], seed: int = 0) -> dict[str, str]:
    """One prompt per template for a class (``row`` from :func:`fetch_class_facts`)."""
    opener = _rng(seed, row["key"], "opener").choice(_OPENERS)
    name, category = row["name"], _category(row)
    looks = appearance(row)
    return {
        "label": f"{opener} {_article(name)} {name}.",
        "label_category": f"{opener} {_article(name)} {name}, {_article(category)} {category}.",
        "label_attributes": f"{opener} {_article(name)} {name}, {looks}." if looks else f"{opener} a {name}.",
        "description": description(row, seed),
        "appearance": f"{opener} {looks}.",
    }


def prompt_texts(row: dict[str, Any], mode: str = "kg", seed: int = 0) -> list[str]:
    """The texts a class embedding averages: for ``kg`` (KG-Aug) one sentence per visual attribute and the
    category, from the graph's facts (:func:`attribute_prompts`); for ``label`` the label template alone.

    The name-bearing templates are left out of ``kg``: an unseen class's name carries little visual signal, and
    averaging it in pulls each class vector towards its name rather than its look. Training (the ensemble an image
    is aligned with), export (``ogclip train``) and the service's on-demand embedding all use this, so a class
    embedded by any of them gets the same vector under one model version."""
    if mode not in ("kg", "label"):
        raise ValueError(f"unknown prompt mode {mode!r}; expected 'kg' or 'label'")
    if mode == "label":
        return [class_prompts(dict(row), seed)["label"]]
    return list(dict.fromkeys(attribute_prompts(dict(row))))


def prompts_for(rows: Sequence[Mapping[str, Any]], mode: str = "kg", seed: int = 0) -> dict[str, list[str]]:
    """Each class's :func:`prompt_texts`, keyed by class key (``rows`` are :func:`fetch_class_facts` rows)."""
    return {row["key"]: prompt_texts(dict(row), mode, seed) for row in rows}


def embed_classes(model: nn.Module, rows: Sequence[Mapping[str, Any]], mode: str = "kg", seed: int = 0,
                  batch_size: int = 256) -> tuple[dict[str, list[str]], Tensor]:
    """Graph facts → class embeddings for ``model``: each class's prompts and the ``[len(rows), D]`` tensor of its
    L2-normalised ensemble embeddings (rows in ``rows``' order). The one path from the graph to a class vector:
    the export after training, evaluation and the service's on-demand embedding all call it, so a class embedded
    by any of them gets the same vector under one model version."""
    from ogclip.zeroshot import class_embeddings

    prompts = prompts_for(rows, mode, seed)
    return prompts, class_embeddings(model, prompts, batch_size)


PLACES = {"land": "on an apron", "sea": "in a harbour", "sky": "in the sky"}  # a scene's background, in words
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _where(x: float, y: float) -> str:
    """A point of the image (fractions from the top left) in words: 'top left', 'bottom', 'centre', ..."""
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where point ``a`` lies relative to ``b``, along the axis they differ most on."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def target_nouns(row: Mapping[str, Any]) -> set[str]:
    """The nouns a scene caption names a target of this class by: its category and its kind ('aircraft', 'ship')."""
    return {_category(dict(row)).lower(), _kind(_facts(dict(row)))}


def keyword_vocabulary(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every noun a scene caption can name these classes' targets by (:func:`target_nouns`), longest first: the
    embedded default of the keyword extractor (production asks an LLM for a caption's nouns)."""
    return sorted({noun for row in rows for noun in target_nouns(row)}, key=lambda w: (-len(w), w))


def caption_keywords(caption: str, vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary's nouns a caption names, in order of first mention, each once: whole words, a plural 's'
    allowed, longer terms first so 'aircraft carrier' is not also 'aircraft'."""
    text = caption.lower()
    found: list[tuple[int, str]] = []
    taken = [False] * len(text)
    for term in vocabulary:
        for match in re.finditer(rf"\b{re.escape(term)}s?\b", text):
            if not any(taken[match.start():match.end()]):
                found.append((match.start(), term))
                taken[match.start():match.end()] = [True] * (match.end() - match.start())
    return list(dict.fromkeys(term for _, term in sorted(found)))


def scene_captions(rows: Sequence[Mapping[str, Any]], centres: Sequence[tuple[float, float]],
                   areas: Sequence[float], background: str) -> list[str]:
    """Five captions of one overhead scene from its targets' graph facts (``rows[i]`` for target i) and the layout
    (``centres[i]`` as fractions of the image from the top left, ``areas[i]`` the visible share; hidden targets are
    not described), the way retrieval sets caption a picture five times:

    'two aircraft and a ship in a harbour.' (the count and the place), 'a large grey destroyer with striped paint
    at the top left.' (the largest target), 'a grey destroyer right of a white fighter.' (the two largest, where one
    lies from the other), 'a grey ship, a white aircraft and a black aircraft.' (the colours), 'a large destroyer, a
    small fighter and a medium fighter.' (the categories and sizes). Targets are named largest first."""
    if not len(rows) == len(centres) == len(areas):
        raise ValueError("scene_captions needs one centre and one area per target")
    seen = sorted((i for i in range(len(rows)) if areas[i] > 0), key=lambda i: -areas[i])
    if not seen:
        raise ValueError("a scene caption needs at least one visible target")
    facts = [_facts(dict(rows[i])) for i in seen]
    kinds = [_kind(f) for f in facts]
    categories = [_category(dict(rows[i])) for i in seen]
    colours = [f.get("colour", "") for f in facts]
    sizes = [f.get("size_class", "") for f in facts]

    def count(kind: str, plural: str) -> str | None:
        n = kinds.count(kind)
        return None if n == 0 else f"{_article(kind)} {kind}" if n == 1 else f"{_NUMBERS[min(n, 9)]} {plural}"

    counted = [c for c in (count("aircraft", "aircraft"), count("ship", "ships")) if c]
    where = PLACES.get(background, f"over {background}")
    first = f"{_article(sizes[0] or colours[0])} {' '.join(w for w in (sizes[0], colours[0]) if w)} {categories[0]}"
    pattern = facts[0].get("pattern", "plain")
    largest = first + (f" with {pattern} paint" if pattern != "plain" else "")
    described = [f"{_article(colours[k])} {colours[k]} {categories[k]}" for k in range(min(2, len(seen)))]
    relation = (f"{described[0]} {_relation(centres[seen[0]], centres[seen[1]])} {described[1]}." if len(seen) > 1
                else f"{described[0]} alone {where}.")
    return [
        f"{_listing(counted)} {where}.",
        f"{largest} at the {_where(*centres[seen[0]])}.",
        relation,
        _listing([f"{_article(c)} {c} {k}" for c, k in zip(colours, kinds, strict=True)]) + ".",
        _listing([f"{_article(s)} {s} {c}" for s, c in zip(sizes, categories, strict=True)]) + ".",
    ]


def vlm_prompt(row: dict[str, Any]) -> str:
    """The captioning prompt for an image of this class: the same facts, and what to describe."""
    facts = "\n".join(f"- {sentence}" for sentence in _known_facts(row))
    return (
        f"This image shows {_article(row['name'])} {row['name']} ({_category(row)}).\n"
        f"Known facts:\n{facts or '- none'}\n"
        "Write one sentence describing the target as it appears in this image: its silhouette, colour scheme, "
        "paint pattern, apparent size and any visible equipment. Use only what is visible or listed above."
    )
