"""The Ray Serve application: a FastAPI app on autoscaling classifier replicas, behind the gateway (the ingress).

Each replica loads the export bundle, checks that the graph holds class embeddings for the bundle's
``model_version`` (refusing to start otherwise), builds one faiss index per served embedding size, and keeps them
in step with the graph from a background thread (:mod:`ogclip_serve.sync`); a new snapshot replaces the old one
atomically, so no request is dropped or sees a half-built index. Images (and texts) of concurrent requests are
batched into one forward pass with ``@serve.batch``; Serve's ``max_queued_requests`` turns overload into immediate
503s instead of unbounded queues.

With ``retrieval.collection`` set, a replica also serves ``/v1/retrieve`` over a collection of embedded images and
captions (``ogclip index build``; one flat index per served size), polls it for a new revision and swaps it in the
same way.

HTTP reaches the replicas through :mod:`ogclip_serve.gateway`, the application's ingress: it hands each request
whole to a replica's :meth:`OGClipClassifier.forward` (which runs it through the FastAPI app below) and sends an
idempotent request again to another replica when its replica dies mid-request.

``build_app(args)`` is the application builder for ``serve run``/``serve deploy``/RayService
(``import_path: ogclip_serve.app:build_app``); ``args`` is a :class:`ogclip_serve.config.ServeConfig` (or a
:class:`ogclip_serve.config.ServeConfig`) as a mapping, or ``{"config": "path/to/serve.yaml"}``.
"""

# No ``from __future__ import annotations`` here: Serve pickles the deployment class by value and FastAPI then
# resolves endpoint annotations in the replica, where string annotations would name globals the copy lacks.
import asyncio
import base64
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.deployment import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ogclip import __version__
from ogclip.config import load_yaml_config
from ogclip_serve.auth import AuthPolicy
from ogclip_serve.config import ServeConfig, serve_config
from ogclip_serve.errors import (
    BadRequest,
    InternalError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    quoted,
)
from ogclip_serve.index import ClassInfo, CollectionIndex, Snapshot, VectorIndex, normalise, scores
from ogclip_serve.inputs import PreparedImage, RawImage, decode_base64, parse_json, prepare_all
from ogclip_serve.metrics import endpoint_label
from ogclip_serve.schemas import (
    ClassesResponse,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ReadyResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from ogclip_serve.transport import DEADLINE_KEY, Answer, Forwarded, error_response, read_body, run_asgi

log = logging.getLogger("ogclip_serve")
ModelT = TypeVar("ModelT", bound=BaseModel)

IMAGE_URL_PREFIX = "data:image/"

app = FastAPI(
    title="OG-CLIP classification service",
    version=__version__,
    description="Zero-shot target classification with OG-CLIP: images (optionally with a mask or box) against "
    "class sets whose text embeddings come from the knowledge graph; OpenAI-compatible embeddings.",
)


class Admission:
    """Load shedding by deadline: a request that would be answered after its deadline (set by the gateway when the
    request arrived: ``GatewayConfig.replica_budget_s`` later) is refused with 503 and ``Retry-After`` when it
    reaches the replica's app, before any work, instead of being served late. How long a request takes from there
    is a moving average of the admitted ones, so the check follows what requests cost now (their size, the batch,
    the CPU), not a number in the config. While that average is over the budget itself, nothing is refused: no
    request could be answered in time, refusing them all would keep the average from ever learning otherwise, and
    the gateway's limit (one request at a time by then) bounds the queue."""

    def __init__(self, retry_after_s: int, budget_s: float | None) -> None:
        self.retry_after_s, self.budget_s = retry_after_s, budget_s
        self.expected_s = 0.0

    def refusal(self, deadline: float | None) -> Unavailable | None:
        if deadline is None or self.budget_s is None or self.expected_s >= self.budget_s:
            return None
        late = time.time() + self.expected_s - deadline
        if late <= 0:
            return None
        return Unavailable(f"the service is overloaded: this request would be answered {late:.2f} s after its "
                           "latency budget; send it again later", retry_after=self.retry_after_s, code="overloaded")

    def served(self, seconds: float) -> None:
        self.expected_s += 0.1 * (seconds - self.expected_s)


class _ReplicaState:
    """What the app-level hooks (auth, metrics, admission) need from the replica living in this process."""

    auth: AuthPolicy | None = None
    metrics: Any = None
    admission: Admission | None = None


_STATE = _ReplicaState()


def _register(auth: AuthPolicy, metrics: Any, admission: Admission) -> None:
    # Serve pickles the deployment class by value, module globals included: a method that assigned to ``_STATE``
    # would change a copy. This function is pickled by reference, so it reaches the module's own ``_STATE``.
    _STATE.auth, _STATE.metrics, _STATE.admission = auth, metrics, admission


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Unexpected exceptions become a 500 with a short message (and a log line), never a dead replica."""
    try:
        yield
    except (ServiceError, RequestValidationError, StarletteHTTPException):
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise InternalError(f"{what} failed: {type(exc).__name__}") from exc


# -- app-level hooks ---------------------------------------------------------------------------------------------

class _Observe:
    """Admission and metrics around every HTTP request, as a plain ASGI middleware: a request past its deadline is
    refused before the app sees it, and every answer is counted with its status and time. (Starlette's
    ``BaseHTTPMiddleware`` would run the app in a task of its own behind memory streams: a cost on every request.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        admission = _STATE.admission
        refusal = admission.refusal(scope.get(DEADLINE_KEY)) if admission is not None else None
        try:
            if refusal is not None:
                await error_response(refusal)(scope, receive, observed)
            else:
                await self.app(scope, receive, observed)
                if admission is not None:
                    admission.served(time.perf_counter() - started)
        except Exception:
            _count(scope["path"], 500, started)  # the outermost handler answers it with a 500
            raise
        _count(scope["path"], status, started)  # (a request cancelled by its client's leaving is not counted)


def _count(path: str, status: int, started: float) -> None:
    metrics = _STATE.metrics
    if metrics is not None:
        endpoint = endpoint_label(path)
        metrics.request(endpoint, status, (time.perf_counter() - started) * 1000)
        if status >= 400:
            metrics.error(endpoint, str(status))


app.add_middleware(_Observe)


@app.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(BadRequest(_describe(exc.errors())).body(), status_code=400)  # OpenAI answers 400 here


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Outside the endpoints' own guard (a dependency, a parser): still the error format, never a bare text 500.
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(InternalError(f"{type(exc).__name__} while handling the request"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ServiceError(str(exc.detail), code=f"http_{exc.status_code}")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _describe(errors: Any) -> str:
    """Pydantic errors as one line: 'images.0.image: Field required; top_k: ...'."""
    parts = []
    for error in list(errors)[:5]:
        location = ".".join(quoted(p) if isinstance(p, str) and len(p) > 100 else str(p)
                            for p in error.get("loc", ()) if p != "body")  # a field's name is the client's too
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


_bearer = HTTPBearer(auto_error=False, description="OGCLIP_API_TOKEN of the deployment")


async def authorize(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                    ) -> None:
    """Every /v1 endpoint requires the bearer token (unless the service runs in local mode without one)."""
    if _STATE.auth is None:
        raise NotReady("the replica is starting")
    _STATE.auth.check(request.headers.get("authorization"))


class ClassifyOptions(BaseModel):
    """The non-image fields of a classify request (shared by the JSON and multipart forms)."""

    model_config = ConfigDict(extra="forbid")

    class_set: str | None = None
    labels: list[str] | None = Field(default=None, min_length=1)
    dim: int | None = None
    top_k: int = Field(default=5, ge=1)
    segment: bool | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "bad input"), (401, "missing or wrong bearer token"), (404, "unknown class set, label "
                       "or model"), (413, "too large"), (503, "overloaded or not ready"))
}

_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"},
        "mask": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "mask files, one per image, in the same order"},
        "box": {"type": "array", "items": {"type": "string"},
                "description": "'x0,y0,x1,y1' per image, in the same order ('' for none)"},
        "class_set": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
        "dim": {"type": "integer"}, "top_k": {"type": "integer"}, "segment": {"type": "boolean"}}}},
}}}

