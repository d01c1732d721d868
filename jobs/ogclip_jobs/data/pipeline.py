"""The curation pipeline runner: each stage reads the previous stage's Parquet output and writes its own.

Stages: ``ingest`` → ``dedup`` → ``quality`` → ``masks`` → ``captions`` → ``shards``. A stage writes into
``stages/<name>.partial`` and, once everything is written, renames it to ``stages/<name>`` and records
``stages/<name>/_STAGE.json`` (rows, seconds, metrics). A finished stage is never run again (a no-op on re-run);
an interrupted one leaves only a ``.partial`` folder, which the next run deletes and redoes: nothing is lost and
nothing is written twice. Each stage can also run alone (``--stage``) once its input exists.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import Dataset
from ray.data.expressions import col

from ogclip.synth import TargetClass, spread_classes
from ogclip_jobs.config import DataPipelineConfig, StageResources
from ogclip_jobs.data import stages
from ogclip_jobs.data.images import hamming
from ogclip_jobs.runtime import ensure_ray, open_graph

_log = logging.getLogger(__name__)

STAGES = ("ingest", "dedup", "quality", "masks", "captions", "shards")
# Ray Data's reads, writes, filters and column selections ask for a whole CPU by default; beside a stage's actor on
# a small Ray (1 or 2 CPUs) that starves them and the job hangs, so they ask for a quarter.
LIGHT = {"num_cpus": 0.25}
MARKER = "_STAGE.json"


class StageError(RuntimeError):
    """A stage cannot run (missing input, bad configuration)."""


def _map(ds: Dataset, fn: Any, resources: StageResources, **kwargs: Any) -> Dataset:
    """``map_batches`` with a stage's resources, ``concurrency`` of them at once. A class (a stage that loads a
    model) runs in a pool of actors, each constructed once with ``kwargs``; a function or a callable instance
    (weight-free work) runs as tasks, in the worker processes Ray keeps warm, where an actor pool would start a
    process, and import torch in it, for every stage."""
    options: dict[str, Any] = {"batch_size": resources.batch_size, "num_cpus": resources.num_cpus,
                               "batch_format": "numpy"}
    if resources.num_gpus:
        options["num_gpus"] = resources.num_gpus
    if isinstance(fn, type):
        options.update(compute=ray.data.ActorPoolStrategy(size=resources.concurrency), fn_constructor_kwargs=kwargs)
    else:
        options["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
    return ds.map_batches(fn, **options)


class Pipeline:
    """One run of the pipeline over ``cfg``; ``classes`` are the graph's class facts keyed by class key."""

    def __init__(self, cfg: DataPipelineConfig, classes: dict[str, dict[str, Any]],
                 log: Callable[[str], None] = _log.info) -> None:
        self.cfg, self.classes, self.log = cfg, classes, log
        self.root = cfg.output_dir / "stages"

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def done(self, name: str) -> dict[str, Any] | None:
        marker = self.root / name / MARKER
        return json.loads(marker.read_text()) if marker.exists() else None

    def _input_folder(self, name: str) -> Path:
        previous = STAGES[STAGES.index(name) - 1]
        if not self.done(previous):
            raise StageError(f"stage {name!r} needs the output of {previous!r}; run that stage first")
        return self.root / previous

    def _input(self, name: str) -> Dataset:
        return ray.data.read_parquet(str(self._input_folder(name)), **LIGHT)

    def run(self, only: str | None = None) -> dict[str, dict[str, Any]]:
        """Run every unfinished stage (or only ``only``); returns each stage's record."""
        # A Ray started elsewhere (tests, benchmarks) gets the same reader setting as ensure_ray's.
        ray.data.DataContext.get_current().use_datasource_v2 = False
        records = {}
        for name in STAGES if only is None else (only,):
            record = self.done(name)
            if record is not None:
                self.log(f"[{name}] already done: {record['rows']} rows (skipped)")
            else:
                record = self._run_stage(name)
            records[name] = record
        return records

    def _run_stage(self, name: str) -> dict[str, Any]:
        partial = self.root / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted run
        partial.mkdir(parents=True)
        started = time.perf_counter()
        metrics = getattr(self, f"_stage_{name}")(partial)
        duplicated = _repeated_ids(partial / "parquet" if name == "shards" else partial)
        if duplicated:
            raise StageError(f"stage {name!r} wrote {len(duplicated)} ids more than once (e.g. {duplicated[0]!r}): "
                             "every row's id must be unique")
        record = {"stage": name, "seconds": round(time.perf_counter() - started, 2), **metrics}
        (partial / MARKER).write_text(json.dumps(record, indent=2))
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        self.log(f"[{name}] done in {record['seconds']}s: " + ", ".join(
            f"{k} {v}" for k, v in metrics.items() if not isinstance(v, (dict, list))))
        return record

    @staticmethod
    def _write(ds: Dataset, out: Path) -> int:
        ds.write_parquet(str(out), ray_remote_args=LIGHT)
        return _rows_written(out)

    def _pass_through(self, name: str, out: Path) -> int:
        """A stage that changes nothing (switched off): its input's files, copied as they are."""
        for file in sorted(self._input_folder(name).glob("*.parquet")):
            shutil.copyfile(file, out / file.name)
        return _rows_written(out)

    # -- stages ------------------------------------------------------------------------------------------------

    def _stage_ingest(self, out: Path) -> dict[str, Any]:
        source = self.cfg.source
        resources = source.resources
        if source.kind == "synth":
            targets = {key: TargetClass.from_facts(row) for key, row in self.classes.items()}
            keys = spread_classes(targets, source.max_classes, source.seed)
            items = [{"label": key, "index": i} for key in keys for i in range(source.per_class)]
            ds = _map(ray.data.from_items(items), stages.RenderTargets({k: targets[k] for k in keys},
                                                                        source.image_size, source.seed), resources)
        elif source.kind in ("folder", "webdataset"):
            tars = source.kind == "webdataset"
            files = ray.data.read_binary_files(str(source.path), include_paths=True, **LIGHT,
                                               file_extensions=["tar"] if tars else None)
            ds = _map(files, stages.read_tar_rows if tars else stages.read_folder_rows, resources)
        elif source.kind == "crawl":
            log_dir = self.cfg.output_dir / "review" / "fetch_logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            ds = ray.data.from_items(stages.read_manifest(source.manifest)).groupby("host").map_groups(
                stages.crawl_host_rows, fn_kwargs={"config": source.crawl, "log_dir": str(log_dir)},
                batch_format="numpy", num_cpus=resources.num_cpus)
        else:
            ds = ray.data.read_parquet(str(source.path), **LIGHT).map_batches(
                _parquet_rows, fn_kwargs={"source": source}, batch_format="numpy", **LIGHT)
        ds = _map(ds, stages.DecodeCheck(), resources)
        rows = self._write(ds, out)
        repeated = _repeated_ids(out)
        if repeated:
            # A source id names its content (a Parquet row's image hash) or its location (a file, a URL): rows that
            # repeat one are the same item again. Keep one of each, so every later stage can address rows by id.
            once = out.with_name(out.name + ".once")
            ray.data.read_parquet(str(out), **LIGHT).groupby("id").map_groups(
                _first_row, batch_format="pyarrow", **LIGHT).write_parquet(str(once), ray_remote_args=LIGHT)
            shutil.rmtree(out)
            once.rename(out)
        return {"rows": rows - len(repeated), "repeated_ids_dropped": len(repeated)}

    def _stage_dedup(self, out: Path) -> dict[str, Any]:
        if not self.cfg.dedup.enabled:
            return {"rows": self._pass_through("dedup", out), "removed": 0}
        ds = self._input("dedup")
        hashed = _map(ds, stages.HashImages(), self.cfg.dedup.resources).materialize()
        keys = hashed.select_columns(["id", "sha256", "dhash"], **LIGHT).take_all()
        keep = _dedup_keep(keys, self.cfg.dedup.max_hamming)
        kept = hashed.filter(expr=col("id").is_in(sorted(keep)), **LIGHT)
        kept = kept.drop_columns(["sha256", "dhash"], **LIGHT)
        rows = self._write(kept, out)
        return {"rows": rows, "removed": len(keys) - rows}

    def _stage_quality(self, out: Path) -> dict[str, Any]:
        q = self.cfg.quality
        if not q.enabled:
            return {"rows": self._pass_through("quality", out), "outliers": 0,
                    "filter": "off (quality.enabled is false)"}
        if not Path(q.model).is_dir():
            # A registry name builds fresh random weights: DBSCAN over their embeddings clusters pixel statistics,
            # not content, so its "outliers" would be noise. Until a trained bundle is configured the stage passes
            # every row through and its record and log line say so (no ``outliers`` count: nothing was assessed).
            from ogclip.models import list_models

            if q.model not in list_models():
                raise StageError(f"quality.model {q.model!r} is neither an export bundle folder nor a registered "
                                 "architecture")
            return {"rows": self._pass_through("quality", out),
                    "filter": f"off (pass-through): quality.model {q.model!r} is a registry name with untrained "
                              "weights; set it to a trained export bundle for the filter to act"}
        embedded = _map(self._input("quality"), stages.EmbedImages, q.resources, model=q.model).materialize()
        points = embedded.select_columns(["id", "label", "embedding"], **LIGHT).take_all()
        outliers = find_outliers(points, q.eps, q.min_samples)
        review = self.cfg.output_dir / "review" / "quality_outliers.jsonl"
        review.parent.mkdir(parents=True, exist_ok=True)
        review.write_text("".join(json.dumps(o) + "\n" for o in outliers))
        flagged = {o["id"] for o in outliers}
        kept = embedded.drop_columns(["embedding"], **LIGHT)
        if q.drop_outliers:
            kept = kept.filter(expr=col("id").not_in(sorted(flagged)), **LIGHT)
        rows = self._write(kept, out)
        return {"rows": rows, "outliers": len(outliers), "review_file": str(review),
                "filter": f"on (bundle {q.model}, outliers {'dropped' if q.drop_outliers else 'flagged only'})"}

    def _stage_masks(self, out: Path) -> dict[str, Any]:
        ds = self._input("masks")
        m = self.cfg.masks
        if m.method == "provided":
            # Summed here, one small count per batch: Ray Data's global aggregate (`.sum`) starts a hash shuffle
            # whose fixed cost is ~40 s on 2 cores.
            missing = sum(int(batch["missing"].sum()) for batch in ds.map_batches(
                _missing_masks, batch_format="numpy", **LIGHT).iter_batches(batch_size=None, batch_format="numpy"))
            if missing:
                raise StageError(f"{missing} rows have no mask; use masks.method 'cpu' or 'sam2'")
            return {"rows": self._write(ds, out)}
        if m.method == "cpu":
            ds = _map(ds, stages.CpuSegmenter(), m.resources)
        else:
            ds = _map(ds, stages.Sam2Masker, m.resources, checkpoint=str(m.sam2_checkpoint), config=m.sam2_config,
                      prompt=m.prompt, device=m.device)
        ds = ds.materialize()
        ious = [r["mask_iou"] for r in ds.select_columns(["mask_iou"], **LIGHT).take_all() if r["mask_iou"] is not None]
        rows = self._write(ds.drop_columns(["mask_iou"], **LIGHT), out)
        return {"rows": rows, "mask_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
                "mask_iou_n": len(ious)}

    def _stage_captions(self, out: Path) -> dict[str, Any]:
        ds = self._input("captions")
        c = self.cfg.captions
        if c.method == "template":
            ds = _map(ds, stages.TemplateCaptioner(self.classes, c.seed), c.resources)
        else:
            ds = _map(ds, stages.VlmCaptioner, c.resources, model_path=str(c.vlm_model_path),
                      classes=self.classes, max_tokens=c.max_tokens)
        return {"rows": self._write(ds, out)}

    def _stage_shards(self, out: Path) -> dict[str, Any]:
        ds = self._input("shards").drop_columns(["mask_truth"], **LIGHT)
        rows = _rows_written(self._input_folder("shards"))
        metrics: dict[str, Any] = {"rows": rows}
        if "parquet" in self.cfg.writer.formats:
            ds.write_parquet(str(out / "parquet"), min_rows_per_file=self.cfg.writer.rows_per_shard,
                             ray_remote_args=LIGHT)
            metrics["rows"] = _rows_written(out / "parquet")
        if "webdataset" in self.cfg.writer.formats:
            (out / "webdataset").mkdir()
            written = ds.repartition(max(1, -(-rows // self.cfg.writer.rows_per_shard))).map_batches(
                _TarWriter(str(out / "webdataset")), batch_size=None, num_cpus=0.5, batch_format="numpy").take_all()
            metrics["tars"] = len(written)
        return metrics


def _repeated_ids(folder: Path) -> list[str]:
    """The ids a stage output holds more than once (one entry per extra copy), read from its id column only."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for file in sorted(folder.rglob("*.parquet")):
        for value in pq.read_table(file, columns=["id"]).column("id").to_pylist():
            counts[value] = counts.get(value, 0) + 1
    return [key for key, n in sorted(counts.items()) for _ in range(n - 1)]


def _rows_written(folder: Path) -> int:
    """The rows of the Parquet files under ``folder``, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in folder.rglob("*.parquet"))


def _first_row(group: Any) -> Any:
    """The first row of a group of rows sharing an id."""
    return group.slice(0, 1)


def _missing_masks(batch: dict[str, Any]) -> dict[str, Any]:
    """How many rows of a batch have no mask (one count per batch, summed by the caller)."""
    return {"missing": np.asarray([sum(not stages.present(mask) for mask in batch["mask"])])}


def _parquet_rows(batch: dict[str, Any], source: Any) -> dict[str, Any]:
    n = len(batch[source.image_column])
    labels = [str(v) for v in batch[source.label_column]]
    captions = batch.get(source.caption_column, [None] * n)
    return {
        "id": [f"parquet-{stages.sha256(bytes(img))[:16]}" for img in batch[source.image_column]],
        "image": list(batch[source.image_column]), "mask": [None] * n, "mask_truth": [None] * n,
        "label": labels, "class_name": labels, "super_category": [None] * n,
        "caption": [None if c is None else str(c) for c in captions],
        "provenance": [json.dumps({"source": "parquet", "path": str(source.path)})] * n,
    }


def _dedup_keep(rows: list[dict[str, Any]], max_hamming: int) -> set[str]:
    """Keep the first row (by id) of each exact or near-duplicate group.

    Near duplicates are found with a banded index over the 64-bit dHash: two hashes within ``max_hamming`` bits
    share at least one of ``max_hamming + 1`` bands exactly (pigeonhole), so only rows sharing a band are compared.
    """
    bands = max_hamming + 1
    width = 64 // bands
    index: dict[tuple[int, int], list[int]] = {}
    seen_sha: set[str] = set()
    kept_hashes: list[int] = []
    keep = set()
    for row in sorted(rows, key=lambda r: r["id"]):
        if row["sha256"] in seen_sha:
            continue
        value = int(row["dhash"]) & ((1 << 64) - 1)
        keys = [(b, (value >> (b * width)) & ((1 << width) - 1)) for b in range(bands)]
        if max_hamming and any(hamming(value, kept_hashes[i]) <= max_hamming for k in keys for i in index.get(k, ())):
            continue
        seen_sha.add(row["sha256"])
        for k in keys:
            index.setdefault(k, []).append(len(kept_hashes))
        kept_hashes.append(value)
        keep.add(row["id"])
    return keep


def find_outliers(points: list[dict[str, Any]], eps: float, min_samples: int) -> list[dict[str, Any]]:
    """DBSCAN (cosine distance) within each category; noise points are outliers, scored by their cosine distance
    to the category's mean embedding (higher = further from the rest)."""
    from sklearn.cluster import DBSCAN  # here, not at the top: every Ray worker of the pipeline imports this module

    by_label: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_label.setdefault(point["label"], []).append(point)
    outliers = []
    for label, members in sorted(by_label.items()):
        if len(members) <= min_samples:
            continue
        embeddings = np.stack([np.asarray(m["embedding"], dtype=np.float32) for m in members])
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-9)
        assignment = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(embeddings)
        centre = embeddings.mean(0)
        centre /= max(np.linalg.norm(centre), 1e-9)
        for member, cluster, emb in zip(members, assignment, embeddings, strict=True):
            if cluster == -1:
                outliers.append({"id": member["id"], "label": label,
                                 "score": round(float(1.0 - emb @ centre), 4)})
    return sorted(outliers, key=lambda o: -o["score"])


