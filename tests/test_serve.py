"""The classification service end to end: a real Ray Serve app on 127.0.0.1, the real graph over Bolt (seeded), a
real og-clip-tiny bundle exported here, real HTTP (requests and the openai client).

One Serve app (a gateway and two classifier replicas) is shared by the module; the tests that disturb it
(overload, killed replicas) run last. Expected answers are computed in this process with the same model, so the
tests check the numbers, not only the shapes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hypothesis
import numpy as np
import pytest
import requests
import torch
import yaml
from hypothesis import strategies as st
from PIL import Image
from urllib3.filepost import encode_multipart_formdata

from ogclip.bundle import BundleInfo, BundleVersionError, export_bundle
from ogclip.config import PreprocessConfig, load_yaml_config
from ogclip.models import OGCLIP, create_model, truncate
from ogclip.segment import CpuSegmenter
from ogclip.settings import Settings, free_ports
from ogclip.synth import TargetClass, render
from ogclip.transforms import image_mask_transform
from ogclip.zeroshot import class_embeddings
from ogclip_jobs.data.images import png_bytes as png
from ogclip_kg import cypher
from ogclip_kg.prompts import fetch_class_facts, prompt_texts
from ogclip_kg.server import bolt_uri
from ogclip_kg.store import GraphStore
from ogclip_serve.config import (
    GatewayConfig,
    ServeAutoscalingConfig,
    ServeClassesConfig,
    ServeConfig,
    ServeDeploymentConfig,
    ServeLimitsConfig,
    ServeMaskConfig,
    ServeRetrievalConfig,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-" + "x" * 24
HOT_SET = "serve-hot"  # a class set of the tests' own, so the seeded train/test sets stay as they are
APP = "ogclip-test"


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[OGCLIP, BundleInfo]:
    torch.manual_seed(0)
    model = create_model("og-clip-tiny", device="cpu")
    # A fresh OG-CLIP ignores the mask (its ROI conv is zero-initialised: plug-and-play). Give the ROI branch
    # weights, as training would, so that a mask changes the embedding and the tests can see it reach the model.
    with torch.no_grad():
        model.visual.conv1.roi.weight.normal_(0.0, 0.05)
    info = export_bundle(model, tmp_path_factory.mktemp("serve") / "bundle")
    return model.eval(), info


def _embed(model: OGCLIP, rows: list[dict[str, Any]]) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Class embeddings exactly as the export step makes them."""
    prompts = {row["key"]: prompt_texts(row) for row in rows}
    vectors = class_embeddings(model, prompts)
    return {key: vector.tolist() for key, vector in zip(prompts, vectors, strict=True)}, prompts


@dataclass
class World:
    test_rows: dict[str, dict[str, Any]]  # the seeded unseen test classes, with their facts
    hot_rows: dict[str, dict[str, Any]]  # three train classes: one in the hot set from the start, two added later
    vectors: dict[str, np.ndarray]  # the test classes' embeddings as written to the graph


@pytest.fixture(scope="module")
def world(graph: GraphStore, bundle: tuple[OGCLIP, BundleInfo]) -> World:
    model, info = bundle
    test_keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="test")]
    test_rows = {r["key"]: r for r in fetch_class_facts(graph, test_keys)}
    vectors, prompts = _embed(model, list(test_rows.values()))
    graph.write_embeddings(info.model_version, vectors, prompts)
    train_keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="train")]
    hot_rows = {r["key"]: r for r in fetch_class_facts(graph, train_keys[100:103])}
    first = next(iter(hot_rows))
    graph.upsert("ClassSet", [{"key": HOT_SET, "props": {"size": 1}}])
    graph.link("Target", "IN_CLASS_SET", "ClassSet", [{"from": first, "to": HOT_SET, "props": {}}])
    yield World(test_rows, hot_rows, {k: np.asarray(v, np.float32) for k, v in vectors.items()})
    graph.write(cypher.DELETE_CLASS_SET, key=HOT_SET)
    graph.write(cypher.DELETE_EMBEDDINGS, model_version=info.model_version)


@dataclass
class Service:
    url: str
    cfg: ServeConfig
    metrics_port: int
    session: requests.Session

    def post(self, path: str, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.post(self.url + path, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.get(self.url + path, headers=headers, timeout=60, **kwargs)


def _graph_env(graph: GraphStore, kg_settings: Settings) -> dict[str, str]:
    """The environment that points a replica (a Ray worker, which inherits it) at the tests' graph."""
    if graph.uri == bolt_uri(kg_settings):
        return {"OGCLIP_HOME": str(kg_settings.home), "OGCLIP_KG_BOLT_PORT": str(kg_settings.kg_bolt_port),
                "OGCLIP_KG_HTTP_PORT": str(kg_settings.kg_http_port)}
    return {}


def write_test_collection(info: BundleInfo, rows: dict[str, dict[str, Any]], folder: Path, count: int,
                          seed: int = 0) -> list[str]:
    """A retrieval collection of ``count`` renders of ``rows``' classes, embedded exactly as ``ogclip index build``
    embeds (its encoder, in process); returns the item ids."""
    from ogclip.collection import write_collection
    from ogclip_jobs.index import EncodeForIndex

    encoder = EncodeForIndex(str(info.path))
    items = renders(rows, count, seed=seed)
    out = encoder({"id": np.asarray([f"item-{seed}-{i}" for i in range(count)], dtype=object),
                   "label": np.asarray([key for key, _, _ in items], dtype=object),
                   "caption": np.asarray([f"a picture of {rows[key]['name']}." for key, _, _ in items], dtype=object),
                   "image": [png(image) for _, image, _ in items], "mask": [png(mask) for _, _, mask in items]})
    write_collection(folder, info.model_version, list(out["id"]), list(out["label"]), list(out["caption"]),
                     out["image_vector"], out["caption_vector"])
    return list(out["id"])


def service_config(info: BundleInfo, port: int, **updates: Any) -> ServeConfig:
    cfg = ServeConfig(
        bundle=info.path, model_version=info.model_version, app_name=APP, host="127.0.0.1", port=port,
        deployment=ServeDeploymentConfig(num_cpus=0.25, autoscaling=ServeAutoscalingConfig(
            min_replicas=2, max_replicas=2), max_ongoing_requests=4, max_queued_requests=4),
        # Three 1000×1000 images are over the request's pixel budget; JPEGs are decoded at half size (their working
        # size is 256×256), so three of those are not.
        limits=ServeLimitsConfig(max_images_per_request=8, max_image_bytes=256 * 1024, max_pixels=1_000_000,
                             max_request_bytes=4 * 1024 * 1024, max_request_pixels=2_500_000, working_pixels=65_536),
        classes=ServeClassesConfig(class_sets=["test", HOT_SET], poll_interval_s=0.5),
        masks=ServeMaskConfig(segmenter="cpu"),
        retrieval=ServeRetrievalConfig(collection=info.path.parent / "collection", poll_interval_s=0.5),
        # The replicas' half of it is 2 s: these tests put four to forty requests at once on 0.25-CPU replicas.
        gateway=GatewayConfig(latency_budget_s=4.0),
    )
    return cfg.model_copy(update=updates)


@pytest.fixture(scope="module")
def service(graph: GraphStore, kg_settings: Settings, world: World, bundle: tuple[OGCLIP, BundleInfo]) -> Service:
    import ray
    from ray import serve

    from ogclip_serve.app import build_app

    _, info = bundle
    port, metrics_port = free_ports(2)
    cfg = service_config(info, port)
    write_test_collection(info, world.test_rows, cfg.retrieval.collection, 40)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**_graph_env(graph, kg_settings), "OGCLIP_API_TOKEN": TOKEN}.items():
            patch.setenv(key, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name=APP, route_prefix="/")
            with requests.Session() as session:
                yield Service(f"http://127.0.0.1:{port}", cfg, metrics_port, session)
        finally:
            serve.shutdown()
            ray.shutdown()


# -- helpers -------------------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def renders(rows: dict[str, dict[str, Any]], count: int, seed: int = 0) -> list[tuple[str, Image.Image, np.ndarray]]:
    """(class key, image, mask) for the first ``count`` classes of ``rows``."""
    out = []
    for i, (key, row) in enumerate(list(rows.items())[:count]):
        sample = render(TargetClass.from_facts(row), seed=seed + i, size=64)
        out.append((key, sample.image, sample.mask))
    return out


def expected_similarities(model: OGCLIP, info: BundleInfo, image: Image.Image, mask: np.ndarray | None,
                          vectors: dict[str, np.ndarray], dim: int) -> dict[str, float]:
    """Cosine similarity of an image to every class at ``dim``, computed here with the same weights."""
    image_t, mask_t = image_mask_transform(info.preprocess)(image, mask)
    with torch.no_grad():
        embedding = model.encode_image(image_t[None], mask_t[None], dim=dim)[0].numpy()
    keys = sorted(vectors)
    classes = truncate(torch.tensor(np.stack([vectors[k] for k in keys])), dim).numpy()
    return dict(zip(keys, (classes @ embedding).tolist(), strict=True))


def classify(service: Service, images: list[dict[str, Any]], **options: Any) -> requests.Response:
    return service.post("/v1/classify", json={"images": images, **options})


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def replica_names(service: Service) -> set[str]:
    """The Ray actor names of the classifier's replicas (the gateway's are not among them)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{service.cfg.deployment.name}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def assert_error_body(response: requests.Response) -> dict[str, Any]:
    """A 4xx/5xx answer is the service's JSON error object."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    return error


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width``×``height`` pixels, with a tiny compressed body (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# -- fast tests: no Serve app ----------------------------------------------------------------------------------------

def test_shipped_config_renders_a_valid_ray_serve_deploy_config(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from ogclip_serve.app import config_from_args, deployment_options, gateway_options
    from ogclip_serve.server import deploy_config

    cfg = load_yaml_config(ROOT / "infra/serve/demo.yaml", ServeConfig)
    rendered = deploy_config(cfg)
    schema = ServeDeploySchema.model_validate(rendered) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(rendered)
    app = schema.applications[0]
    assert app.import_path == "ogclip_serve.app:build_app"
    assert config_from_args(app.args) == cfg, "the rendered args rebuild the same config"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"config": "ignored"}))
    assert config_from_args({"config": str(ROOT / "infra/serve/demo.yaml")}) == cfg
    options = deployment_options(cfg)
    assert options["autoscaling_config"]["max_replicas"] == cfg.deployment.autoscaling.max_replicas
    assert options["max_queued_requests"] == cfg.deployment.max_queued_requests
    gateway = gateway_options(cfg)
    assert gateway["name"] != options["name"] and gateway["num_replicas"] == cfg.gateway.replicas
    assert gateway["max_ongoing_requests"] >= cfg.deployment.autoscaling.max_replicas * options["max_ongoing_requests"]
    assert gateway["max_queued_requests"] == gateway["max_ongoing_requests"], "a burst waits at the proxy, unrefused"
    assert cfg.limits.max_request_pixels >= cfg.limits.max_pixels, "one image of the largest size fits a request"
    with pytest.raises(ValueError, match="max_replicas"):
        ServeAutoscalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="replcas"):
        ServeConfig.model_validate({"deployment": {"autoscaling": {"min_replcas": 1}}})


