"""Retrieval: how fast a collection is indexed, and how fast ``POST /v1/retrieve`` answers, all in one run:

* index build rate (images/s) of ``ogclip index build``'s encoder (decode, mask, image and caption embeddings of
  64-px renders) called in process, and of the whole Ray Data job over a Parquet shard of the same renders: the
  job's cost over its work;
* faiss flat search per embedding size (D/8..D) over collections of 10k and 100k items, µs per text→image top-10
  query, with the vectors stored as float32 (exact) and as float16 (the service's default ``retrieval.storage``);
  the vectors are random unit vectors: a flat index's time does not depend on what they hold;
* ``POST /v1/retrieve`` text→image top 10 through the service (gateway + one replica, 1 CPU; cross-request
  batching on, as by default, and off; and off without the gateway, the replica as the ingress) over the same two
  collections, each swapped in as a new revision of the
  served collection, at concurrency 1 and 8, beside the same work called in process (text embedding + search) and
  the no-op Serve endpoint (the machine's HTTP + Serve floor). Every query is a different text: a repeated one would
  be answered from the text tower's cache.

It starts an embedded graph server of its own and a fresh og-clip-tiny bundle (as ``bench/serve.py`` does). The
HTTP client runs on the same machine as the service; figures from different machines are not comparable.

    python bench/retrieval.py [--items 10000 100000] [--build-images 1024] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve import CLASS_SET, TOKEN, bundle_with_classes, load, noop_app, start_graph, start_serve

QUERY = "a large grey warship with a destroyer hull silhouette"


def query_texts(count: int) -> list[str]:
    """Distinct query texts: a repeated text would be answered from the text tower's cache."""
    return [f"{QUERY}, seen from view {i}" for i in range(count)]


