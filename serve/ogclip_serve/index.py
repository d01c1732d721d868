"""Vector search over class embeddings: one exact faiss inner-product index per served embedding size.

Class embeddings are stored at the full size D; the index for size d holds their first d components re-normalised
(``ogclip.models.truncate``), which is what the Matryoshka head serves at d. The vectors are unit length, so inner
product is cosine similarity. ``faiss`` is imported lazily (faiss-cpu, or faiss-gpu when the machine has it: the
index is then copied to the GPU).

A :class:`Snapshot` is immutable: the sync thread builds a new one and swaps the reference, and a request reads the
reference once, so it sees one consistent revision however long it takes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the class index needs faiss: install the project with its `cpu` extra (faiss-cpu) or its "
                          "`gpu` extra (faiss-gpu), e.g. `pip install -e '.[cpu]'`") from exc
    return faiss


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32 for faiss."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Exhaustive (flat) inner-product indexes of the same vectors at several embedding sizes.

    Flat search is exact and, at the few thousand classes of a class set, takes microseconds to a millisecond;
    an approximate index would only add recall loss. ``float16`` stores the vectors at half precision (faiss's
    fp16 scalar quantizer; on a GPU, a flat index with float16 storage): still every vector scored, half the
    memory, and a single query over a large collection about twice as fast (it reads half the bytes), with
    similarities within about 1e-3 of the exact ones. A GPU index is not safe to search from two threads at once,
    so GPU searches take a lock; CPU searches do not need one.
    """

    def __init__(self, vectors: np.ndarray, dims: list[int], use_gpu: bool = False, float16: bool = False) -> None:
        faiss = _faiss()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:  # rows of any shape, flattened; an empty (0, D) stays as it is
            vectors = vectors.reshape(len(vectors), -1)
        self.size = len(vectors)
        self.full_dim = vectors.shape[1]
        self.on_gpu = use_gpu and gpu_available()
        self._lock = threading.Lock() if self.on_gpu else None
        self._indexes: dict[int, Any] = {}
        self._resources = faiss.StandardGpuResources() if self.on_gpu else None
        for dim in dims:
            if float16 and not self.on_gpu:
                index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexFlatIP(dim)
            if self.size:
                index.add(normalise(vectors[:, :dim]))
            if self.on_gpu:
                options = faiss.GpuClonerOptions()
                options.useFloat16 = float16
                index = faiss.index_cpu_to_gpu(self._resources, 0, index, options)
            self._indexes[dim] = index

    @property
    def dims(self) -> list[int]:
        return sorted(self._indexes)

    def search(self, queries: np.ndarray, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row ids), each (len(queries), k), best first; ``queries`` are full-size features."""
        k = min(k, self.size)
        query = normalise(np.asarray(queries, dtype=np.float32)[:, :dim])
        if k == 0:
            return np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64)
        index = self._indexes[dim]
        if self._lock is None:
            return index.search(query, k)
        with self._lock:
            return index.search(query, k)


@dataclass(frozen=True)
class ClassInfo:
    key: str
    name: str
    super_category: str | None


@dataclass(frozen=True)
class ClassSetIndex:
    """One served class set: its classes (rows of ``index``, sorted by key) and their full-size vectors."""

    name: str
    classes: list[ClassInfo]
    vectors: np.ndarray
    index: VectorIndex
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs from the graph, at one revision."""

    model_version: str
    revision: str
    class_sets: dict[str, ClassSetIndex]
    classes: dict[str, ClassInfo]
    vectors: dict[str, np.ndarray]
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0


@dataclass(frozen=True)
class CollectionIndex:
    """A retrieval collection as a replica serves it: its items and one flat index per served size for their image
    embeddings and one for their captions' (``retrieval.storage``: float16 by default). Immutable and swapped
    whole, like :class:`Snapshot`."""

    revision: str
    model_version: str
    ids: list[str]
    labels: list[str]
    captions: list[str]
    images: VectorIndex
    texts: VectorIndex
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, folder: Any, model_version: str, dims: list[int], use_gpu: bool = False,
             float16: bool = False) -> CollectionIndex:
        """The current revision at ``folder`` (refused when embedded by another model); ``float16``: see
        :class:`VectorIndex`."""
        from ogclip.collection import read_collection

        found = read_collection(folder, expected_version=model_version)
        return cls(found.revision, found.model_version, found.ids, found.labels, found.captions,
                   VectorIndex(found.images, dims, use_gpu, float16),
                   VectorIndex(found.caption_vectors, dims, use_gpu, float16))


def scores(similarities: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over the candidates of ``logit_scale`` × cosine similarity, as CLIP's zero-shot classifier."""
    logits = logit_scale * similarities.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