def test_a_jpeg_of_more_segments_than_encoders_write_is_a_400_before_opening() -> None:
    from ogclip_serve.errors import BadRequest
    from ogclip_serve.inputs import open_header

    flooded = jpeg(Image.new("RGB", (8, 8)))
    flooded = flooded[:2] + b"\xff\xe1\x00\x02" * 2_000 + flooded[2:]  # 2,000 empty APP1 segments
    with pytest.raises(BadRequest, match="image: cannot decode image: a JPEG of more than 1000 segments"):
        open_header(flooded, "image", ServeLimitsConfig())


def test_decoded_pixels_are_counted_from_headers_and_bounded() -> None:
    """The pixel budget is counted from the headers (a JPEG at the scale it will be decoded at) before anything
    is decoded, and a decoded image is reduced to its working size, its box with it."""
    from ogclip_serve.errors import BadRequest, PayloadTooLarge
    from ogclip_serve.inputs import RawImage, open_request, prepare_all, working_size

    limits = ServeLimitsConfig(max_image_bytes=4 * 1024 * 1024, max_pixels=4_000_000, max_request_pixels=5_000_000,
                           working_pixels=512 * 512)
    photo = Image.new("RGB", (2000, 1500), (30, 80, 140))
    photo.paste((230, 200, 40), (800, 600, 1200, 900))
    as_png, as_jpeg = RawImage(image=png(photo)), RawImage(image=jpeg(photo))
    (opened,) = open_request([as_jpeg], limits)
    assert opened.size == (2000, 1500) and opened.work == working_size(2000, 1500, 512 * 512) == (591, 443)
    assert opened.image.size == (1000, 750), "a JPEG is decoded at half size: still at least its working size"
    for strip, work in (((1, 16_000_000), (1, 262_144)), ((16_000_000, 2), (262_144, 1)), ((2, 131_072), (2, 131_072))):
        assert working_size(*strip, 512 * 512) == work, "a strip keeps one pixel across, the budget along"
    (opened,) = open_request([as_png], limits)
    assert opened.image.size == (2000, 1500), "a PNG has no reduced decoding: counted at full size"
    open_request([as_jpeg] * 6, limits)  # 6 × 750,000 decoded pixels fit in 5,000,000
    with pytest.raises(PayloadTooLarge, match="decode to 6000000 pixels; the limit per request is 5000000"):
        open_request([as_png, as_png], limits)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):  # the formats served; others are refused
        buffer = io.BytesIO()
        photo.resize((800, 600)).save(buffer, format=fmt)  # uncompressed BMP and TIFF: under max_image_bytes
        (opened,) = open_request([RawImage(image=buffer.getvalue())], limits)
        assert opened.image.format == fmt and opened.work == (591, 443), fmt
    for data in (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b"not an image"):
        with pytest.raises(BadRequest, match="cannot decode image: not a PNG, JPEG, WEBP, GIF, BMP, TIFF image"):
            open_request([RawImage(image=data)], limits)
    transform = image_mask_transform(PreprocessConfig(image_size=32))
    (boxed,) = prepare_all([RawImage(image=png(photo), box=(800, 600, 1200, 900))], limits, transform, None, "none",
                           False)
    assert boxed.mask_source == "box" and boxed.image.shape == (3, 32, 32)
    # The centre crop of the reduced image sees the box where the full-size one would.
    full_mask = np.zeros((1500, 2000), np.float32)
    full_mask[600:900, 800:1200] = 1.0
    _, want = transform(photo, full_mask)
    assert float((boxed.mask - want).abs().mean()) < 0.05


def test_gateway_resends_only_idempotent_requests_and_only_for_a_lost_replica() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    from ogclip_serve.errors import Unavailable
    from ogclip_serve.gateway import idempotent, replica_lost
    from ogclip_serve.transport import error_response

    assert idempotent("POST", "/v1/classify") and idempotent("POST", "/api/v1/embeddings/")
    assert idempotent("POST", "/v1/retrieve")
    assert idempotent("GET", "/v1/classes") and idempotent("HEAD", "/readyz")
    assert not idempotent("POST", "/v1/nowhere") and not idempotent("DELETE", "/v1/classify")
    assert replica_lost(ActorDiedError()) and replica_lost(ActorUnavailableError("gone", None))
    assert not replica_lost(ValueError("a bug")) and not replica_lost(BackPressureError(4, 4))
    response = error_response(Unavailable("try later", retry_after=3, code="replica_lost"))
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert json.loads(response.body)["error"] == {"message": "try later", "type": "server_error", "param": None,
                                                  "code": "replica_lost"}


def test_an_error_message_quotes_at_most_a_hundred_characters_of_a_value() -> None:
    from ogclip_serve.errors import NotFound, quoted

    assert quoted("no-such-set") == "'no-such-set'"
    assert quoted("x" * 100) == repr("x" * 100)
    assert quoted("y" * 4_000_000) == repr("y" * 100) + "… (4000000 characters)"
    assert quoted("\ud800" * 150).startswith("'\\ud800")  # repr escapes a lone surrogate: the message encodes
    assert len(NotFound(f"unknown class set {quoted('z' * 10**6)}").body()["error"]["message"]) < 200


def test_a_request_body_that_stops_arriving_is_a_408_at_its_time_limit() -> None:
    from starlette.requests import Request

    from ogclip_serve.errors import RequestTimeout
    from ogclip_serve.transport import read_body

    limits = ServeLimitsConfig(body_timeout_s=0.2)

    def request(*parts: bytes, stalls: bool) -> Request:
        messages = [{"type": "http.request", "body": part, "more_body": True} for part in parts]
        messages[-1]["more_body"] = stalls

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # the client sent part of the body, then nothing
            raise AssertionError("the body's time limit did not act")

        return Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}, receive)

    assert asyncio.run(read_body(request(b"ab", b"cd", stalls=False), limits)) == b"abcd"
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"did not arrive within 0.2 s \(2 bytes came\)"):
        asyncio.run(read_body(request(b"ab", stalls=True), limits))
    assert time.monotonic() - started < 2


def test_a_replica_not_ready_yet_says_when_to_ask_again() -> None:
    from ogclip_serve.errors import NotReady
    from ogclip_serve.transport import error_response

    for error, wait in ((NotReady("the replica is starting"), "1"), (NotReady("loading", retry_after=4), "4")):
        response = error_response(error)
        assert response.status_code == 503 and response.headers["retry-after"] == wait
        assert json.loads(response.body)["error"]["code"] == "not_ready"