_EMBEDDINGS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}}}}

_RETRIEVE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/RetrieveRequest"}}}}}


def _openapi() -> dict[str, Any]:
    """FastAPI's document plus the request schemas of the endpoints that read their bodies themselves."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ClassifyRequest, EmbeddingsRequest, RetrieveRequest, ErrorResponse):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in model_schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = model_schema
    app.openapi_schema = schema
    return schema


app.openapi = _openapi  # type: ignore[method-assign]


# -- multipart helpers (defined before the deployment class: Serve pickles it with what it references) ----------

async def _read_upload(upload: UploadFile, what: str, limit: int) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLarge(f"{what} is {upload.size} bytes; the limit is {limit}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
    return data


def _parse_box(value: Any, index: int) -> tuple[float, float, float, float] | None:
    text = str(value).strip()
    if not text:
        return None
    try:
        parts = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError as exc:
        raise BadRequest(f"images[{index}].box {quoted(text)} is not 'x0,y0,x1,y1'", param="box") from exc
    if len(parts) != 4 or not all(math.isfinite(p) for p in parts):
        raise BadRequest(f"images[{index}].box {quoted(text)} is not 'x0,y0,x1,y1'", param="box")
    return parts[0], parts[1], parts[2], parts[3]


# -- model calls -----------------------------------------------------------------------------------------------
# Module functions, not methods: Serve pickles the deployment class by value, and cloudpickle would then try to
# pickle torch submodules its methods' attribute names happen to match (``.classes`` -> ``torch.classes``, which
# does not pickle). They run in a worker thread: torch releases the GIL, so the event loop keeps accepting.

def _set_threads(count: int) -> None:
    torch.set_num_threads(count)


def image_features(model: Any, device: torch.device, items: list[PreparedImage]) -> np.ndarray:
    """Unnormalised full-size image features of prepared images, (len(items), D)."""
    images = torch.stack([item.image for item in items]).to(device)
    masks = torch.stack([item.mask for item in items]).to(device)
    with torch.inference_mode():
        return model.image_features(images, masks).float().cpu().numpy()


def text_features(model: Any, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return model.text_features(texts).float().cpu().numpy()


# -- the deployment ----------------------------------------------------------------------------------------------

@serve.deployment
@serve.ingress(app)
class OGClipClassifier:
    """One classifier replica: model, class-embedding snapshot, graph sync thread, batching."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        from ogclip.bundle import load_bundle
        from ogclip.device import resolve_device
        from ogclip.settings import Settings
        from ogclip.transforms import image_mask_transform
        from ogclip_kg.store import GraphStore
        from ogclip_serve.metrics import ServiceMetrics
        from ogclip_serve.sync import ClassEmbeddingSync

        self.cfg = cfg = serve_config(dict(config))
        settings = Settings()
        auth = AuthPolicy.from_settings(settings, cfg.host)  # before anything slow: a wrong setup fails at once
        # A replica owns a fraction of a node: as many torch threads as its CPUs, not the node's core count.
        _set_threads(max(1, math.ceil(cfg.deployment.num_cpus)))
        self.device = resolve_device(cfg.device)
        try:
            import faiss

            faiss.omp_set_num_threads(max(1, math.ceil(cfg.deployment.num_cpus)))
        except (ImportError, AttributeError):
            pass
        self.model, self.bundle = load_bundle(cfg.bundle, expected_version=cfg.model_version, device=self.device)
        self.dims = cfg.dims or self.model.dims
        unsupported = sorted(set(self.dims) - set(self.model.dims))
        if unsupported:
            raise ValueError(f"dims {unsupported} are not granularities of the model ({self.model.dims})")
        self.full_dim = self.model.dims[-1]
        self.logit_scale = float(self.model.logit_scale.detach().exp().clamp(max=100.0))
        self.model_ids = {self.bundle.model_version} | ({self.bundle.name} if self.bundle.name else set())
        self.transform = image_mask_transform(self.bundle.preprocess, train=False)
        self.segmenter, self.segmenter_name = self._build_segmenter()
        self.metrics = ServiceMetrics()
        self.store = GraphStore.from_settings(settings)
        self.sync = ClassEmbeddingSync(self.store, self.model, self.bundle.model_version, cfg.classes, self.dims,
                                       use_gpu=self.device.type == "cuda", on_embedded=self.metrics.on_demand.inc)
        self.sync.check()  # no embeddings for this version, or of another dimension: refuse to start, loudly
        self._snapshot: Snapshot = self.sync.load()
        self._on_snapshot(self._snapshot, previous=None, reloaded=True)
        # a configured collection embedded by another model refuses the start, like class embeddings do
        self._collection: CollectionIndex | None = self._load_collection()
        # the revision CURRENT named that could not be loaded, and why (a revision is immutable: not retried)
        self._collection_failed: tuple[str, str] | None = None
        self._extra: dict[str, tuple[ClassInfo, np.ndarray]] = {}  # explicit labels outside the served sets
        self._extra_revision = self._snapshot.revision
        self.last_sync_error: str | None = None
        self._image_batch.set_max_batch_size(cfg.batching.max_batch_size)
        self._image_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self._text_batch.set_max_batch_size(cfg.batching.max_batch_size)
        self._text_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self._stop = threading.Event()
        self._start_sync_thread()
        _register(auth, self.metrics, Admission(cfg.gateway.retry_after_s, cfg.gateway.replica_budget_s))
        log.info("replica ready: %s (%s), dims %s, revision %s, %s", self.bundle.model_version, self.bundle.name,
                 self.dims, self._snapshot.revision, {k: len(v.classes) for k, v in self._snapshot.class_sets.items()})

    # -- setup helpers -------------------------------------------------------------------------------------------

    def _build_segmenter(self) -> tuple[Any, str]:
        masks = self.cfg.masks
        if masks.segmenter == "cpu":
            from ogclip.segment import CpuSegmenter

            return CpuSegmenter().segment, "cpu"
        if masks.segmenter == "sam2":
            from ogclip.segment import Sam2Segmenter  # imports sam2, lazily: only deployments that use it need it

            return Sam2Segmenter(str(masks.sam2_checkpoint), masks.sam2_config, device=self.cfg.device).segment, "sam2"
        return None, "none"

    def _load_collection(self) -> CollectionIndex | None:
        """The configured collection's current revision (None when none is configured or written yet)."""
        from ogclip.collection import current_revision

        folder = self.cfg.retrieval.collection
        if folder is None or current_revision(folder) is None:
            return None
        return self._read_collection(folder)

    def _read_collection(self, folder: Path) -> CollectionIndex:
        return CollectionIndex.load(folder, self.bundle.model_version, self.dims, use_gpu=self.device.type == "cuda",
                                    float16=self.cfg.retrieval.storage == "float16")

    def _poll_collection(self) -> None:
        """Swap in a new revision of the collection when ``CURRENT`` names one. A revision that cannot be loaded
        (damaged, or embedded by another model) leaves the last good one served; it is reported by ``/readyz`` and
        counted once, and not read again (revisions never change) while ``CURRENT`` names it."""
        from ogclip.collection import current_revision

        folder = self.cfg.retrieval.collection
        if folder is None:
            return
        revision = current_revision(folder)
        served = self._collection.revision if self._collection is not None else None
        if revision is not None and revision == served:  # CURRENT back on the served revision: nothing failed
            self._collection_failed = None
        failed = self._collection_failed[0] if self._collection_failed is not None else None
        if revision is None or revision in (served, failed):
            return
        try:
            self._collection = self._read_collection(folder)
            self._collection_failed = None
            log.info("retrieval collection %s -> %s (%d items)", served, revision, len(self._collection.ids))
        except Exception as exc:  # a damaged or foreign revision: keep serving the last good one
            self._collection_failed = (revision, f"{type(exc).__name__}: {exc}")
            self.metrics.sync_errors.inc()
            log.warning("retrieval collection %s not loaded (serving %s): %s", revision, served, exc)

    def _on_snapshot(self, snapshot: Snapshot, previous: str | None, reloaded: bool) -> None:
        # Also called on every poll without a change: Ray drops gauges that are not set again for a while.
        self.metrics.snapshot(snapshot.model_version, snapshot.revision, previous, snapshot.loaded_at,
                              {name: len(s.classes) for name, s in snapshot.class_sets.items()}, reloaded)

    def _start_sync_thread(self) -> None:
        self._sync_thread = threading.Thread(target=self._sync_loop, name="ogclip-class-sync", daemon=True)
        self._sync_thread.start()
        if self.cfg.retrieval.collection is not None:
            self._collection_thread = threading.Thread(target=self._collection_loop, name="ogclip-collection-sync",
                                                       daemon=True)
            self._collection_thread.start()

    def _collection_loop(self) -> None:
        while not self._stop.wait(self.cfg.retrieval.poll_interval_s):
            self._poll_collection()

    def _sync_loop(self) -> None:
        """Poll the graph; on a change (or when a full refresh is due) build a new snapshot and swap it in."""
        classes = self.cfg.classes
        last_full = time.monotonic()
        while not self._stop.wait(classes.poll_interval_s):
            try:
                state = self.sync.state()
                full_due = time.monotonic() - last_full >= classes.full_refresh_s
                if state.revision == self._snapshot.revision and not full_due:
                    self.last_sync_error = None
                    self._on_snapshot(self._snapshot, None, reloaded=False)
                    continue
                snapshot = self.sync.load(state)
                previous, self._snapshot = self._snapshot.revision, snapshot  # one reference swap: atomic
                last_full = time.monotonic()
                self._on_snapshot(snapshot, previous, reloaded=True)
                self.last_sync_error = None
                log.info("class embeddings %s -> %s (%.2fs)", previous, snapshot.revision, snapshot.load_seconds)
            except Exception as exc:  # the graph may be down for a while: keep serving the last good snapshot
                self.last_sync_error = f"{type(exc).__name__}: {exc}"
                self.metrics.sync_errors.inc()
                log.warning("class-embedding sync failed (serving %s): %s", self._snapshot.revision, exc)

    def check_health(self) -> None:
        """Serve's health check: a dead sync thread is restarted (the replica itself is fine)."""
        if not self._sync_thread.is_alive() and not self._stop.is_set():
            log.warning("class-embedding sync thread had stopped; restarting it")
            self._start_sync_thread()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    # -- batching ------------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _image_batch(self, items: list[PreparedImage]) -> list[np.ndarray]:
        self.metrics.batch("image", len(items))
        return list(await asyncio.to_thread(image_features, self.model, self.device, items))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        self.metrics.batch("text", len(texts))
        return list(await asyncio.to_thread(text_features, self.model, texts))

    async def _encode_images(self, raw: list[RawImage], segment: bool | None, names: list[str] | None = None,
                             image_suffix: str = ".image") -> tuple[list[PreparedImage], np.ndarray]:
        """``raw`` decoded, checked and preprocessed (:meth:`_prepare`) off the event loop, and their full-size
        features, (len(raw), D): through the cross-request batcher, or in the same thread as the preprocessing."""
        if self.cfg.batching.enabled:
            prepared = await asyncio.to_thread(self._prepare, raw, segment, names, image_suffix)
            return prepared, np.stack(await asyncio.gather(*(self._image_batch(item) for item in prepared)))

        def prepare_and_encode() -> tuple[list[PreparedImage], np.ndarray]:
            prepared = self._prepare(raw, segment, names, image_suffix)
            return prepared, image_features(self.model, self.device, prepared)

        prepared, features = await asyncio.to_thread(prepare_and_encode)
        self.metrics.batch("image", len(prepared))
        return prepared, features

    async def _encode_texts(self, texts: list[str]) -> np.ndarray:
        if self.cfg.batching.enabled:
            return np.stack(await asyncio.gather(*(self._text_batch(text) for text in texts)))
        self.metrics.batch("text", len(texts))
        return await asyncio.to_thread(text_features, self.model, texts)

    # -- request helpers -----------------------------------------------------------------------------------------

    def _dim(self, dim: int | None, param: str = "dim") -> int:
        if dim is None:
            return self.full_dim
        if dim not in self.dims:
            raise BadRequest(f"unsupported {param} {dim}; this service serves {self.dims}", param=param,
                             code="unsupported_dim")
        return dim

    def _prepare(self, raw: list[RawImage], segment: bool | None, names: list[str] | None = None,
                 image_suffix: str = ".image") -> list[PreparedImage]:
        if segment and self.segmenter is None:
            raise BadRequest("segment=true, but this service has no segmenter configured", param="segment")
        use = segment is not False and self.segmenter is not None
        return prepare_all(raw, self.cfg.limits, self.transform, self.segmenter, self.segmenter_name, use, names,
                           image_suffix)

    async def _parse_classify(self, request: Request) -> tuple[ClassifyOptions, list[RawImage]]:
        limits = self.cfg.limits
        content_type = request.headers.get("content-type", "")
        body = await read_body(request, limits)
        if content_type.startswith("multipart/form-data"):
            return await self._parse_multipart(request)
        if not content_type.startswith("application/json"):
            raise BadRequest(f"unsupported content type {quoted(content_type)}: send application/json or "
                             "multipart/form-data")

        def parse() -> tuple[ClassifyOptions, list[RawImage]]:
            """JSON, its validation and the base64 decoding: up to max_request_bytes of work, off the loop."""
            data = parse_json(body)
            if isinstance(data, dict) and isinstance(data.get("images"), list) \
                    and len(data["images"]) > limits.max_images_per_request:
                raise BadRequest(f"too many images: {len(data['images'])} > {limits.max_images_per_request} per "
                                 "request", param="images", code="too_many_images")
            try:
                request_body = ClassifyRequest.model_validate(data)
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from exc
            cap = limits.max_image_bytes
            return ClassifyOptions.model_validate(request_body.model_dump(exclude={"images"})), [
                RawImage(image=decode_base64(item.image, f"images[{i}].image", cap),
                         mask=None if item.mask is None else decode_base64(item.mask, f"images[{i}].mask", cap),
                         box=item.box) for i, item in enumerate(request_body.images)]

        return await asyncio.to_thread(parse)

    async def _parse_multipart(self, request: Request) -> tuple[ClassifyOptions, list[RawImage]]:
        limits = self.cfg.limits
        form = await request.form(max_files=2 * limits.max_images_per_request + 1, max_fields=256)
        try:
            images, masks, boxes = form.getlist("image"), form.getlist("mask"), form.getlist("box")
            if not images:
                raise BadRequest("multipart request without an 'image' file", param="image")
            if len(images) > limits.max_images_per_request:
                raise BadRequest(f"too many images: {len(images)} > {limits.max_images_per_request} per request",
                                 param="image", code="too_many_images")
            for name, values in (("mask", masks), ("box", boxes)):
                if values and len(values) != len(images):
                    raise BadRequest(f"{len(values)} '{name}' parts for {len(images)} images: give one per image "
                                     "or none", param=name)
            if not all(isinstance(f, UploadFile) for f in (*images, *masks)):
                raise BadRequest("'image' and 'mask' parts must be files", param="image")
            for name in ("box", "labels", "class_set", "dim", "top_k", "segment"):
                if any(isinstance(v, UploadFile) for v in form.getlist(name)):
                    raise BadRequest(f"'{name}' must be a form field, not a file", param=name)
            raw = []
            for i, upload in enumerate(images):
                mask = masks[i] if masks else None
                raw.append(RawImage(image=await _read_upload(upload, f"images[{i}].image", limits.max_image_bytes),
                                    mask=None if mask is None else await _read_upload(mask, f"images[{i}].mask",
                                                                                      limits.max_image_bytes),
                                    box=_parse_box(boxes[i], i) if boxes else None))
            fields: dict[str, Any] = {k: form.get(k) for k in ("class_set", "dim", "top_k", "segment")
                                      if form.get(k) not in (None, "")}
            labels = [label.strip() for value in form.getlist("labels") for label in str(value).split(",")
                      if label.strip()]
            if labels:
                fields["labels"] = labels
            try:
                options = ClassifyOptions.model_validate(fields)
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from exc
            return options, raw
        finally:
            await form.close()

    async def _read_json(self, request: Request, schema: type[ModelT]) -> ModelT:
        """A JSON body (at most ``limits.max_request_bytes``, parsed off the event loop) validated by ``schema``;
        a schema error is the 400 FastAPI's own validation gives."""
        data = await asyncio.to_thread(parse_json, await read_body(request, self.cfg.limits))
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    def _snapshot_now(self) -> Snapshot:
        snapshot = getattr(self, "_snapshot", None)
        if snapshot is None:
            raise NotReady("class embeddings are not loaded yet", retry_after=self.cfg.gateway.retry_after_s)
        return snapshot

    async def _candidates(self, snapshot: Snapshot, options: ClassifyOptions
                          ) -> tuple[str | None, list[ClassInfo], VectorIndex]:
        """The classes to choose from and their index: a served class set, or explicit labels."""
        if options.labels and options.class_set:
            raise BadRequest("give class_set or labels, not both", param="labels")
        if options.labels:
            labels = list(dict.fromkeys(options.labels))
            limits = self.cfg.limits
            if len(labels) > limits.max_labels:
                raise BadRequest(f"too many labels: {len(labels)} > {limits.max_labels}", param="labels")
            longest = max(map(len, labels))
            if longest > limits.max_label_chars:
                raise BadRequest(f"a label of {longest} characters; labels are class keys of at most "
                                 f"{limits.max_label_chars}", param="labels")
            classes, vectors = await self._label_vectors(snapshot, labels)
            matrix = np.stack([vectors[c.key] for c in classes])
            return None, classes, await asyncio.to_thread(VectorIndex, matrix, [*self.dims])
        name = options.class_set or self.cfg.classes.default
        class_set = snapshot.class_sets.get(name)
        if class_set is None:
            raise NotFound(f"unknown class set {quoted(name)}; this service serves {sorted(snapshot.class_sets)}",
                           param="class_set", code="unknown_class_set")
        if not class_set.classes:
            raise NotFound(f"class set {quoted(name)} has no classes with embeddings", param="class_set")
        return name, class_set.classes, class_set.index

    async def _label_vectors(self, snapshot: Snapshot, labels: list[str]
                             ) -> tuple[list[ClassInfo], dict[str, np.ndarray]]:
        if self._extra_revision != snapshot.revision:
            self._extra, self._extra_revision = {}, snapshot.revision
        outside = [k for k in labels if k not in snapshot.vectors and k not in self._extra]
        if outside:
            classes, vectors = await asyncio.to_thread(self.sync.lookup, outside)
            if len(self._extra) > 10_000:
                self._extra = {}
            self._extra.update({c.key: (c, vectors[c.key]) for c in classes})
        infos, vectors = [], {}
        for key in labels:
            if key in snapshot.vectors:
                infos.append(snapshot.classes[key])
                vectors[key] = snapshot.vectors[key]
            else:
                info, vector = self._extra[key]
                infos.append(info)
                vectors[key] = vector
        return infos, vectors

    # -- the gateway's entry --------------------------------------------------------------------------------------

    async def forward(self, request: Forwarded) -> Answer:
        """One whole HTTP request from the gateway, run through the FastAPI app (``@serve.ingress`` makes this
        replica its ASGI callable), answered whole."""
        return await run_asgi(self, request)  # type: ignore[arg-type]

    # -- endpoints -----------------------------------------------------------------------------------------------

    @app.get("/healthz", summary="liveness: the replica answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: _ERRORS[503]},
             summary="readiness: model and class embeddings loaded")
    async def readyz(self) -> dict[str, Any]:
        snapshot = self._snapshot_now()
        return {"status": "ready", "model": self.bundle.name, "model_version": snapshot.model_version,
                "revision": snapshot.revision, "dims": self.dims,
                "classes": {name: len(s.classes) for name, s in snapshot.class_sets.items()},
                "snapshot_age_s": round(time.time() - snapshot.loaded_at, 3), "last_sync_error": self.last_sync_error,
                "collection": self._collection_status()}

    def _collection_status(self) -> dict[str, Any] | None:
        """What ``/readyz`` says of the retrieval collection (None when none is configured)."""
        if self.cfg.retrieval.collection is None:
            return None
        collection, failed = self._collection, self._collection_failed
        return {"revision": collection.revision if collection is not None else None,
                "items": len(collection.ids) if collection is not None else 0,
                "failed_revision": failed[0] if failed else None, "error": failed[1] if failed else None}

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=[Depends(authorize)],
             summary="the served model (OpenAI-compatible listing)")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card(model_id) for model_id in sorted(self.model_ids)]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS, dependencies=[Depends(authorize)],
             summary="one served model (OpenAI-compatible)")
    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.model_ids:
            raise NotFound(f"model {quoted(model_id)} is not served here; use one of {sorted(self.model_ids)}",
                           param="model", code="model_not_found")
        return self._model_card(model_id)

    def _model_card(self, model_id: str) -> dict[str, Any]:
        created = int(self.bundle.path.joinpath("bundle.json").stat().st_mtime)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ogclip"}

    @app.get("/v1/classes", response_model=ClassesResponse, responses=_ERRORS, dependencies=[Depends(authorize)],
             summary="served class sets; with ?class_set=NAME its members")
    async def classes(self, class_set: str | None = None) -> dict[str, Any]:
        snapshot = self._snapshot_now()
        if class_set is not None and class_set not in snapshot.class_sets:
            raise NotFound(f"unknown class set {quoted(class_set)}; this service serves {sorted(snapshot.class_sets)}",
                           param="class_set", code="unknown_class_set")
        sets = []
        for name, s in snapshot.class_sets.items():
            entry: dict[str, Any] = {"name": name, "classes": len(s.classes), "missing": s.missing}
            if name == class_set:
                entry["members"] = [{"key": c.key, "name": c.name, "super_category": c.super_category}
                                    for c in s.classes]
            sets.append(entry)
        return {"model_version": snapshot.model_version, "revision": snapshot.revision, "dims": self.dims,
                "default_class_set": self.cfg.classes.default, "class_sets": sets}

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_CLASSIFY_BODY,
              dependencies=[Depends(authorize)], summary="classify images (JSON with base64, or multipart files)")
    async def classify(self, request: Request) -> JSONResponse:
        with _guard("classify"):
            options, raw = await self._parse_classify(request)
            snapshot = self._snapshot_now()  # read once: the whole request uses one revision
            dim = self._dim(options.dim)
            if options.top_k > self.cfg.limits.max_top_k:
                raise BadRequest(f"top_k {options.top_k} is over the limit of {self.cfg.limits.max_top_k}",
                                 param="top_k")
            class_set, classes, index = await self._candidates(snapshot, options)
            prepared, features = await self._encode_images(raw, options.segment)
            similarities, rows = index.search(features, dim, len(classes))  # all candidates: softmax needs them
            probabilities = scores(similarities, self.logit_scale)
            top_k = min(options.top_k, len(classes))
            results = []
            for i, item in enumerate(prepared):
                labels = []
                for j in range(top_k):
                    info = classes[int(rows[i, j])]
                    labels.append({"label": info.key, "name": info.name, "super_category": info.super_category,
                                   "score": float(probabilities[i, j]), "similarity": float(similarities[i, j])})
                results.append({"index": i, "mask_source": item.mask_source, "labels": labels})
            # A Response skips FastAPI's re-validation of the body against response_model (which still documents
            # it): the body is built here from typed values, and the check costs every request.
            return JSONResponse({"model": self.bundle.name, "model_version": snapshot.model_version,
                                 "class_set": class_set, "class_set_revision": snapshot.revision, "dim": dim,
                                 "results": results})

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS, openapi_extra=_EMBEDDINGS_BODY,
              dependencies=[Depends(authorize)], summary="text or image embeddings (OpenAI embeddings API)")
    async def embeddings(self, request: Request) -> JSONResponse:
        with _guard("embeddings"):
            limits = self.cfg.limits
            body = await self._read_json(request, EmbeddingsRequest)
            if body.model not in self.model_ids:
                raise NotFound(f"model {quoted(body.model)} is not served here; use one of {sorted(self.model_ids)}",
                               param="model", code="model_not_found")
            dim = self._dim(body.dimensions, param="dimensions")
            inputs = [body.input] if isinstance(body.input, str) else list(body.input)
            if not inputs:
                raise BadRequest("input is empty", param="input")
            if not all(isinstance(item, str) for item in inputs):
                raise BadRequest("token arrays are not supported: send strings (text, or data:image/...;base64, "
                                 "URLs for images)", param="input")
            if len(inputs) > limits.max_texts_per_request:
                raise BadRequest(f"too many inputs: {len(inputs)} > {limits.max_texts_per_request}", param="input")
            images = [i for i, item in enumerate(inputs) if item.startswith(IMAGE_URL_PREFIX)]
            texts = [i for i, item in enumerate(inputs) if not item.startswith(IMAGE_URL_PREFIX)]
            if len(images) > limits.max_images_per_request:
                raise BadRequest(f"too many images: {len(images)} > {limits.max_images_per_request} per request",
                                 param="input", code="too_many_images")
            for i in texts:
                if not inputs[i].strip():
                    raise BadRequest(f"input[{i}] is empty", param="input")
                if len(inputs[i]) > limits.max_text_chars:
                    raise BadRequest(f"input[{i}] is {len(inputs[i])} characters; the limit is "
                                     f"{limits.max_text_chars}", param="input")
            features = np.zeros((len(inputs), self.full_dim), np.float32)
            if images:
                raw = await asyncio.to_thread(lambda: [RawImage(image=decode_base64(
                    inputs[i], f"input[{i}]", limits.max_image_bytes)) for i in images])
                _, features[images] = await self._encode_images(raw, False, [f"input[{i}]" for i in images], "")
            if texts:
                features[texts] = await self._encode_texts([inputs[i] for i in texts])
            vectors = normalise(features[:, :dim])
            tokens = await asyncio.to_thread(self._count_tokens, [inputs[i] for i in texts]) if texts else 0
            data_out = [{"object": "embedding", "index": i,
                         "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
                         if body.encoding_format == "base64" else vector.tolist()}
                        for i, vector in enumerate(vectors)]
            return JSONResponse({"object": "list", "data": data_out, "model": body.model,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_ERRORS, openapi_extra=_RETRIEVE_BODY,
              dependencies=[Depends(authorize)],
              summary="text → the collection's best images, or image → its best captions")
    async def retrieve(self, request: Request) -> JSONResponse:
        with _guard("retrieve"):
            limits = self.cfg.limits
            body = await self._read_json(request, RetrieveRequest)
            collection = self._collection  # read once: the whole request uses one revision
            if collection is None:
                raise NotFound("this service has no retrieval collection: build one with `ogclip index build` and "
                               "set retrieval.collection", code="no_collection")
            if (body.text is None) == (body.image is None):
                raise BadRequest("give exactly one of 'text' (to find images) or 'image' (to find captions)",
                                 param="text")
            if body.top_k > limits.max_top_k:
                raise BadRequest(f"top_k {body.top_k} is over the limit of {limits.max_top_k}", param="top_k")
            dim = self._dim(body.dim)
            if body.text is not None:
                if not body.text.strip():
                    raise BadRequest("text is empty", param="text")
                if len(body.text) > limits.max_text_chars:
                    raise BadRequest(f"text is {len(body.text)} characters; the limit is {limits.max_text_chars}",
                                     param="text")
                query, index, direction = await self._encode_texts([body.text]), collection.images, "text_to_image"
            else:
                item = body.image

                def decode() -> list[RawImage]:
                    cap = limits.max_image_bytes
                    return [RawImage(image=decode_base64(item.image, "image.image", cap),
                                     mask=None if item.mask is None else decode_base64(item.mask, "image.mask", cap),
                                     box=item.box)]

                _, query = await self._encode_images(await asyncio.to_thread(decode), None, ["image"], "")
                index, direction = collection.texts, "image_to_text"
            similarities, rows = await asyncio.to_thread(index.search, query, dim, body.top_k)
            results = [{"rank": rank + 1, "id": collection.ids[row], "label": collection.labels[row],
                        "caption": collection.captions[row], "similarity": float(similarity)}
                       for rank, (similarity, row) in enumerate(zip(similarities[0], rows[0], strict=True))
                       if row >= 0]
            return JSONResponse({"model_version": collection.model_version,
                                 "collection_revision": collection.revision, "direction": direction, "dim": dim,
                                 "items": len(collection.ids), "results": results})

    def _count_tokens(self, texts: list[str]) -> int:
        tokens = self.model.tokenize(texts)
        inner = getattr(self.model.tokenizer, "tokenizer", None)  # a Hugging Face tokenizer has its own pad id
        pad = getattr(inner, "pad_token_id", None) or 0
        return int((tokens != pad).sum())


# -- the application builder -------------------------------------------------------------------------------------

def config_from_args(args: Mapping[str, Any] | ServeConfig) -> ServeConfig:
    """A ServeConfig from builder args: a ServeConfig, ``{"config": PATH}`` (a YAML file), or the fields inline."""
    if isinstance(args, ServeConfig):
        return args
    if set(args) == {"config"}:
        return load_yaml_config(args["config"], ServeConfig)  # type: ignore[return-value]
    return ServeConfig.model_validate(dict(args))


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options of the classifier from the config (autoscaling, resources, admission
    control)."""
    d = cfg.deployment
    scaling = d.autoscaling
    return {
        "name": d.name,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "autoscaling_config": {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                               "initial_replicas": scaling.min_replicas,
                               "target_ongoing_requests": scaling.target_ongoing_requests,
                               "upscale_delay_s": scaling.upscale_delay_s,
                               "downscale_delay_s": scaling.downscale_delay_s},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s,
        "logging_config": {"enable_access_log": d.access_log},
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        # A replica that cannot start (no embeddings for the bundle, wrong token setup) will not start on the next
        # try either: fail the deployment after a few tries rather than retry for minutes.
        "max_constructor_retry_count": 3,
    }


def gateway_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options of the gateway (the ingress).

    It takes ``gateway.max_ongoing_requests`` at once, far more than the replicas can hold: a request costs it
    almost nothing until it is admitted (its body is read only then), so its own admission, not Serve's proxy,
    decides what is refused, quickly and in the service's error format; its own queue is the classifier's. Serve's
    proxy may hold as many again while it hands them over: its router counts every request not yet handed to a
    replica as queued, so a burst arriving at once would otherwise be refused there as plain-text 503s (a
    ``/readyz`` among them) while the gateway is idle.
    """
    d, g = cfg.deployment, cfg.gateway
    held = max(g.max_ongoing_requests, 2 * cfg.classifier_capacity)
    return {
        "name": f"{d.name}Gateway",
        "num_replicas": g.replicas,
        "ray_actor_options": {"num_cpus": g.num_cpus},
        "max_ongoing_requests": held,
        "max_queued_requests": held,
        "health_check_period_s": d.health_check_period_s,
        "logging_config": {"enable_access_log": d.access_log},
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "max_constructor_retry_count": 3,
    }


def build_app(args: Mapping[str, Any] | ServeConfig) -> Application:
    """The application builder (``import_path: ogclip_serve.app:build_app``): the gateway (ingress) bound to the
    classifier deployment, or with ``gateway.enabled`` false the classifier deployment alone as the ingress."""
    from ogclip_serve.gateway import OGClipGateway

    cfg = config_from_args(args)
    config = cfg.model_dump(mode="json")
    classifier = OGClipClassifier.options(**deployment_options(cfg)).bind(config)
    if not cfg.gateway.enabled:
        return classifier
    return OGClipGateway.options(**gateway_options(cfg)).bind(classifier, config)