class _TarWriter:
    """Write one WebDataset tar per batch (open_clip reads ``png`` + ``txt``; masks and metadata ride along), named
    by its ids, so a retried task rewrites the same file."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = [str(i) for i in batch["id"]]
        name = self.folder / f"shard-{stages.sha256(''.join(sorted(ids)).encode())[:12]}.tar"
        with tarfile.open(name, "w") as tar:
            for i, key in enumerate(ids):
                # WebDataset's sample key is the member name up to its first dot, and a slash makes a folder:
                # percent-encode both (and %) so that every id keeps a key of its own, decodable back to the id.
                safe = urllib.parse.quote(key, safe="").replace(".", "%2E")
                meta = {"id": key, "label": batch["label"][i], "class_name": batch["class_name"][i],
                        "super_category": batch["super_category"][i], "provenance": batch["provenance"][i]}
                parts = {"png": bytes(batch["image"][i]), "txt": str(batch["caption"][i] or "").encode(),
                         "json": json.dumps(meta).encode()}
                if stages.present(batch["mask"][i]):
                    parts["mask.png"] = bytes(batch["mask"][i])
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{safe}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return {"tar": [str(name)], "samples": [len(ids)]}


def load_classes(cfg: DataPipelineConfig) -> dict[str, dict[str, Any]]:
    """The graph's class facts for the source's classes (synthetic: the configured class set; else all)."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    with open_graph() as store:
        class_set = cfg.source.class_set if cfg.source.kind == "synth" else "train"
        keys = [r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key=class_set)]
        if cfg.source.kind != "synth":
            keys += [r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key="test")]
        return {row["key"]: row for row in fetch_class_facts(store, keys)}


def run_pipeline(cfg: DataPipelineConfig, only: str | None = None, log: Callable[[str], None] = _log.info
                 ) -> dict[str, dict[str, Any]]:
    """Start local Ray if needed, fetch the class facts from the graph, and run the stages."""
    if only is not None and only not in STAGES:
        raise StageError(f"unknown stage {only!r}; stages: {', '.join(STAGES)}")
    ensure_ray(cfg.ray_num_cpus)
    records = Pipeline(cfg, load_classes(cfg), log).run(only)
    (cfg.output_dir / "pipeline.json").write_text(json.dumps(records, indent=2))
    return records