def test_a_request_past_its_deadline_is_refused_before_any_work() -> None:
    # The replica's app, called as the gateway calls it: the admission check answers before any route runs.
    from ogclip_serve import app as service_app
    from ogclip_serve.app import _STATE, Admission, _register
    from ogclip_serve.transport import DEADLINE_KEY, Forwarded, run_asgi

    admission = Admission(retry_after_s=3, budget_s=1.0)
    assert admission.refusal(None) is None and admission.refusal(time.time() + 5) is None
    admission.served(2.0)  # requests take 0.2 s now (a moving average)
    assert admission.expected_s == pytest.approx(0.2)
    assert admission.refusal(time.time() + 0.1) is not None and admission.refusal(time.time() + 1.0) is None
    for _ in range(30):  # requests that take longer than the whole budget: none could be in time, so none is
        admission.served(1.5)  # refused, and the average goes on learning from what is served
    assert admission.expected_s > 1.0 and admission.refusal(time.time() + 0.1) is None
    for _ in range(60):
        admission.served(0.1)
    assert admission.expected_s < 0.2 and admission.refusal(time.time() + 0.1) is not None
    assert Admission(retry_after_s=3, budget_s=None).refusal(time.time() - 1) is None

    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["deadline"] = scope[DEADLINE_KEY]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "raw_path": b"/v1/classify",
             "root_path": "", "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http"}
    assert asyncio.run(run_asgi(app, Forwarded(scope=scope, body=b"{}", deadline=12.5))).status == 204
    assert seen["deadline"] == 12.5  # the deadline reaches the app in its scope

    previous = (_STATE.auth, _STATE.metrics, _STATE.admission)
    _register(None, None, Admission(retry_after_s=3, budget_s=1.0))  # type: ignore[arg-type]
    try:
        late = asyncio.run(run_asgi(service_app.app, Forwarded(scope=scope, body=b"{}", deadline=time.time() - 1)))
    finally:
        _register(*previous)  # type: ignore[arg-type]
    assert late.status == 503 and dict(late.headers)[b"retry-after"] == b"3"
    assert json.loads(late.body)["error"]["code"] == "overloaded"


def test_the_gateway_admits_what_the_replicas_answer_within_the_budget() -> None:
    from ogclip_serve.gateway import ConcurrencyLimit

    assert GatewayConfig(latency_budget_s=2.0).replica_budget_s == 1.0  # the other half is the HTTP proxy's
    assert GatewayConfig(latency_budget_s=None).replica_budget_s is None
    now = [0.0]
    limit = ConcurrencyLimit(target_s=1.0, ceiling=80, start=16, clock=lambda: now[0])
    assert limit.admits(15) and not limit.admits(16), "it starts at what the replicas work on, not what they queue"
    assert ConcurrencyLimit(target_s=1.0, ceiling=8, start=16).limit == 8.0
    now[0] = 10.0
    for _ in range(30):  # 30 late answers to requests sent together: one round trip, one cut
        limit.answered(1.5)
    assert limit.limit == pytest.approx(14.4)
    now[0] += 0.5
    limit.answered(1.5)  # sent before that cut: it reports the same queue
    assert limit.limit == pytest.approx(14.4)
    for _ in range(40):  # late answers to requests sent after each cut: a tenth off each time, down to one
        now[0] += 2.0
        limit.answered(1.5)
    assert limit.limit == 1.0 and limit.admits(0) and not limit.admits(1)
    for _ in range(10):  # on-time answers: one more request per round trip (one over the limit per answer)
        limit.answered(0.05)
    assert 4.0 < limit.limit < 5.0
    for _ in range(10_000):
        limit.answered(0.05)
    assert limit.limit == 80.0, "never above what the replicas can hold"
    unbounded = ConcurrencyLimit(target_s=None, ceiling=80, start=16)
    unbounded.answered(60.0)
    assert unbounded.limit == 80.0 and unbounded.target_s is None  # no budget: no deadline, nothing adapts

    # A refusal's Retry-After: the time the replicas need to answer what they hold, at their recent rate.
    now = [0.0]
    paced = ConcurrencyLimit(target_s=1.0, ceiling=80, window_s=10.0, clock=lambda: now[0])
    assert paced.retry_after(60, least=1, most=30) == 1  # no answers yet: the rate is unknown
    for _ in range(40):  # 4 answers a second
        now[0] += 0.25
        paced.answered(0.5)
    assert paced.retry_after(60, least=1, most=30) == 15  # 60 held / 4.1 a second (40 answers in 9.75 s)
    assert paced.retry_after(2, least=1, most=30) == 1 and paced.retry_after(600, least=1, most=30) == 30
    now[0] += 60.0  # a quiet minute: the old answers say nothing about now
    assert paced.retry_after(60, least=1, most=30) == 1


def test_the_gateway_health_check_keeps_its_readiness_answer_fresh(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway's own class, driven as Serve drives it (check_health, then /readyz), in front of a stand-in for
    # the classifier's deployment handle that answers /readyz the way a replica would, or not at all.
    from ogclip_serve.gateway import OGClipGateway
    from ogclip_serve.transport import Answer

    answers: list[Any] = []

    class Replicas:
        class forward:  # noqa: N801 - the handle's method name
            @staticmethod
            async def remote(request: Any) -> Answer:
                assert request.scope["path"] == "/readyz" and request.scope["method"] == "GET"
                answer = answers.pop(0)
                if isinstance(answer, float):
                    await asyncio.sleep(answer)  # a replica too busy to answer
                    raise AssertionError("a readiness probe waited past its time")
                return answer

    ready = Answer(200, [(b"content-type", b"application/json")], b'{"status": "ready"}')
    unready = Answer(503, [(b"content-type", b"application/json")], b'{"error": {"code": "no_classes"}}')
    monkeypatch.setenv("OGCLIP_API_TOKEN", TOKEN)
    config = ServeConfig(bundle=tmp_path, model_version="v", gateway={"busy_ready_s": 0.2, "ready_timeout_s": 0.1})
    gateway = OGClipGateway.func_or_class(Replicas(), config.model_dump(mode="json"))
    assert gateway._ready is None  # nobody asked /readyz yet

    async def probe(*queued: Any) -> None:
        answers.extend(queued)
        await gateway.check_health()  # never raises: the gateway is healthy whatever its replicas say

    asyncio.run(probe(ready))
    assert gateway._ready is ready  # primed before any client asked
    asyncio.run(probe(5.0))
    assert gateway._ready is ready  # a busy replica: the last answer stands
    asyncio.run(probe(unready))
    assert gateway._ready is None  # a replica that says it cannot serve is believed


def test_auth_policy_needs_a_token_outside_local_mode() -> None:
    from ogclip_serve.auth import AuthPolicy
    from ogclip_serve.errors import Unauthorized

    with pytest.raises(RuntimeError, match="OGCLIP_API_TOKEN"):
        AuthPolicy.from_settings(Settings(api_token=None, local_mode=False), "127.0.0.1")
    with pytest.raises(RuntimeError, match="loopback"):
        AuthPolicy.from_settings(Settings(api_token=None, local_mode=True), "0.0.0.0")
    assert not AuthPolicy.from_settings(Settings(api_token=None, local_mode=True), "127.0.0.1").required
    policy = AuthPolicy.from_settings(Settings(api_token="s3cret-token"), "0.0.0.0")
    policy.check("Bearer s3cret-token")
    for header in (None, "", "Basic s3cret-token", "Bearer wrong"):
        with pytest.raises(Unauthorized):
            policy.check(header)


def test_cli_serve_status_and_refusals(tmp_path: Path) -> None:
    env = {**os.environ, "OGCLIP_HOME": str(tmp_path)}
    status = subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "serve", "status"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "stopped" in status.stdout
    state = subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "serve", "status", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert json.loads(state.stdout) == {"running": False, "pid": None, "url": None, "ready": False}
    missing = tmp_path / "serve.yaml"
    missing.write_text(f"bundle: {tmp_path / 'no-bundle'}\n")
    up = subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "serve", "up", "--config", str(missing)], env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 2 and "does not exist" in up.stderr
    # Without --config, the built-in defaults: the demo's bundle under ./outputs/demo, from any directory.
    default = subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "serve", "up"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert default.returncode == 2 and "outputs/demo/train/og-clip-tiny-demo/bundle" in default.stderr, default.stderr
    assert "Traceback" not in default.stderr


