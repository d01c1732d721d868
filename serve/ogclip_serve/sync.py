"""Class embeddings from the graph: what a replica serves, kept in step with the graph while it runs.

The graph holds, per model version, one full-size text embedding per class (written by the export step, or by a
replica's own text tower on demand) and the class sets. A replica polls a cheap fingerprint of its class sets —
members, super-categories and, per member, the signature of its embedding under the bundle's version — and, when
it changes, reads the vectors, embeds what has none (``embed_missing``; written back to the graph with
``write_back`` so other replicas and later starts reuse them), builds the faiss indexes and hands back a new
:class:`~ogclip_serve.index.Snapshot`. The revision is a hash of that fingerprint: every replica that sees the same
graph reports the same revision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ogclip.models import OGCLIP
from ogclip_kg import cypher
from ogclip_kg.prompts import embed_classes, fetch_class_facts
from ogclip_kg.store import GraphStore
from ogclip_serve.config import ServeClassesConfig
from ogclip_serve.errors import EmbeddingVersionError, NotFound, quoted
from ogclip_serve.index import ClassInfo, ClassSetIndex, Snapshot, VectorIndex

log = logging.getLogger("ogclip_serve")

READ_BATCH = 1000


@dataclass(frozen=True)
class GraphState:
    """The polled fingerprint: per served class set, its member rows (no vectors)."""

    revision: str
    members: dict[str, list[dict[str, Any]]]


def check_graph(store: GraphStore, model_version: str, full_dim: int, class_sets: list[str]) -> int:
    """Refuse, loudly, a graph that does not match a bundle: no class embeddings under its version (they were made
    by another model), embeddings of another dimension, or a served class set that does not exist. Returns the
    number of class embeddings of the version."""
    count = store.read(cypher.EMBEDDING_COUNT, model_version=model_version)[0]["n"]
    if count == 0:
        versions = [f"{r['model_version']} ({r['classes']} classes)" for r in store.read(cypher.EMBEDDING_VERSIONS)]
        raise EmbeddingVersionError(
            f"the graph has no class embeddings for the bundle's model_version {model_version}; it has "
            f"{', '.join(versions) or 'none'}. Class embeddings made by another model cannot be served with this "
            "bundle: run the export step for this bundle (ogclip train exports them) or serve the bundle whose "
            "version the graph holds")
    stored = store.read(cypher.EMBEDDING_DIM, model_version=model_version)[0]["dim"]
    if stored != full_dim:
        raise EmbeddingVersionError(f"class embeddings of {model_version} in the graph are {stored}-dimensional; the "
                                    f"bundle's model embeds in {full_dim}")
    existing = {r["key"] for r in store.read(cypher.CLASS_SETS)}
    unknown = [name for name in class_sets if name not in existing]
    if unknown:
        raise EmbeddingVersionError(f"class sets {unknown} are not in the graph (it has {sorted(existing)})")
    return count


class ClassEmbeddingSync:
    """Reads (and, on demand, writes) the class embeddings of one model version for the served class sets.

    Thread-safe for one poller plus request threads: the graph driver is, and on-demand embedding takes a lock so
    two requests asking for the same new class embed it once.
    """

    def __init__(self, store: GraphStore, model: OGCLIP, model_version: str, cfg: ServeClassesConfig,
                 dims: list[int], use_gpu: bool = False, on_embedded: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.model = model
        self.model_version = model_version
        self.cfg = cfg
        self.dims = dims
        self.full_dim = model.dims[-1]
        self.use_gpu = use_gpu
        self._embed_lock = threading.Lock()
        self.embedded_on_demand = 0
        self.on_embedded = on_embedded  # told how many classes were embedded on demand (metrics)

    def check(self) -> None:
        """Refuse, loudly, a graph that does not match the bundle (see :func:`check_graph`)."""
        check_graph(self.store, self.model_version, self.full_dim, self.cfg.class_sets)

    # -- polling -------------------------------------------------------------------------------------------------

    def state(self) -> GraphState:
        """The class sets' members and embedding signatures, and their revision hash (no vectors are read)."""
        members = {name: self.store.read(cypher.CLASS_SET_STATE, key=name, model_version=self.model_version)
                   for name in self.cfg.class_sets}
        canonical = json.dumps({name: [[r["key"], r["super_category"], r["embedding"]] for r in rows]
                                for name, rows in members.items()}, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{self.model_version}\n{canonical}".encode()).hexdigest()[:16]
        return GraphState(revision=f"rev-{digest}", members=members)

    # -- loading -------------------------------------------------------------------------------------------------

    def read_vectors(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored full-size embeddings of ``keys`` under the model version (absent keys left out)."""
        keys = list(keys)
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), READ_BATCH):
            for row in self.store.read(cypher.READ_EMBEDDINGS_FOR_KEYS, model_version=self.model_version,
                                       keys=keys[start:start + READ_BATCH]):
                if row["dim"] != self.full_dim:
                    raise EmbeddingVersionError(f"class embedding of {row['target_key']} under {self.model_version} "
                                                f"is {row['dim']}-dimensional; the model embeds in {self.full_dim}")
                out[row["target_key"]] = np.asarray(row["vector"], dtype=np.float32)
        return out

    def embed(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Embed classes with the bundle's text tower from their graph prompts, as the export step does; written
        back to the graph when configured. KeyError names classes the graph does not have."""
        keys = sorted(set(keys))
        if not keys:
            return {}
        with self._embed_lock:
            fresh = self.read_vectors(keys)  # another request, replica or the export step may have done it already
            todo = [k for k in keys if k not in fresh]
            if todo:
                rows = fetch_class_facts(self.store, todo)
                prompts, vectors = embed_classes(self.model, rows, self.cfg.prompts, self.cfg.prompt_seed)
                vectors = vectors.cpu().numpy().astype(np.float32)
                made = dict(zip(prompts, vectors, strict=True))
                if self.cfg.write_back:
                    self.store.write_embeddings(self.model_version, {k: v.tolist() for k, v in made.items()},
                                                prompts)
                self.embedded_on_demand += len(made)
                if self.on_embedded is not None:
                    self.on_embedded(len(made))
                log.info("embedded %d classes on demand%s", len(made), " (written to the graph)"
                         if self.cfg.write_back else "")
                fresh.update(made)
        return fresh

    def load(self, state: GraphState | None = None) -> Snapshot:
        """Build a snapshot of the served class sets at the graph's current state."""
        started = time.perf_counter()
        state = state or self.state()
        rows = {r["key"]: r for members in state.members.values() for r in members}
        vectors = self.read_vectors(rows)
        missing = [key for key in rows if key not in vectors]
        if missing and self.cfg.embed_missing:
            vectors.update(self.embed(missing))
            if self.cfg.write_back:
                state = self.state()  # the write-back changed the signatures: report the graph's new revision
        classes = {key: ClassInfo(key=key, name=row["name"] or key, super_category=row["super_category"])
                   for key, row in rows.items()}
        sets = {}
        for name, members in state.members.items():
            served = [classes[r["key"]] for r in members if r["key"] in vectors and r["key"] in classes]
            matrix = (np.stack([vectors[c.key] for c in served]) if served
                      else np.zeros((0, self.full_dim), np.float32))
            sets[name] = ClassSetIndex(name=name, classes=served, vectors=matrix,
                                       index=VectorIndex(matrix, self.dims, self.use_gpu),
                                       missing=sorted(r["key"] for r in members if r["key"] not in vectors))
        return Snapshot(model_version=self.model_version, revision=state.revision, class_sets=sets,
                        classes={k: c for k, c in classes.items() if k in vectors},
                        vectors={k: v for k, v in vectors.items() if k in classes},
                        load_seconds=time.perf_counter() - started)

    def lookup(self, keys: list[str]) -> tuple[list[ClassInfo], dict[str, np.ndarray]]:
        """Classes outside the served sets (explicit candidate labels): their stored vectors, embedded on demand
        when missing and allowed. NotFound names keys that are not classes in the graph."""
        found = {r["key"]: ClassInfo(key=r["key"], name=r["name"] or r["key"], super_category=r["super_category"])
                 for r in self.store.read(cypher.TARGET_SUMMARIES, keys=keys)}
        unknown = [k for k in keys if k not in found]
        if unknown:
            raise NotFound(f"unknown labels (not classes in the graph): {', '.join(map(quoted, unknown[:10]))}",
                           param="labels")
        vectors = self.read_vectors(keys)
        missing = [k for k in keys if k not in vectors]
        if missing:
            if not self.cfg.embed_missing:
                raise NotFound(f"labels without a class embedding for {self.model_version}: "
                               f"{', '.join(map(quoted, missing[:10]))}", param="labels")
            vectors.update(self.embed(missing))
        return [found[k] for k in keys], vectors