def _unit(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_rates(bundle: Any, images: int, folder: Path) -> dict[str, float]:
    """images/s of the index encoder in process and of the Ray Data job, on ``images`` renders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ogclip.synth import TargetClass, render
    from ogclip_jobs.config import IndexBuildConfig
    from ogclip_jobs.data.images import png_bytes
    from ogclip_jobs.index import EncodeForIndex, run_index_build

    target = TargetClass("bench", "military aircraft", "swept wing", "grey")
    samples = [render(target, seed=i, size=64) for i in range(images)]
    rows = {"id": [f"r{i}" for i in range(images)], "image": [png_bytes(s.image) for s in samples],
            "mask": [png_bytes(s.mask) for s in samples], "label": ["bench"] * images,
            "caption": [f"a grey aircraft, render {i}." for i in range(images)]}
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.table(rows), folder / "shards" / "part-0.parquet")
    torch.set_num_threads(1)  # as one encoder actor of 1 CPU
    encoder = EncodeForIndex(str(bundle.path))
    batch = {k: np.asarray(v, dtype=object) for k, v in rows.items()}
    encoder({k: v[:128] for k, v in batch.items()})  # warm-up
    started = time.perf_counter()
    for start in range(0, images, 128):
        encoder({k: v[start:start + 128] for k, v in batch.items()})
    direct = images / (time.perf_counter() - started)
    torch.set_num_threads(os.cpu_count() or 1)
    result = run_index_build(IndexBuildConfig(bundle=bundle.path, data=folder / "shards",
                                              output_dir=folder / "collection", encoders=1, cpus_per_encoder=1.0),
                             log=print)
    return {"direct_images_per_s": direct, "job_images_per_s": result["images_per_s"],
            "job_over_direct": result["images_per_s"] / direct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000], help="collection sizes")
    parser.add_argument("--build-images", type=int, default=1024, help="renders indexed for the build rate")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level and size")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/retrieval.json"))
    args = parser.parse_args()

    from ray import serve

    from ogclip.collection import write_collection
    from ogclip_serve.app import build_app
    from ogclip_serve.config import (
        GatewayConfig,
        ServeAutoscalingConfig,
        ServeBatchingConfig,
        ServeClassesConfig,
        ServeConfig,
        ServeDeploymentConfig,
        ServeRetrievalConfig,
    )
    from ogclip_serve.index import VectorIndex

    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}}
    rng = np.random.default_rng(0)
    with ExitStack() as stack:
        home, settings, store = start_graph(stack)
        model, bundle, _, _ = bundle_with_classes(store, home, 100)
        dims = model.dims
        full = dims[-1]
        port = start_serve(stack, home, settings)  # Ray first: the index build job runs on it too
        report["build"] = build_rates(bundle, args.build_images, home / "build")

        # -- in process: text embedding + search, and search alone per size ------------------------------------
        torch.set_num_threads(1)  # as a replica with one CPU
        collections = {count: (_unit(rng, count, full), _unit(rng, count, full)) for count in args.items}
        report["search_us_per_query"], report["direct"] = {}, {}
        queries = _unit(rng, 200, full)
        for count, (images, _) in collections.items():
            for storage in ("float32", "float16"):
                index = VectorIndex(images, dims, float16=storage == "float16")
                per_dim = {}
                for dim in dims:
                    index.search(queries[:4], dim, 10)
                    started = time.perf_counter()
                    for q in queries:
                        index.search(q[None], dim, 10)
                    per_dim[dim] = (time.perf_counter() - started) / len(queries) * 1e6
                report["search_us_per_query"][f"{count} items, {storage}"] = per_dim
            served = VectorIndex(images, dims, float16=ServeRetrievalConfig().storage == "float16")  # as served
            latencies = []
            for text in query_texts(args.requests):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    query = model.text_features([f"{text} ({count})"]).float().numpy()
                served.search(query, full, 10)
                latencies.append((time.perf_counter() - t0) * 1000)
            report["direct"][count] = {"p50_ms": statistics.median(latencies)}
        torch.set_num_threads(os.cpu_count() or 1)

        # -- through the service: each size a new revision of the served collection --------------------------------
        folder = home / "served-collection"
        ids = {count: [f"item-{i}" for i in range(count)] for count in args.items}
        first = args.items[0]
        write_collection(folder, bundle.model_version, ids[first], ["bench"] * first, ["a caption."] * first,
                         *collections[first])
        deployment = ServeDeploymentConfig(num_cpus=1.0, autoscaling=ServeAutoscalingConfig(
            min_replicas=1, max_replicas=1), max_ongoing_requests=64, max_queued_requests=512)
        unbatched = ServeBatchingConfig(enabled=False)
        modes = {"batched": (ServeBatchingConfig(), True), "unbatched": (unbatched, True),
                 "no-gateway": (unbatched, False)}
        for mode, (batching, gateway) in modes.items():
            cfg = ServeConfig(bundle=bundle.path, app_name=mode, port=port, batching=batching,
                              classes=ServeClassesConfig(class_sets=[CLASS_SET]),
                              retrieval=ServeRetrievalConfig(collection=folder, poll_interval_s=0.5),
                              deployment=deployment.model_copy(update={"name": f"retriever-{mode}"}),
                              gateway=GatewayConfig(enabled=gateway))
            serve.run(build_app(cfg), name=mode, route_prefix=f"/{mode}")
        serve.run(noop_app(), name="noop", route_prefix="/noop")
        payloads = [{"text": text, "top_k": 10} for text in query_texts(args.requests)]
        report["serve"], report["noop"] = {}, {}
        for count in args.items:
            if count != first:
                revision = write_collection(folder, bundle.model_version, ids[count], ["bench"] * count,
                                            ["a caption."] * count, *collections[count])
                for mode in modes:
                    _wait_for(f"http://127.0.0.1:{port}/{mode}/v1/retrieve", payloads[0], revision)
            for mode in modes:
                url = f"http://127.0.0.1:{port}/{mode}/v1/retrieve"
                asyncio.run(load(url, payloads[:50], 2, 50))  # warm-up
                report["serve"][f"{mode}, {count} items"] = {
                    c: asyncio.run(load(url, [{**p, "text": f"{p['text']} ({count}, {c})"} for p in payloads], c,
                                        args.requests)) for c in (1, 8)}
        noop = f"http://127.0.0.1:{port}/noop/"
        asyncio.run(load(noop, payloads[:50], 2, 50))
        report["noop"] = {c: asyncio.run(load(noop, payloads, c, args.requests)) for c in (1, 8)}

    build = report["build"]
    print(f"\nindex build (og-clip-tiny, 64-px renders with masks and captions, {args.build_images} images): encoder "
          f"in process {build['direct_images_per_s']:.0f} images/s, Ray Data job {build['job_images_per_s']:.0f} "
          f"images/s ({build['job_over_direct']:.2f}× of the encoder alone, start-up included)")
    print("faiss flat search, µs per text→image top-10 query:")
    for name, per_dim in report["search_us_per_query"].items():
        print(f"    {name}: " + " ".join(f"d={d} {us:.0f}" for d, us in per_dim.items()))
    print(f"\nPOST /v1/retrieve, text → top 10, full dim ({args.requests} requests per row):")
    print(f"{'':<30}{'conc.':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, levels in report["serve"].items():
        for concurrency, r in levels.items():
            print(f"{f'serve {name}':<30}{concurrency:>6}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['errors']:>8}")
    for concurrency, r in report["noop"].items():
        print(f"{'serve floor (no-op)':<30}{concurrency:>6}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['errors']:>8}")
    for count, r in report["direct"].items():
        print(f"{f'direct, {count} items':<30}{1:>6}{'':>9}{r['p50_ms']:>9.1f}")
        for mode in modes:
            p50 = report["serve"][f"{mode}, {count} items"][1]["p50_ms"]
            print(f"    {mode}: service p50 {p50:.1f} ms = direct + {p50 - r['p50_ms']:.1f} ms; "
                  f"{p50 / report['noop'][1]['p50_ms']:.1f}× the floor's p50")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten to {args.output}")


def _wait_for(url: str, payload: dict[str, Any], revision: str, timeout_s: float = 60.0) -> None:
    """Poll until the service answers from ``revision``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = requests.post(url, json=payload, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        if body.get("collection_revision") == revision:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the service did not swap in revision {revision} within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