@pytest.mark.slow
def test_cli_serve_up_status_down(graph: GraphStore, kg_settings: Settings, world: World,
                                  bundle: tuple[OGCLIP, BundleInfo], tmp_path: Path) -> None:
    """`ogclip serve up` starts the service in the background with a generated token and returns once it is ready;
    `status` reports it; `down` stops it, and the port is free again."""
    _, info = bundle
    port, metrics_port = free_ports(2)
    cfg = service_config(info, port, metrics_port=metrics_port, ray_num_cpus=1)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OGCLIP_API_TOKEN")}
    env.update({"OGCLIP_HOME": str(tmp_path / "home"), **_graph_env(graph, kg_settings)})
    home = Path(env["OGCLIP_HOME"])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "serve", *args], env=env,
                              capture_output=True, text=True, timeout=600)

    up = cli("up", "--config", str(config))
    try:
        assert up.returncode == 0, up.stderr
        token_file = home / "serve" / "token"
        assert f"up at http://127.0.0.1:{port}/" in up.stdout and info.model_version in up.stdout
        assert f"token in {token_file}" in up.stdout and token_file.stat().st_mode & 0o077 == 0
        again = cli("up", "--config", str(config))
        assert again.returncode == 2 and "already running" in again.stderr
        status = cli("status")
        assert status.returncode == 0 and "running" in status.stdout and info.model_version in status.stdout
        state = json.loads(cli("status", "--json").stdout)
        assert state["running"] and state["ready"] and state["readyz"]["model_version"] == info.model_version
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        (_, image, _), = renders(world.test_rows, 1)
        response = requests.post(f"http://127.0.0.1:{port}/v1/classify", headers=headers, timeout=60,
                                 json={"images": [{"image": b64(png(image))}], "class_set": "test", "top_k": 1})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["labels"][0]["label"] in world.test_rows
    finally:
        down = cli("down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert "stopped" in cli("status").stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)


def test_version_mismatch_is_refused_loudly(graph: GraphStore, kg_settings: Settings, world: World,
                                            bundle: tuple[OGCLIP, BundleInfo], tmp_path: Path) -> None:
    from ogclip_serve.errors import EmbeddingVersionError
    from ogclip_serve.server import preflight

    _, info = bundle
    settings = kg_settings if graph.uri == bolt_uri(kg_settings) else Settings()
    assert preflight(service_config(info, 8000), settings)["model_version"] == info.model_version
    with pytest.raises(BundleVersionError, match="expected ogc-0000"):
        preflight(service_config(info, 8000, model_version="ogc-0000"), settings)
    torch.manual_seed(1)
    other = export_bundle(create_model("og-clip-tiny", device="cpu"), tmp_path / "other")
    with pytest.raises(EmbeddingVersionError, match=f"no class embeddings for the bundle's model_version "
                                                    f"{other.model_version}.*{info.model_version}"):
        preflight(service_config(other, 8000, model_version=None), settings)


# -- the running service -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_openapi_health_readiness_and_auth(service: Service, bundle: tuple[OGCLIP, BundleInfo]) -> None:
    _, info = bundle
    spec = service.get("/openapi.json", token=None).json()
    assert {"/v1/classify", "/v1/embeddings", "/v1/retrieve", "/v1/classes", "/healthz", "/readyz"} <= set(
        spec["paths"])
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "ClassifyRequest" in spec["components"]["schemas"] and "HTTPBearer" in str(spec["components"])
    assert service.get("/healthz", token=None).json() == {"status": "ok"}
    ready = service.get("/readyz", token=None).json()
    assert ready["model_version"] == info.model_version and ready["classes"]["test"] == 99
    assert ready["classes"][HOT_SET] == 1, "the hot set's first class had no embedding: embedded at start"
    for token in (None, "wrong-token"):
        response = service.get("/v1/classes", token=token)
        assert response.status_code == 401 and "bearer token" in response.json()["error"]["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    # Outside /v1 no path takes a body, and none asks for the token: a body is refused before it is read (32 MB
    # posts to such paths used to be buffered whole by the gateway and sent on to a replica).
    for path in ("/no-such-path", "/readyz", "/healthz", "/docs"):
        response = service.session.post(service.url + path, data=b"x" * 200_000, timeout=30)
        assert response.status_code == 413, (path, response.text[:200])
        assert assert_error_body(response)["code"] == "body_not_accepted", path
    assert service.get("/readyz", token=None).status_code == 200
    classes = service.get("/v1/classes", params={"class_set": "test"}).json()
    assert classes["model_version"] == info.model_version and classes["revision"] == ready["revision"]
    members = next(s for s in classes["class_sets"] if s["name"] == "test")["members"]
    assert len(members) == 99 and {m["super_category"] for m in members} == {"military aircraft", "warship",
                                                                            "civilian/other"}


@pytest.mark.slow
def test_classify_with_and_without_mask_at_every_dim(service: Service, world: World,
                                                     bundle: tuple[OGCLIP, BundleInfo]) -> None:
    model, info = bundle
    samples = renders(world.test_rows, 3)
    with_mask = [{"image": b64(png(image)), "mask": b64(png(mask))} for _, image, mask in samples]
    without = [{"image": b64(png(image))} for _, image, _ in samples]
    revision = service.get("/readyz").json()["revision"]
    for dim in model.dims:
        answers = {}
        for name, images, segment in (("mask", with_mask, None), ("none", without, False)):
            response = classify(service, images, class_set="test", dim=dim, top_k=5, segment=segment)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == info.model_version and body["class_set_revision"] == revision
            assert body["dim"] == dim and body["class_set"] == "test" and len(body["results"]) == 3
            answers[name] = body
            for (_, image, mask), result in zip(samples, body["results"], strict=True):
                assert result["mask_source"] == name
                labels = result["labels"]
                assert len(labels) == 5 and all(label["label"] in world.test_rows for label in labels)
                assert [label["score"] for label in labels] == sorted((label["score"] for label in labels),
                                                                      reverse=True)
                assert all(label["super_category"] == world.test_rows[label["label"]]["super_category"]
                           for label in labels)
                expected = expected_similarities(model, info, image, mask if name == "mask" else None,
                                                 world.vectors, dim)
                best = max(expected.values())  # classes of one look tie exactly: any of them may come first
                assert expected[labels[0]["label"]] == pytest.approx(best, abs=1e-5)
                for label in labels:
                    assert label["similarity"] == pytest.approx(expected[label["label"]], abs=1e-4)
        # The mask reaches the ROI channel: the same images score differently with it.
        sims = [[label["similarity"] for label in r["labels"]] for r in answers["mask"]["results"]]
        assert sims != [[label["similarity"] for label in r["labels"]] for r in answers["none"]["results"]]


@pytest.mark.slow
def test_without_the_gateway_the_replicas_are_the_ingress(service: Service, world: World) -> None:
    """``gateway.enabled: false`` serves the same API from the classifier replicas themselves (one hop less): the
    same answers, and the replicas' own auth, size limit and error format."""
    from ray import serve

    from ogclip_serve.app import build_app

    cfg = service.cfg.model_copy(update={
        "app_name": "direct", "gateway": service.cfg.gateway.model_copy(update={"enabled": False}),
        "deployment": service.cfg.deployment.model_copy(update={
            "name": "direct", "autoscaling": ServeAutoscalingConfig(min_replicas=1, max_replicas=1)})})
    serve.run(build_app(cfg), name="direct", route_prefix="/direct")
    try:
        assert set(serve.status().applications["direct"].deployments) == {"direct"}, "no gateway deployment"
        direct = Service(service.url + "/direct", cfg, service.metrics_port, service.session)
        images = [{"image": b64(png(image)), "mask": b64(png(mask))} for _, image, mask in renders(world.test_rows, 2)]
        answers = [classify(s, images, class_set="test", top_k=3) for s in (service, direct)]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        assert answers[1].json()["results"] == answers[0].json()["results"]
        assert direct.get("/healthz", token=None).json() == {"status": "ok"}
        refused = direct.post("/v1/classify", token="wrong-token", json={"images": images})
        assert refused.status_code == 401 and assert_error_body(refused)
        too_big = direct.session.post(direct.url + "/v1/classify", data=b"x" * (cfg.limits.max_request_bytes + 1),
                                      headers={"Authorization": f"Bearer {TOKEN}",
                                               "Content-Type": "application/json"}, timeout=60)
        assert too_big.status_code == 413 and assert_error_body(too_big)
    finally:
        serve.delete("direct")


@pytest.mark.slow
def test_classify_multipart_boxes_segmenter_and_labels(service: Service, world: World,
                                                       bundle: tuple[OGCLIP, BundleInfo]) -> None:
    model, info = bundle
    (key, image, mask), (_, image2, _) = renders(world.test_rows, 2, seed=7)
    files = [("image", ("a.png", png(image), "image/png")), ("image", ("b.png", png(image2), "image/png")),
             ("mask", ("a-mask.png", png(mask), "image/png")), ("mask", ("b-mask.png", png(mask), "image/png"))]
    response = service.post("/v1/classify", files=files, data={"class_set": "test", "dim": "32", "top_k": "3"})
    assert response.status_code == 200, response.text
    first = response.json()["results"][0]
    assert first["mask_source"] == "mask" and len(first["labels"]) == 3
    expected = expected_similarities(model, info, image, mask, world.vectors, 32)
    assert first["labels"][0]["similarity"] == pytest.approx(max(expected.values()), abs=1e-4)

    # A box without a segmenter: the box is the ROI. With the segmenter: what it finds inside the box.
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    plain = classify(service, [{"image": b64(png(image)), "box": box}], segment=False).json()["results"][0]
    assert plain["mask_source"] == "box"
    box_mask = np.zeros_like(mask)
    box_mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 255
    expected = expected_similarities(model, info, image, box_mask, world.vectors, model.dims[-1])
    assert plain["labels"][0]["similarity"] == pytest.approx(max(expected.values()), abs=1e-4)
    segmented = classify(service, [{"image": b64(png(image)), "box": box}]).json()["results"][0]
    assert segmented["mask_source"] == "cpu"
    found = (CpuSegmenter().segment(image, box) * 255).astype(np.uint8)
    expected = expected_similarities(model, info, image, found, world.vectors, model.dims[-1])
    assert segmented["labels"][0]["similarity"] == pytest.approx(max(expected.values()), abs=1e-4)
    assert classify(service, [{"image": b64(png(image))}]).json()["results"][0]["mask_source"] == "cpu"

    # Explicit candidate labels, inside and outside the served sets (the latter embedded on demand).
    outside = list(world.hot_rows)[2]
    labels = [key, *list(world.test_rows)[10:12], outside]
    body = classify(service, [{"image": b64(png(image)), "mask": b64(png(mask))}], labels=labels, top_k=10).json()
    assert body["class_set"] is None and sorted(r["label"] for r in body["results"][0]["labels"]) == sorted(labels)
    assert sum(r["score"] for r in body["results"][0]["labels"]) == pytest.approx(1.0, abs=1e-4)
    unknown = classify(service, [{"image": b64(png(image))}], labels=["no-such-class"])
    assert unknown.status_code == 404 and "no-such-class" in unknown.json()["error"]["message"]


@pytest.mark.slow
def test_embeddings_through_the_openai_client(service: Service, world: World,
                                              bundle: tuple[OGCLIP, BundleInfo]) -> None:
    import openai

    model, info = bundle
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=TOKEN, max_retries=0)
    texts = ["a photo of a fighter jet", "a destroyer at sea"]
    (_, image, _), = renders(world.test_rows, 1, seed=3)
    image_url = "data:image/png;base64," + b64(png(image))
    image_t, mask_t = image_mask_transform(info.preprocess)(image, None)
    for dim in model.dims:
        # The client asks for base64 by default and decodes it itself; asked for explicitly, it is left to us.
        for encoding in (openai.NOT_GIVEN, "float", "base64"):
            result = client.embeddings.create(model="og-clip-tiny", input=[*texts, image_url], dimensions=dim,
                                              encoding_format=encoding)
            got = np.array([np.frombuffer(base64.b64decode(item.embedding), "<f4") if encoding == "base64"
                            else item.embedding for item in result.data])
            assert got.shape == (3, dim) and result.model == "og-clip-tiny"
            with torch.no_grad():
                want = torch.cat([model.encode_text(texts, dim=dim),
                                  model.encode_image(image_t[None], mask_t[None], dim=dim)]).numpy()
            np.testing.assert_allclose(got, want, atol=1e-4)
    default = client.embeddings.create(model=info.model_version, input="a cargo ship")
    assert len(default.data[0].embedding) == model.dims[-1] and default.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="unsupported dimensions 100"):
        client.embeddings.create(model="og-clip-tiny", input="x", dimensions=100)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="og-clip-tiny", input="x")
    assert refused.value.body["type"] == "invalid_request_error" and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="input"):  # a schema error is a 400, as OpenAI answers it
        client.embeddings.create(model="og-clip-tiny", input=[{"not": "text"}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="token arrays are not supported"):
        client.embeddings.create(model="og-clip-tiny", input=[[101, 2023]])
    assert {card.id for card in client.models.list()} == {"og-clip-tiny", info.model_version}
    assert client.models.retrieve(info.model_version).id == info.model_version
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4o")


@pytest.mark.slow
def test_retrieve_text_to_images_and_image_to_captions(service: Service, world: World,
                                                       bundle: tuple[OGCLIP, BundleInfo]) -> None:
    """/v1/retrieve ranks the collection as the model does in process, both ways, at every served size."""
    from ogclip.collection import read_collection

    model, info = bundle
    collection = read_collection(service.cfg.retrieval.collection, info.model_version)
    text = "a large grey warship with a destroyer hull silhouette"
    with torch.no_grad():
        query = model.encode_text([text]).numpy()[0]
    for dim in (None, 32):
        response = service.post("/v1/retrieve", json={"text": text, "top_k": 5, "dim": dim})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["direction"] == "text_to_image" and body["items"] == len(collection) == 40
        assert body["collection_revision"] == collection.revision and body["model_version"] == info.model_version
        size = dim or model.dims[-1]
        images = truncate(torch.from_numpy(collection.images), size).numpy()
        expected = np.argsort(-(images @ truncate(torch.from_numpy(query[None]), size).numpy()[0]))[:5]
        assert [r["id"] for r in body["results"]] == [collection.ids[i] for i in expected]
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
        similarities = [r["similarity"] for r in body["results"]]
        assert similarities == sorted(similarities, reverse=True) and body["dim"] == size
    key, image, mask = renders(world.test_rows, 1, seed=3)[0]
    response = service.post("/v1/retrieve", json={"image": {"image": b64(png(image)), "mask": b64(png(mask))},
                                                  "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["direction"] == "image_to_text" and len(body["results"]) == 3
    assert all(r["caption"].startswith("a picture of ") for r in body["results"])
    for payload, status, param in (({"text": "x", "image": {"image": b64(png(image))}}, 400, "text"), ({}, 400, "text"),
                                   ({"text": "  "}, 400, "text"), ({"text": "x", "top_k": 10_000}, 400, "top_k"),
                                   ({"text": "x", "dim": 33}, 400, "dim"), ({"text": "x" * 5000}, 400, "text"),
                                   ({"image": {"image": "not base64!"}}, 400, None),
                                   ({"text": "x", "top_k": 0}, 400, None), ({"text": "x", "k": 5}, 400, None)):
        response = service.post("/v1/retrieve", json=payload)
        assert response.status_code == status, (payload, response.text)
        error = assert_error_body(response)
        assert param is None or error["param"] == param, (payload, error)
    assert service.post("/v1/retrieve", token=None, json={"text": "x"}).status_code == 401


@pytest.mark.slow
def test_a_new_collection_revision_is_swapped_in_while_serving(service: Service, world: World,
                                                               bundle: tuple[OGCLIP, BundleInfo]) -> None:
    """`ogclip index build` writing a new revision reaches every replica within a few polls; no request fails."""
    from ogclip.collection import current_revision

    _, info = bundle
    folder = service.cfg.retrieval.collection
    before = current_revision(folder)
    ids = write_test_collection(info, world.test_rows, folder, 25, seed=100)
    after = current_revision(folder)
    assert after != before
    served: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and served[-6:] != [after] * 6:  # both replicas, several times in a row
        response = service.post("/v1/retrieve", json={"text": "a ship", "top_k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        served.append(body["collection_revision"])
        assert body["collection_revision"] in (before, after)
        if body["collection_revision"] == after:
            assert body["items"] == 25 and all(r["id"] in ids for r in body["results"])
        time.sleep(0.1)
    assert served[-6:] == [after] * 6, f"revision {after} was not served by every replica within 30 s"

    # A damaged revision (its image embeddings unreadable) named by CURRENT: every replica keeps serving `after`,
    # and readiness names the revision that failed and why; CURRENT back on `after` clears it.
    from ogclip.collection import CURRENT

    def point(revision: str) -> None:
        (folder / ".pointer").write_text(revision + "\n")
        os.replace(folder / ".pointer", folder / CURRENT)

    damaged = "col-damaged000000000"
    shutil.copytree(folder / after, folder / damaged)
    (folder / damaged / "images.npy").write_bytes(b"damaged")
    point(damaged)
    reports: list[dict[str, Any] | None] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(reports) >= 6 and all(
            r is not None and r["failed_revision"] == damaged for r in reports[-6:])):
        response = service.post("/v1/retrieve", json={"text": "a ship", "top_k": 3})
        assert response.status_code == 200 and response.json()["collection_revision"] == after, response.text
        reports.append(service.get("/readyz").json().get("collection"))
        time.sleep(0.1)
    assert all(r["failed_revision"] == damaged and r["revision"] == after and r["items"] == 25
               and "cannot be read" in r["error"] for r in reports[-6:]), reports[-6:]
    point(after)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(r["failed_revision"] for r in reports[-6:]):
        reports.append(service.get("/readyz").json()["collection"])
        time.sleep(0.1)
    assert [r["failed_revision"] for r in reports[-6:]] == [None] * 6 and reports[-1]["revision"] == after
    shutil.rmtree(folder / damaged)


def test_every_bad_input_is_a_clear_4xx_and_the_replicas_survive(service: Service, world: World) -> None:
    (_, image, mask), = renders(world.test_rows, 1)
    good = b64(png(image))
    huge = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("undecodable", {"images": [{"image": b64(b"this is not an image")}]}, 400, "cannot decode"),
        ("truncated", {"images": [{"image": b64(png(image)[:60])}]}, 400, "cannot decode"),
        ("not base64", {"images": [{"image": "%%%not-base64%%%"}]}, 400, "not valid base64"),
        ("oversized bytes", {"images": [{"image": b64(png(huge))}]}, 413, "limit"),
        ("decompression bomb", {"images": [{"image": b64(bomb_png(20_000, 20_000))}]}, 413, "pixels"),
        ("mask size", {"images": [{"image": good, "mask": b64(png(mask[:32, :32]))}]}, 400, "32×32"),
        ("mask and box", {"images": [{"image": good, "mask": b64(png(mask)), "box": [0, 0, 5, 5]}]}, 400, "not both"),
        ("box outside", {"images": [{"image": good, "box": [100, 100, 120, 120]}]}, 400, "does not cover"),
        ("unknown class set", {"images": [{"image": good}], "class_set": "no-such-set"}, 404, "unknown class set"),
        ("unsupported dim", {"images": [{"image": good}], "dim": 100}, 400, "unsupported dim 100"),
        ("too many images", {"images": [{"image": good}] * 9}, 400, "too many images: 9 > 8"),
        ("top_k", {"images": [{"image": good}], "top_k": 1000}, 400, "top_k"),
        ("unknown field", {"images": [{"image": good}], "colour": "red"}, 400, "colour"),
        ("no images", {"images": []}, 400, "images"),
        ("labels and set", {"images": [{"image": good}], "labels": ["x"], "class_set": "test"}, 400, "not both"),
        # a label is a class key: one over 16 MiB made the replica's graph lookup wait for good (the server drops
        # a Bolt message that large without an answer), and five such requests wedged the replica
        ("label too long", {"images": [{"image": good}], "labels": ["x", "w" * 257]}, 400, "a label of 257 characters"),
    ]
    for name, payload, status, message in cases:
        response = service.post("/v1/classify", json=payload)
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["error"]["message"], (name, response.text)
    # What an error quotes of the request is cut to 100 characters: the answer does not grow with what was sent.
    long = "q" * 1_000_000
    quoting: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("label", "/v1/classify", {"images": [{"image": good}], "labels": ["x", "q" * 256]}, 404, "(256 characters)"),
        ("class set", "/v1/classify", {"images": [{"image": good}], "class_set": long}, 404, "(1000000 characters)"),
        ("field name", "/v1/classify", {"images": [{"image": good}], long: 1}, 400, "(1000000 characters)"),
        ("model", "/v1/embeddings", {"model": long, "input": "a photo"}, 404, "(1000000 characters)"),
    ]
    for name, path, payload, status, length in quoting:
        response = service.post(path, json=payload)
        assert response.status_code == status, (name, response.text[:300])
        assert length in assert_error_body(response)["message"], (name, response.text[:300])
        assert len(response.content) < 2_000, (name, len(response.content))
    response = service.session.post(service.url + "/v1/classify", data=b"{not json", timeout=30,
                                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = service.session.post(service.url + "/v1/classify", data=b"x" * (5 * 1024 * 1024), timeout=30,
                                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 413, response.text
    response = service.post("/v1/classify", files=[("image", ("a.png", png(image), "image/png")),
                                                   ("mask", ("m.png", png(mask), "image/png")),
                                                   ("mask", ("n.png", png(mask), "image/png"))])
    assert response.status_code == 400 and "one per image" in response.json()["error"]["message"]
    response = service.post("/v1/classify", files=[("image", ("a.png", png(image), "image/png")),
                                                   ("labels", ("l.txt", b"x", "text/plain"))])
    assert response.status_code == 400 and "'labels' must be a form field" in response.json()["error"]["message"]
    response = service.post("/v1/embeddings", json={"model": "og-clip-tiny", "input": [[1, 2, 3]]})
    assert response.status_code == 400 and "token arrays" in response.json()["error"]["message"]
    response = service.post("/v1/embeddings", json={"model": "og-clip-tiny", "input": "x" * 5000})
    assert response.status_code == 400 and "limit" in response.json()["error"]["message"]

    # Numbers out of range, strings that are not Unicode, nesting too deep for the parser: a 400 naming the
    # problem, never a 500 from encoding or recursing.
    item = f'{{"image": "{good}"'
    embed = '{"model": "og-clip-tiny", "input": '
    raw_cases: list[tuple[str, str, bytes, int, str]] = [
        ("box 1e400", "/v1/classify", f'{{"images": [{item}, "box": [0, 0, 1e400, 10]}}]}}'.encode(), 400,
         "1e400, which is out of range"),
        ("box -1e400", "/v1/classify", f'{{"images": [{item}, "box": [-1e400, 0, 5, 5]}}]}}'.encode(), 400,
         "out of range"),
        ("box Infinity", "/v1/classify", f'{{"images": [{item}, "box": [0, 0, Infinity, 10]}}]}}'.encode(), 400,
         "Infinity"),
        ("box NaN", "/v1/classify", f'{{"images": [{item}, "box": [NaN, 0, 5, 5]}}]}}'.encode(), 400, "NaN"),
        ("top_k 1e400", "/v1/classify", f'{{"images": [{item}}}], "top_k": 1e400}}'.encode(), 400, "out of range"),
        ("top_k 4,000 digits", "/v1/classify", f'{{"images": [{item}}}], "top_k": 1{"0" * 3999}}}'.encode(), 400,
         "an integer of 4000 digits, which is out of range"),
        ("label lone surrogate", "/v1/classify", f'{{"images": [{item}}}], "labels": ["\\ud800"]}}'.encode(), 400,
         "labels[0] that is not valid Unicode"),
        ("class_set lone surrogate", "/v1/classify",
         f'{{"images": [{item}}}], "class_set": "x\\udfffy"}}'.encode(), 400, "not valid Unicode"),
        ("key lone surrogate", "/v1/classify", f'{{"images": [{item}}}], "\\udc00": 1}}'.encode(), 400,
         "not valid Unicode"),
        ("surrogate as UTF-8 bytes", "/v1/classify",
         f'{{"images": [{item}}}], "labels": ["'.encode() + b"\xed\xa0\x80" + b'"]}', 400, "not valid UTF-8"),
        ("input lone surrogate", "/v1/embeddings", (embed + '["a photo", "\\ud83d"]}').encode(), 400,
         "input[1] that is not valid Unicode"),
        ("model lone surrogate", "/v1/embeddings", (embed.replace("og-clip-tiny", "\\ud800") + '"x"}').encode(),
         400, "not valid Unicode"),
        ("dimensions Infinity", "/v1/embeddings", (embed + '"x", "dimensions": Infinity}').encode(), 400,
         "Infinity"),
        ("deep classify", "/v1/classify", b"[" * 100_000, 400, "nests too deeply"),
        ("deep closed classify", "/v1/classify", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
         "nests too deeply"),
        ("deep embeddings", "/v1/embeddings", (embed + "[" * 100_000).encode(), 400, "nests too deeply"),
        ("deep closed embeddings", "/v1/embeddings", (embed + "[" * 100_000 + "]" * 100_000 + "}").encode(), 400,
         "nests too deeply"),
        ("deep within the parser's limit", "/v1/embeddings", (embed + "[" * 40 + "]" * 40 + "}").encode(), 400,
         "input"),
        ("UTF-16", "/v1/embeddings", (embed + '"x"}').encode("utf-16"), 400, "not valid UTF-8"),
    ]
    for name, path, body, status, message in raw_cases:
        response = service.session.post(service.url + path, data=body, timeout=60, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == status, (name, response.text[:300])
        assert message in assert_error_body(response)["message"], (name, response.text[:300])
    response = classify(service, [{"image": good, "box": ["inf", 0, 5, 5]}])  # a string pydantic would read as inf
    assert response.status_code == 400 and "finite" in assert_error_body(response)["message"], response.text
    response = service.post("/v1/classify", files=[("image", ("a.png", png(image), "image/png"))],
                            data={"box": "0,0,inf,5"})
    assert response.status_code == 400 and "x0,y0,x1,y1" in assert_error_body(response)["message"], response.text

    # The request's pixel budget, counted from the headers before anything is decoded: three 1000×1000 PNGs are
    # over it; the same three as JPEGs are decoded at half size (PIL draft mode) and are not.
    flat = Image.new("RGB", (1000, 1000), (40, 90, 160))
    flat.paste((220, 40, 30), (300, 300, 700, 700))
    big_png, big_jpeg = b64(png(flat)), b64(jpeg(flat))
    response = classify(service, [{"image": big_png}] * 3)
    assert response.status_code == 413, response.text
    error = assert_error_body(response)
    assert error["code"] == "pixel_budget_exceeded" and "3000000 pixels" in error["message"]
    assert "limit per request is 2500000" in error["message"]
    square = np.zeros((1000, 1000), np.uint8)
    square[300:700, 300:700] = 255
    response = classify(service, [{"image": big_png, "mask": b64(png(square))}, {"image": big_png}])
    assert response.status_code == 413 and "3000000 pixels" in response.json()["error"]["message"], response.text
    response = classify(service, [{"image": big_jpeg}] * 3)
    assert response.status_code == 200, response.text
    response = service.post("/v1/embeddings", json={"model": "og-clip-tiny",
                                                    "input": ["data:image/png;base64," + big_png] * 3})
    assert response.status_code == 413 and response.json()["error"]["code"] == "pixel_budget_exceeded"
    # A large image is reduced to its working size before the segmenter and the transform: its box is scaled
    # with it, and the mask it gets is where the box is.
    response = classify(service, [{"image": big_png, "box": [300, 300, 700, 700]}], segment=False)
    assert response.status_code == 200 and response.json()["results"][0]["mask_source"] == "box", response.text
    response = classify(service, [{"image": big_png, "box": [999.5, 999.5, 1000, 1000]}], segment=False)
    assert response.status_code == 200, response.text
    response = classify(service, [{"image": big_png, "mask": b64(png(square))}])
    assert response.status_code == 200 and response.json()["results"][0]["mask_source"] == "mask", response.text
    # Only image formats the service decodes: anything else PIL knows (here an EPS) is refused before decoding.
    eps = b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    response = classify(service, [{"image": eps}])
    assert response.status_code == 400 and "cannot decode" in response.json()["error"]["message"], response.text

    # Nothing above hurt a replica: both still answer, and a good request still works.
    assert all(service.get("/readyz").status_code == 200 for _ in range(4))
    assert classify(service, [{"image": good}]).status_code == 200


# -- generated bad input -------------------------------------------------------------------------------------------

_SMALL = Image.new("RGB", (48, 40), (30, 60, 90))
_SMALL.paste((200, 180, 20), (12, 10, 36, 30))
SMALL_PNG, SMALL_JPEG = png(_SMALL), jpeg(_SMALL)
SMALL_MASK = png(np.pad(np.full((20, 24), 255, np.uint8), ((10, 10), (12, 12))))

TEXT = st.text(max_size=12) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "", " ", "test", "og-clip-tiny", "data:image/png;base64,", "%%%", "\u202e"])
SCALAR = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
          | st.sampled_from([1e308, -1e308, 5e-324, 0, -1, 2**63]))
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                     max_leaves=10)
ENCODED = st.sampled_from([b64(SMALL_PNG), b64(SMALL_JPEG), "data:image/png;base64," + b64(SMALL_PNG),
                           b64(SMALL_PNG[:40]), b64(b"not an image"), b64(bomb_png(5000, 5000)), "", "===="]) \
    | st.binary(max_size=64).map(b64) | VALUE
NUMBER = st.floats() | st.integers() | st.sampled_from([0, 5, 24, 48, 1e308, -1e308]) | TEXT
IMAGE_ITEM = st.fixed_dictionaries({"image": ENCODED}, optional={
    "mask": st.just(b64(SMALL_MASK)) | ENCODED, "box": st.lists(NUMBER, min_size=0, max_size=5) | VALUE})
CLASSIFY = st.fixed_dictionaries({}, optional={
    "images": st.lists(IMAGE_ITEM, max_size=3) | VALUE, "class_set": st.sampled_from(["test", HOT_SET]) | VALUE,
    "labels": st.lists(TEXT, max_size=3) | VALUE, "dim": st.sampled_from([16, 32, 64, 0, -1]) | VALUE,
    "top_k": st.integers(-2, 200) | VALUE, "segment": st.booleans() | VALUE, "extra": VALUE})
EMBEDDINGS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["og-clip-tiny"]) | VALUE,
    "input": TEXT | st.lists(TEXT | st.just("data:image/png;base64," + b64(SMALL_PNG)) | ENCODED, max_size=3)
    | VALUE,
    "dimensions": st.sampled_from([16, 32, 64]) | VALUE, "encoding_format": st.sampled_from(["float", "base64"])
    | VALUE, "user": VALUE})
