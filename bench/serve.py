"""Classification-service throughput and latency, all in one run on one machine:

* requests/s and p50/p99 latency of ``POST /v1/classify`` (one 64-px image with its mask, one class set) at
  concurrency 1, 8 and 32, against three copies of the same app on local Ray Serve: dynamic batching on and off
  behind the gateway, and unbatched without it (``gateway.enabled: false``, the replica as the ingress);
* the same work as a direct in-process call (decode, preprocess, model, search; no HTTP, no Serve), one request at a
  time and as batches of 8 and 32, so the difference is the serving overhead;
* faiss search time per embedding size (D/8..D) over the served class set and over a larger one;
* for scale, the same load on a Serve endpoint that only reads the body and answers: the HTTP + Serve floor of
  this machine, which no model service can go below.

Concurrency 1 is measured in interleaved rounds (every app and the direct call in each, a different app first each
round), and the serving overhead over the floor is taken per round, then its median: on a shared machine the
floor alone moves by half between minutes, and figures taken minutes apart would carry that into the ratio.

``--overload CLIENTS`` measures admission control instead: CLIENTS clients, each sending its next request as soon as
the last one is answered, for ``--seconds`` against one replica of the service's default deployment (one 512-px
image + mask per request), with ``/readyz`` asked every 0.5 s meanwhile; with the latency budget on
(``gateway.latency_budget_s``, default 2 s) and off (the baseline, same run), each with clients that wait a 503's
``Retry-After`` (as OpenAI's client does) and with clients that send again at once: how many requests were
admitted (200) and how long they took (p50/p99/max), how many were refused (503) and how fast, and how often
readiness said ready.

It starts an embedded graph server of its own (temporary folder, free ports), exports a fresh og-clip-tiny bundle
and writes class embeddings (each class's label prompt through the bundle's own text tower) under its version, as
the export step does. The HTTP client runs on the same machine as the service, so on a small machine it competes
with it for the CPUs; figures from different machines are not comparable.

    python bench/serve.py [--classes 1000] [--requests 240] [--output outputs/bench/serve.json]
    python bench/serve.py --overload 200 [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASS_SET = "bench"
TOKEN = "bench-token-0123456789abcdef"
LEVELS = (1, 8, 32)
ROUNDS = 6  # concurrency 1 is measured in this many interleaved rounds


def timed(call: Any, times: int) -> list[float]:
    """Milliseconds of each of ``times`` calls."""
    out = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(latencies_ms: list[float], wall_s: float) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {"requests": len(ordered), "rps": len(ordered) / wall_s, "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]}


async def load(url: str, payload: dict[str, Any] | list[dict[str, Any]], concurrency: int, total: int,
               keep: list[float] | None = None) -> dict[str, float]:
    """``total`` requests from ``concurrency`` clients, each sending its next request when the last one returns;
    a list of payloads is sent in turn. ``keep`` collects the latencies (ms) too."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    remaining = total
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bodies = [json.dumps(p).encode() for p in (payload if isinstance(payload, list) else [payload])]

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            body = bodies[remaining % len(bodies)]
            started = time.perf_counter()
            async with session.post(url, data=body, headers={**headers, "Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    result = summary(latencies, wall)
    result["errors"] = errors
    if keep is not None:
        keep.extend(latencies)
    return result


async def _flood(url: str, ready_url: str, payload: dict[str, Any], clients: int, seconds: float,
                 backoff: bool) -> dict[str, Any]:
    """``clients`` clients sending back to back for ``seconds``, and a readiness probe every 0.5 s meanwhile. With
    ``backoff`` a client answered 503 waits its ``Retry-After`` before the next request, as OpenAI's client does."""
    import aiohttp

    answers: dict[int, list[float]] = {}
    ready: list[int] = []
    body = json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    stop = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            wait = 0.0
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
                    if backoff and status == 503:
                        wait = float(r.headers.get("Retry-After", 1))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0  # no answer (connection refused or reset, or the client's 120 s timeout)
            answers.setdefault(status, []).append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(min(wait, max(0.0, stop - time.perf_counter())))  # not past the run's end

    async def probe(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            try:
                async with session.get(ready_url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    await r.read()
                    ready.append(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ready.append(0)
            await asyncio.sleep(0.5)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(probe(session), *(client(session) for _ in range(clients)))
        wall = time.perf_counter() - started
    admitted, refused = answers.pop(200, []), answers.pop(503, [])
    result = {"clients": clients, "wall_s": wall, "admitted": len(admitted), "admitted_rps": len(admitted) / wall,
              "refused": len(refused), "other": {str(k): len(v) for k, v in answers.items()},
              "ready_checks": len(ready), "ready_ok": ready.count(200),
              "ready_statuses": {str(k): ready.count(k) for k in sorted(set(ready))}}  # 0: no answer within 5 s
    if admitted:
        ordered = sorted(admitted)
        result.update(summary(ordered, wall), max_ms=ordered[-1])
    if refused:
        result["refused_p50_ms"] = statistics.median(refused)
    return result


def noop_app() -> Any:
    """A Serve app that reads the request body and answers a small JSON: the cost of HTTP and Serve alone."""
    from ray import serve

    @serve.deployment(name="noop", ray_actor_options={"num_cpus": 1.0}, max_ongoing_requests=64,
                      max_queued_requests=512)
    class Noop:
        async def __call__(self, request: Any) -> dict[str, int]:  # Serve passes the Starlette request
            return {"bytes": len(await request.body())}

    return Noop.bind()


def start_serve(stack: ExitStack, home: Path, settings: Any) -> int:
    """Local Ray Serve on a free port of 127.0.0.1, its replicas pointed at the benchmark's graph; returns the port."""
    import ray
    from ray import serve

    from ogclip.settings import free_ports

    (port,) = free_ports(1)
    os.environ.update({"OGCLIP_HOME": str(home), "OGCLIP_KG_BOLT_PORT": str(settings.kg_bolt_port),
                       "OGCLIP_KG_HTTP_PORT": str(settings.kg_http_port), "OGCLIP_API_TOKEN": TOKEN})
    os.environ.pop("OGCLIP_NEO4J_URI", None)
    # Four apps of one 1-CPU replica each, two of the classifier apps with their 0.1-CPU gateways too: Ray must
    # count five CPUs here for all of them to be placed (the loads run one at a time).
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stack.callback(serve.shutdown)
    return port


def start_graph(stack: ExitStack) -> tuple[Path, Any, Any]:
    """An embedded graph server of the benchmark's own (temporary folder, free ports), its schema migrated."""
    from ogclip.settings import Settings, free_ports
    from ogclip_kg import server
    from ogclip_kg.schema import migrate
    from ogclip_kg.store import GraphStore

    home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    bolt_port, http_port = free_ports(2)
    settings = Settings(home=home, kg_bolt_port=bolt_port, kg_http_port=http_port, neo4j_uri=None,
                        neo4j_password=None)
    server.up(settings)
    stack.callback(server.down, settings)
    store = stack.enter_context(GraphStore.from_settings(settings))
    migrate(store)
    return home, settings, store


def bundle_with_classes(store: Any, home: Path, classes: int) -> tuple[Any, Any, list[str], torch.Tensor]:
    """A fresh og-clip-tiny bundle and ``classes`` classes in the class set ``bench``, their embeddings (each
    label prompt through the bundle's own text tower) written under its version, as the export step does."""
    from ogclip.bundle import export_bundle
    from ogclip.models import create_model
    from ogclip.zeroshot import class_embeddings

    torch.manual_seed(0)
    model = create_model("og-clip-tiny", device="cpu").eval()
    bundle = export_bundle(model, home / "bundle")
    keys = [f"bench-class-{i:05d}" for i in range(classes)]
    store.upsert("Target", [{"key": k, "props": {"name": f"bench class {i}", "super_category": "civilian/other"}}
                            for i, k in enumerate(keys)])
    store.upsert("ClassSet", [{"key": CLASS_SET, "props": {"size": len(keys)}}])
    store.link("Target", "IN_CLASS_SET", "ClassSet", [{"from": k, "to": CLASS_SET, "props": {}} for k in keys])
    started = time.perf_counter()
    prompts = {k: [f"a photo of a bench class {i}."] for i, k in enumerate(keys)}
    vectors = class_embeddings(model, prompts)
    store.write_embeddings(bundle.model_version, {k: v.tolist() for k, v in zip(keys, vectors, strict=True)}, prompts)
    print(f"bundle {bundle.model_version}; {len(keys)} class embeddings written in "
          f"{time.perf_counter() - started:.1f}s")
    return model, bundle, keys, vectors


def overload(stack: ExitStack, home: Path, settings: Any, base: Any, clients: int, seconds: float) -> dict[str, Any]:
    """Admission control under ``clients`` back-to-back clients: the latency budget on, then off (the baseline)."""
    from ray import serve

    from ogclip.synth import TargetClass, render
    from ogclip_jobs.data.images import png_bytes
    from ogclip_serve.app import build_app
    from ogclip_serve.config import ServeAutoscalingConfig, serve_config

    sample = render(TargetClass("bench", "military aircraft", "swept wing", "grey"), seed=0, size=512)
    payload = {"images": [{"image": base64.b64encode(png_bytes(sample.image)).decode(),
                           "mask": base64.b64encode(png_bytes(sample.mask)).decode()}],
               "class_set": CLASS_SET, "top_k": 5}
    port = start_serve(stack, home, settings)
    cfg = serve_config(base)
    one_replica = cfg.deployment.model_copy(update={"autoscaling": ServeAutoscalingConfig(min_replicas=1,
                                                                                          max_replicas=1)})
    budget = cfg.gateway.latency_budget_s
    report: dict[str, Any] = {}
    for name, app_budget in ((f"budget {budget:g} s", budget), ("no budget (baseline)", None)):
        route = "/budget" if app_budget else "/no-budget"
        app = cfg.model_copy(update={"app_name": route[1:], "port": port, "deployment": one_replica.model_copy(
            update={"name": f"classifier-{route[1:]}"}), "gateway": cfg.gateway.model_copy(
            update={"latency_budget_s": app_budget})})
        serve.run(build_app(app), name=route[1:], route_prefix=route)
        url = f"http://127.0.0.1:{port}{route}"
        asyncio.run(load(f"{url}/v1/classify", payload, 4, 40))  # warm-up
        for clients_do in ("honour Retry-After", "re-send at once"):
            report[f"{name}, {clients_do}"] = asyncio.run(_flood(
                f"{url}/v1/classify", f"{url}/readyz", payload, clients, seconds, clients_do.startswith("honour")))
        serve.delete(route[1:])
    print(f"\nPOST /v1/classify, one 512-px image + mask, {clients} clients for {seconds:.0f} s, each sending its "
          f"next request when the last is answered; one replica ({cfg.deployment.max_ongoing_requests} at once, "
          f"{cfg.deployment.max_queued_requests} queued):")
    print(f"{'':<44}{'admitted':>9}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'503s':>7}{'503 p50':>8}"
          f"{'other':>6}{'ready':>9}")
    for name, r in report.items():
        print(f"{name:<44}{r['admitted']:>9}{r['admitted_rps']:>7.1f}{r.get('p50_ms', 0):>8.0f}"
              f"{r.get('p99_ms', 0):>8.0f}{r.get('max_ms', 0):>8.0f}{r['refused']:>7}{r.get('refused_p50_ms', 0):>8.0f}"
              f"{sum(r['other'].values()):>6}{r['ready_ok']:>5}/{r['ready_checks']:<3}")
    for clients_do in ("honour Retry-After", "re-send at once"):
        on, off = report[f"budget {budget:g} s, {clients_do}"], report[f"no budget (baseline), {clients_do}"]
        if on.get("p99_ms") and off.get("p99_ms"):
            print(f"clients that {clients_do}: admitted p99 with the budget / without "
                  f"{on['p99_ms'] / off['p99_ms']:.2f},"
                  f" admitted req/s {on['admitted_rps'] / max(off['admitted_rps'], 1e-9):.2f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000, help="classes in the served class set")
    parser.add_argument("--search-classes", type=int, default=10000, help="classes of the larger search benchmark")
    parser.add_argument("--requests", type=int, default=240, help="requests per concurrency level and mode")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/serve.json"))
    parser.add_argument("--overload", type=int, metavar="CLIENTS",
                        help="measure admission control under this many clients instead (see above)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the --overload clients send")
    parser.add_argument("--batch-wait-s", type=float, help="the batched service's batch_wait_timeout_s (default: "
                        "the service's default)")
    args = parser.parse_args()

    from ray import serve

    from ogclip.synth import TargetClass, render
    from ogclip.transforms import image_mask_transform
    from ogclip_jobs.data.images import png_bytes
    from ogclip_serve.app import build_app, image_features
    from ogclip_serve.config import (
        ServeAutoscalingConfig,
        ServeBatchingConfig,
        ServeClassesConfig,
        ServeConfig,
        ServeDeploymentConfig,
    )
    from ogclip_serve.index import VectorIndex, scores
    from ogclip_serve.inputs import RawImage, decode_base64, prepare

    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                          "cuda": torch.cuda.is_available()}}
    with ExitStack() as stack:
        home, settings, store = start_graph(stack)
        model, bundle, keys, vectors = bundle_with_classes(store, home, args.classes)

        sample = render(TargetClass("bench", "military aircraft", "swept wing", "grey"), seed=0, size=64)
        payload = {"images": [{"image": base64.b64encode(png_bytes(sample.image)).decode(),
                               "mask": base64.b64encode(png_bytes(sample.mask)).decode()}],
                   "class_set": CLASS_SET, "top_k": 5}
        base = ServeConfig(bundle=bundle.path, classes=ServeClassesConfig(class_sets=[CLASS_SET]))

        if args.overload:
            report["overload"] = overload(stack, home, settings, base, args.overload, args.seconds)
            _write(report, args.output.with_name(f"{args.output.stem}-overload.json"))
            return

        # -- direct in-process calls: the same steps a replica runs, without HTTP and Serve -------------------------
        transform = image_mask_transform(bundle.preprocess)
        index = VectorIndex(vectors.numpy(), model.dims)
        logit_scale = float(model.logit_scale.detach().exp().clamp(max=100))

        def direct(batch: int) -> None:
            raw = [RawImage(image=decode_base64(payload["images"][0]["image"], "image", 1 << 24),
                            mask=decode_base64(payload["images"][0]["mask"], "mask", 1 << 24))] * batch
            prepared = [prepare(item, i, base.limits, transform, None, "none", False) for i, item in enumerate(raw)]
            features = image_features(model, torch.device("cpu"), prepared)
            similarities, rows = index.search(features, model.dims[-1], index.size)
            probabilities = scores(similarities, logit_scale)
            [[(keys[int(rows[i, j])], float(probabilities[i, j])) for j in range(5)] for i in range(batch)]

        torch.set_num_threads(1)  # as a replica with one CPU
        report["direct"] = {}
        for batch in LEVELS:
            for _ in range(5):
                direct(batch)
            calls = max(10, args.requests // batch)
            latencies = timed(lambda batch=batch: direct(batch), calls)
            result = summary(latencies, sum(latencies) / 1000)
            result["rps"] = calls * batch / (sum(latencies) / 1000)  # images (= requests of one image) per second
            report["direct"][batch] = result

        # -- search time per embedding size ------------------------------------------------------------------------
        rng = np.random.default_rng(0)
        report["search"] = {}
        for count in (args.classes, args.search_classes):
            matrix = vectors.numpy() if count == args.classes else rng.standard_normal((count, model.dims[-1]))
            big = VectorIndex(matrix.astype(np.float32), model.dims)
            queries = rng.standard_normal((256, model.dims[-1])).astype(np.float32)
            per_dim = {}
            for dim in model.dims:
                for k, label in ((5, "top5"), (count, "all")):
                    big.search(queries[:8], dim, k)
                    started = time.perf_counter()
                    for q in queries:
                        big.search(q[None], dim, k)
                    per_dim.setdefault(dim, {})[f"{label}_us_per_query"] = \
                        (time.perf_counter() - started) / len(queries) * 1e6
                started = time.perf_counter()
                big.search(queries, dim, 5)
                per_dim[dim]["batch256_top5_us_per_query"] = (time.perf_counter() - started) / len(queries) * 1e6
            report["search"][count] = per_dim
        torch.set_num_threads(os.cpu_count() or 1)

        # -- the service: batching on and off, one replica each -----------------------------------------------------
        port = start_serve(stack, home, settings)
        deployment = ServeDeploymentConfig(num_cpus=1.0, autoscaling=ServeAutoscalingConfig(min_replicas=1,
                                           max_replicas=1), max_ongoing_requests=64, max_queued_requests=512)
        batched = ServeBatchingConfig(enabled=True, max_batch_size=32)
        if args.batch_wait_s is not None:
            batched = batched.model_copy(update={"batch_wait_timeout_s": args.batch_wait_s})
        report["batching"] = batched.model_dump()
        unbatched = ServeBatchingConfig(enabled=False)
        modes = {"batched": (batched, True), "unbatched": (unbatched, True), "no-gateway": (unbatched, False)}
        for mode, (batching, gateway) in modes.items():
            cfg = base.model_copy(update={"app_name": mode, "port": port, "deployment": deployment.model_copy(
                update={"name": f"classifier-{mode}"}), "batching": batching,
                "gateway": base.gateway.model_copy(update={"enabled": gateway})})
            serve.run(build_app(cfg), name=mode, route_prefix=f"/{mode}")
        serve.run(noop_app(), name="noop", route_prefix="/noop")
        print("service up: batching on at /batched, off at /unbatched, off without the gateway at /no-gateway, no-op "
              "at /noop (one replica each, 1 CPU)")
        urls = {mode: f"http://127.0.0.1:{port}/{mode}/v1/classify" for mode in (*modes, "noop")}  # noop: any path
        for url in urls.values():
            asyncio.run(load(url, payload, 4, 40))  # warm-up
        # Concurrency 1, where the overhead is compared with the floor: ROUNDS rounds, each sending a share of the
        # requests to every app in turn (a different app first each round) and timing the direct call between, so
        # that what the machine does meanwhile falls on every figure alike; the overhead is taken per round.
        torch.set_num_threads(1)
        share = max(10, args.requests // ROUNDS)
        rounds: list[dict[str, float]] = []
        pooled: dict[str, list[float]] = {mode: [] for mode in urls}
        errors = dict.fromkeys(urls, 0)
        for r in range(ROUNDS):
            names = list(urls)[r % len(urls):] + list(urls)[:r % len(urls)]
            figures = {}
            for mode in names:
                result = asyncio.run(load(urls[mode], payload, 1, share, keep=pooled[mode]))
                figures[mode] = result["p50_ms"]
                errors[mode] += result["errors"]
            figures["direct"] = statistics.median(timed(lambda: direct(1), share))
            rounds.append(figures)
        torch.set_num_threads(os.cpu_count() or 1)
        report["c1_rounds"] = rounds
        report["serve"] = {mode: {1: {**summary(pooled[mode], sum(pooled[mode]) / 1000), "errors": errors[mode]}}
                           for mode in urls}
        for mode, url in urls.items():
            for concurrency in LEVELS[1:]:
                report["serve"][mode][concurrency] = asyncio.run(load(url, payload, concurrency, args.requests))

    print()
    print(f"POST /v1/classify, one 64-px image + mask, {args.classes} classes, full dim "
          f"({args.requests} requests per row; batched: up to {report['batching']['max_batch_size']}, waiting "
          f"{report['batching']['batch_wait_timeout_s'] * 1000:g} ms for a batch to fill):")
    print(f"{'':<22}{'conc.':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    labels = {"batched": "serve, batched", "unbatched": "serve, unbatched", "no-gateway": "serve, no gateway",
              "noop": "serve floor (no-op)"}
    for mode, label in labels.items():
        for concurrency, r in report["serve"][mode].items():
            print(f"{label:<22}{concurrency:>6}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r['errors']:>8}")
    for batch, r in report["direct"].items():
        label = "direct, 1 image" if batch == 1 else f"direct, batch of {batch}"
        print(f"{label:<22}{'-':>6}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{'':>8}")
    print(f"serving overhead at concurrency 1 (p50 of serve - p50 of the direct call, over the floor's p50), per round "
          f"of {ROUNDS}, then the median:")
    floors = [r["noop"] for r in rounds]
    for mode in modes:
        ratios = [(r[mode] - r["direct"]) / r["noop"] for r in rounds]
        overhead = statistics.median([r[mode] - r["direct"] for r in rounds])
        report[f"serving_overhead_p50_ms_{mode}"] = overhead
        report[f"serving_overhead_to_floor_{mode}"] = statistics.median(ratios)
        print(f"  {labels[mode]:<20} " + " ".join(f"{x:.2f}x" for x in ratios) +
              f"  median {statistics.median(ratios):.2f}x ({overhead:.1f} ms over a floor of "
              f"{statistics.median(floors):.1f} ms)")
    print()
    print("faiss exact search, µs per query (single query: top 5 / all classes; batch of 256: top 5):")
    for count, per_dim in report["search"].items():
        print(f"  {count} classes: " + "  ".join(
            f"d={dim}: {r['top5_us_per_query']:.0f}/{r['all_us_per_query']:.0f}/{r['batch256_top5_us_per_query']:.1f}"
            for dim, r in per_dim.items()))
    _write(report, args.output)


def _write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