RETRIEVE = st.fixed_dictionaries({}, optional={
    "text": TEXT | VALUE, "image": IMAGE_ITEM | VALUE, "top_k": st.integers(-2, 200) | VALUE,
    "dim": st.sampled_from([16, 32, 64, 0, -1]) | VALUE, "extra": VALUE})
CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-16", "text/plain",
                                 "multipart/form-data", "multipart/form-data; boundary=b", "", "image/png",
                                 "application/x-www-form-urlencoded"])
PART = st.tuples(st.sampled_from(["image", "mask", "box", "labels", "dim", "top_k", "segment", "class_set", "x"]),
                 st.booleans(),
                 st.sampled_from([SMALL_PNG, SMALL_JPEG, SMALL_MASK, b"", b"0,0,5,5", b"1e400,0,1,1", b"nan,0,1,1",
                                  b"test", b"32", b"-3", b"true"]) | st.binary(max_size=64))


def _multipart(parts: list[tuple[str, bool, bytes]]) -> tuple[bytes, str]:
    fields = [(name, ("f.png", data, "image/png")) if is_file else (name, data.decode("latin-1"))
              for name, is_file, data in parts]
    return encode_multipart_formdata(fields)


REQUESTS = st.one_of(
    st.tuples(st.just("json"), st.sampled_from(["/v1/classify"]), CLASSIFY),
    st.tuples(st.just("json"), st.sampled_from(["/v1/embeddings"]), EMBEDDINGS),
    st.tuples(st.just("json"), st.sampled_from(["/v1/retrieve"]), RETRIEVE),
    st.tuples(st.just("json"), st.sampled_from(["/v1/classify", "/v1/embeddings", "/v1/retrieve"]), VALUE),
    st.tuples(st.just("bytes"), st.sampled_from(["/v1/classify", "/v1/embeddings", "/v1/retrieve"]),
              st.tuples(CONTENT_TYPES, st.binary(max_size=512))),
    st.tuples(st.just("multipart"), st.just("/v1/classify"), st.lists(PART, max_size=6)),
    st.tuples(st.just("get"), st.sampled_from(["/v1/classes", "/v1/models", "/healthz", "/readyz", "/v1/nowhere",
                                               "/openapi.json"]),
              st.dictionaries(st.sampled_from(["class_set", "x"]), TEXT, max_size=2)),
    st.tuples(st.just("method"), st.sampled_from(["/v1/classify", "/v1/embeddings", "/v1/retrieve", "/v1/classes",
                                               "/"]),
              st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])),
)


def _send(service: Service, kind: str, path: str, payload: Any) -> requests.Response:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if kind == "json":  # json.dumps writes NaN/Infinity for non-finite floats and \\ud800 for lone surrogates
        return service.session.post(service.url + path, data=json.dumps(payload).encode(), timeout=60,
                                    headers={**auth, "Content-Type": "application/json"})
    if kind == "bytes":
        content_type, body = payload
        return service.session.post(service.url + path, data=body, timeout=60,
                                    headers={**auth, "Content-Type": content_type})
    if kind == "multipart":
        body, content_type = _multipart(payload)
        return service.session.post(service.url + path, data=body, timeout=60,
                                    headers={**auth, "Content-Type": content_type})
    if kind == "get":  # quoted here: requests cannot encode a lone surrogate, the bytes of one go as they are
        query = "&".join(f"{quote(k)}={quote(v, safe='', errors='surrogatepass')}" for k, v in payload.items())
        return service.session.get(f"{service.url}{path}?{query}", headers=auth, timeout=60)
    return service.session.request(payload, service.url + path, headers=auth, timeout=60)


@pytest.mark.slow
def test_generated_bad_input_never_gets_a_5xx(service: Service, world: World) -> None:
    """Generated JSON values (shaped like the requests, and not), raw bytes under any content type, multipart
    forms, query strings and methods, at every endpoint: never a 5xx, always the JSON error object for a 4xx, the
    replicas stay the same processes, and the next valid request is served."""
    replicas = replica_names(service)
    assert len(replicas) == 2
    seen: Counter[int] = Counter()

    @hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(request=REQUESTS)
    def never_5xx(request: tuple[str, str, Any]) -> None:
        kind, path, payload = request
        response = _send(service, kind, path, payload)
        seen[response.status_code] += 1
        assert response.status_code < 500, (kind, path, response.status_code, response.text[:500])
        if response.status_code >= 400 and kind != "method":  # HEAD answers have no body
            assert_error_body(response)

    never_5xx()
    print(f"generated requests by status: {dict(sorted(seen.items()))}")
    assert seen[200] > 0 and sum(seen.values()) >= 300
    assert replica_names(service) == replicas, "a replica was replaced: bad input killed it"
    assert all(service.get("/readyz").status_code == 200 for _ in range(4))
    response = classify(service, [{"image": b64(SMALL_PNG)}], class_set="test", top_k=1)
    assert response.status_code == 200 and response.json()["results"][0]["labels"][0]["label"] in world.test_rows


@pytest.mark.slow
def test_hot_class_addition_during_a_stream_of_requests(service: Service, graph: GraphStore, world: World,
                                                        bundle: tuple[OGCLIP, BundleInfo]) -> None:
    model, info = bundle
    first, exported, on_demand = list(world.hot_rows)
    images = [b64(png(image)) for _, image, _ in renders(world.hot_rows, 3, seed=11)]
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        with requests.Session() as session:
            i = 0
            while not stop.is_set():
                class_set = HOT_SET if (i + worker) % 2 else "test"
                response = session.post(service.url + "/v1/classify", timeout=60,
                                        headers={"Authorization": f"Bearer {TOKEN}"},
                                        json={"images": [{"image": images[i % 3]}], "class_set": class_set})
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    failures.append(response.text)
                i += 1

    before = service.get("/readyz").json()["revision"]
    workers = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.0)
        # One class as the export step adds it (its embedding written first), one with no embedding at all: the
        # replicas embed it with their own text tower and write it back.
        vectors, prompts = _embed(model, [world.hot_rows[exported]])
        graph.write_embeddings(info.model_version, vectors, prompts)
        graph.link("Target", "IN_CLASS_SET", "ClassSet", [{"from": exported, "to": HOT_SET, "props": {}},
                                                          {"from": on_demand, "to": HOT_SET, "props": {}}])
        deadline, seen = time.monotonic() + 90, 0
        while seen < 6:  # six answers in a row (from both replicas) show the new classes
            assert time.monotonic() < deadline, "the replicas did not pick up the new classes"
            listing = service.get("/v1/classes", params={"class_set": HOT_SET}).json()
            members = {m["key"] for m in next(s for s in listing["class_sets"] if s["name"] == HOT_SET)["members"]}
            seen = seen + 1 if members == {first, exported, on_demand} else 0
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == [] and statuses[200] > 10, (statuses, failures[:3])
    after = service.get("/readyz").json()["revision"]
    assert after != before
    body = classify(service, [{"image": images[2]}], class_set=HOT_SET, top_k=3).json()
    assert body["class_set_revision"] == after
    assert {r["label"] for r in body["results"][0]["labels"]} == {first, exported, on_demand}
    # The class embedded on demand is in the graph now, exactly as the export step would have embedded it.
    stored = graph.read_embeddings(info.model_version)[on_demand]
    want, _ = _embed(model, [world.hot_rows[on_demand]])
    np.testing.assert_allclose(stored, want[on_demand], atol=1e-5)


@pytest.mark.slow
def test_metrics_are_exported_for_prometheus(service: Service, world: World) -> None:
    (_, image, _), = renders(world.test_rows, 1)
    assert classify(service, [{"image": b64(png(image))}]).status_code == 200
    too_big = service.session.post(service.url + "/v1/classify", data=b"x" * (5 * 1024 * 1024), timeout=30,
                                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert too_big.status_code == 413
    wanted = ("ray_ogclip_requests_total", "ray_ogclip_request_latency_ms_bucket", "ray_ogclip_batch_size_bucket",
              "ray_ogclip_errors_total", "ray_ogclip_embedding_revision", "ray_ogclip_embedding_reloads_total",
              "ray_ogclip_classes", "ray_ogclip_on_demand_embeddings_total")

    def requests_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("ray_ogclip_requests_total")]

    def complete(text: str) -> bool:
        lines = requests_lines(text)
        return all(name in text for name in wanted) \
            and any('endpoint="/v1/classify"' in line and 'status="200"' in line for line in lines) \
            and any('status="413"' in line for line in lines) and any(f'application="{APP}"' in line for line in lines)

    # Ray exports each replica's metrics periodically: poll until both requests above have been exported.
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline and not complete(text):
        time.sleep(2)
        text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
    assert complete(text), ([name for name in wanted if name not in text], requests_lines(text)[:20])


@pytest.mark.slow
def test_overload_is_refused_with_503_not_queued(service: Service, world: World) -> None:
    """A burst of classify requests is answered or refused with 503; liveness and readiness probes arriving in
    the same instant, and while the replicas shed load, are all answered 200 (busy is not unready)."""
    images = [{"image": b64(png(image))} for _, image, _ in renders(world.test_rows, 8, seed=21)]
    barrier = threading.Barrier(140)
    statuses: Counter[int] = Counter()
    probes: list[tuple[str, int, str]] = []

    def probe(path: str) -> None:
        response = requests.get(service.url + path, timeout=60)
        probes.append((path, response.status_code, response.text[:200]))

    def burst() -> None:
        with requests.Session() as session:
            barrier.wait()
            response = session.post(service.url + "/v1/classify", json={"images": images}, timeout=120,
                                    headers={"Authorization": f"Bearer {TOKEN}"})
            statuses[response.status_code] += 1

    def probe_burst(path: str) -> None:
        barrier.wait()
        probe(path)

    assert service.get("/readyz", token=None).status_code == 200
    threads = [threading.Thread(target=burst) for _ in range(40)]
    threads += [threading.Thread(target=probe_burst, args=(path,)) for path in ("/healthz", "/readyz") * 50]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for path in ("/healthz", "/readyz"):
            probe(path)
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    answered = Counter(status for _, status, _ in probes)
    print(f"burst of 40 requests on 2 replicas × (4 ongoing + 4 queued): {dict(statuses)}; probes {dict(answered)}")
    assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
    assert len(probes) > 100 and set(answered) == {200}, [p for p in probes if p[1] != 200][:5]
    assert classify(service, images[:1]).status_code == 200


def _kill_under_load(service: Service, images: list[dict[str, Any]], kill: int
                     ) -> tuple[Counter[int], list[requests.Response]]:
    """Four clients without pause, two classifying ``images`` and two asking /v1/retrieve (both idempotent: the
    gateway may resend them); ``kill`` classifier replicas are killed among them; the clients stop a few seconds
    later (each once it has its answer), and the deployment gets its two replicas back. The clients' statuses (-1:
    no answer at all; both routes asserted to have been answered) and their non-200 answers."""
    import ray
    from ray import serve

    statuses: Counter[int] = Counter()
    answered: Counter[str] = Counter()
    failures: list[requests.Response] = []
    stop = threading.Event()
    routes = {"/v1/classify": {"images": images}, "/v1/retrieve": {"text": "a grey aircraft", "top_k": 5}}

    def load(route: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(service.url + route, json=routes[route], timeout=300,
                                            headers={"Authorization": f"Bearer {TOKEN}"})
                    statuses[response.status_code] += 1
                    answered[route] += response.status_code == 200
                    if response.status_code != 200:
                        failures.append(response)
                except requests.RequestException:
                    statuses[-1] += 1

    def states() -> dict[str, int]:
        deployment = serve.status().applications[APP].deployments[service.cfg.deployment.name]
        return {state: count for state, count in deployment.replica_states.items() if count}

    def steady(killed: set[str], seconds: float) -> set[str]:
        """Wait until the deployment runs two replicas and nothing else (none starting or stopping), none of them
        ``killed``: their actor names."""
        deadline = time.monotonic() + seconds
        while states() != {"RUNNING": 2} or len(names := replica_names(service) - killed) != 2:
            assert time.monotonic() < deadline, f"the deployment did not get back to two replicas in {seconds:.0f} s"
            time.sleep(1.0)
        return names

    # Serve may still be replacing a replica when this starts (seen once: two replica actors, one of them RUNNING,
    # right after the previous test's load): the kill is aimed at two running replicas.
    replicas = sorted(steady(set(), 120))
    threads = [threading.Thread(target=load, args=(route,)) for route in routes for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        assert statuses[200] > 0
        namespaces = {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
        for name in replicas[:kill]:
            ray.kill(ray.get_actor(name, namespace=namespaces[name]), no_restart=True)
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:  # a request waiting for a replacement replica finishes first
            thread.join()
    # The replacements start without load on the two cores: quicker, and the next test finds two replicas.
    steady(set(replicas[:kill]), 180)
    assert all(answered[route] for route in routes), answered
    return statuses, failures


def _retries_exported(service: Service) -> float:
    """The gateway's count of requests sent again after their replica stopped, as Prometheus reads it."""
    text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_ogclip_retries_total{") and f'application="{APP}"' in line)


@pytest.mark.slow
def test_replica_killed_under_load_loses_no_request(service: Service, world: World) -> None:
    """A replica killed mid-request: the requests in flight on it are sent again to the other replica by the
    gateway (classify and retrieve are idempotent), so every client gets its answer; no 500, no dropped
    connection."""
    images = [{"image": b64(png(image))} for _, image, _ in renders(world.test_rows, 2, seed=31)]
    statuses, failures = _kill_under_load(service, images, kill=1)
    print(f"one replica killed under load: {dict(statuses)} (-1 = no answer)")
    assert set(statuses) == {200}, (statuses, [(r.status_code, r.text[:200]) for r in failures[:3]])
    assert all(service.get("/readyz").status_code == 200 for _ in range(4))
    assert classify(service, images).status_code == 200


@pytest.mark.slow
def test_all_replicas_killed_is_a_retry_or_a_503_with_retry_after(service: Service, world: World) -> None:
    """Every replica killed at once: the requests in flight on them are sent again and wait for the replacements,
    or, once the retries are spent, are answered 503 with Retry-After in the error format; never a 500."""
    images = [{"image": b64(png(image))} for _, image, _ in renders(world.test_rows, 2, seed=41)]
    statuses, failures = _kill_under_load(service, images, kill=2)
    # Which requests the gateway re-sent and which Serve's router re-routed itself (those not yet running on the
    # replica) varies from run to run; that none is lost does not.
    print(f"all replicas killed under load: {dict(statuses)} (-1 = no answer); "
          f"re-sent by the gateway so far: {_retries_exported(service):.0f}")
    assert set(statuses) <= {200, 503}, (statuses, [(r.status_code, r.text[:200]) for r in failures[:3]])
    for response in failures:
        assert int(response.headers["retry-after"]) >= 0
        assert assert_error_body(response)["code"] in ("replica_lost", "overloaded", "no_replica")
    assert all(service.get("/readyz").status_code == 200 for _ in range(4))
    assert classify(service, images).status_code == 200


@pytest.mark.gpu
def test_cuda_replica_parts_match_cpu(bundle: tuple[OGCLIP, BundleInfo], world: World) -> None:
    from ogclip.bundle import load_bundle
    from ogclip_serve.index import VectorIndex

    model, info = bundle
    cuda_model, _ = load_bundle(info.path, info.model_version, device="cuda")
    (_, image, mask), = renders(world.test_rows, 1)
    image_t, mask_t = image_mask_transform(info.preprocess)(image, mask)
    with torch.no_grad():
        cpu = model.image_features(image_t[None], mask_t[None]).numpy()
        gpu = cuda_model.image_features(image_t[None].cuda(), mask_t[None].cuda()).float().cpu().numpy()
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)
    vectors = np.stack(list(world.vectors.values()))
    for dim in model.dims:
        want = VectorIndex(vectors, [dim]).search(cpu, dim, 5)[1]
        got = VectorIndex(vectors, [dim], use_gpu=True).search(cpu, dim, 5)[1]
        assert (want == got).all()
        half = VectorIndex(vectors, [dim], use_gpu=True, float16=True).search(cpu, dim, 5)
        np.testing.assert_allclose(half[0], VectorIndex(vectors, [dim]).search(cpu, dim, 5)[0], atol=2e-3)
