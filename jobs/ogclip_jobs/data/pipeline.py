"""The curation pipeline runner.

Stages: ``ingest`` → ``dedup`` → ``quality`` → ``masks`` → ``captions`` → ``shards``. Each of the first five has
two parts: its work on each row (render or read, hash, embed, segment, caption), which Ray Data runs block by
block, and a decision that needs every row (drop a source id's repeats, keep one image of each duplicate group, flag
or drop outliers, check masks), taken in the driver on the small columns the row work leaves (ids, hashes,
embeddings) once every block is written.

A full run is one streaming Ray Data execution: the row work of every stage chained in one job (operators fused
where Ray Data can fuse them, each model-loading stage's actor pool started once), each block written as it
finishes into ``stages/stream.partial``; then the decisions; then ``stages/shards``, the rows every decision kept,
in a second execution. A killed run keeps the blocks it wrote: the next run reads their ids and streams only the
rows not written yet, so nothing is lost or written twice (a file cut short by the kill is dropped and its rows
redone). ``stages/stream`` keeps every row with every stage's columns (hashes, embeddings, the source's mask
beside the predicted one) and ``stages/stream/_STAGE.json`` each stage's record (what its decision dropped): every
stage's output is recoverable from it.

A stage can also run alone (``--stage NAME``): its row work on the previous stage's output (``stages/<previous>``,
the source for ``ingest``) and its decision, written as ``stages/<name>``, resumable the same way. A full run
after some stages ran alone streams from the first stage not done. A finished stage, stream or shards folder has
its ``_STAGE.json`` and is never run again (a no-op on re-run).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
import urllib.parse
import uuid
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
ROW_STAGES = STAGES[:-1]
STREAM = "stream"
# A random key per row, so that rows repeating a source id stay apart until ingest's decision keeps one of them.
ROW_KEY = "_row"
# What the row work adds for the decisions: dropped from a stage's output and from the shards.
DECISION_COLUMNS = (ROW_KEY, "sha256", "dhash", "embedding", "mask_iou", "mask_missing")
# Ray Data's reads, writes, filters and column selections ask for a whole CPU by default; beside a stage's actor on
# a small Ray (1 or 2 CPUs) that starves them and the job hangs, so they ask for a quarter.
LIGHT = {"num_cpus": 0.25}
MARKER = "_STAGE.json"
# What a folder of rows was written for (its stages and their settings): a resumed run keeps its blocks only if
# that is unchanged. Resources and where the shards go do not change a row.
PLAN = "_PLAN.json"
_NOT_IN_PLAN = {"output_dir": True, "ray_num_cpus": True, "writer": True,
                **{section: {"resources"} for section in ("source", "dedup", "quality", "masks", "captions")}}


class StageError(RuntimeError):
    """A stage cannot run (missing input, bad configuration, rows that break its rule)."""


def _map(ds: Dataset, fn: Any, resources: StageResources, **kwargs: Any) -> Dataset:
    """``map_batches`` with a stage's resources, up to ``concurrency`` of them at once. A class (a stage that loads a
    model) runs in a pool of actors, each constructed once with ``kwargs``; the pool starts with one and grows to
    ``concurrency`` while blocks wait for it (an actor's start, a process importing and loading the model, costs a
    core for seconds: a short run pays for one). A function or a callable instance (weight-free work) runs as
    tasks, in the worker processes Ray keeps warm, where an actor pool would start a process, and import torch in
    it, for every stage."""
    options: dict[str, Any] = {"batch_size": resources.batch_size, "num_cpus": resources.num_cpus,
                               "batch_format": "numpy"}
    if resources.num_gpus:
        options["num_gpus"] = resources.num_gpus
    if isinstance(fn, type):
        options.update(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources.concurrency),
                       fn_constructor_kwargs=kwargs)
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

    def _skipped(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        self.log(f"[{name}] already done: {record['rows']} rows (skipped)")
        return record

    def run(self, only: str | None = None) -> dict[str, dict[str, Any]]:
        """Run every unfinished stage (or only ``only``, alone); returns each stage's record."""
        # A Ray started elsewhere (tests, benchmarks) gets the same reader setting as ensure_ray's.
        ray.data.DataContext.get_current().use_datasource_v2 = False
        self._quality_acts()  # a bad quality.model fails here, before anything runs
        if only is not None:
            record = self.done(only)
            return {only: self._skipped(only, record) if record else self._alone(only)}
        records = {}
        for name in ROW_STAGES:  # stages run alone before: their outputs stand
            record = self.done(name)
            if record is None:
                break
            records[name] = self._skipped(name, record)
        pending = [name for name in ROW_STAGES if name not in records]
        stream = self.done(STREAM) if pending else None
        keep = None  # the stream's decisions, when this run took them
        if stream is not None and list(stream["stages"]) == pending:
            for name in pending:
                records[name] = self._skipped(name, stream["stages"][name])
        elif pending:
            keep, streamed = self._stream(pending)
            records.update(streamed)
        record = self.done("shards")
        records["shards"] = self._skipped("shards", record) if record else self._shards(
            self.root / (STREAM if pending else ROW_STAGES[-1]), pending, keep)
        return records

    def _finish(self, name: str, partial: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Check that ``partial`` holds every id once (the stream may repeat a source's ids: ingest's decision
        keeps one), record it and rename it into place."""
        duplicated = [] if name == STREAM else _repeated_ids(partial / "parquet" if name == "shards" else partial)
        if duplicated:
            raise StageError(f"{name!r} wrote {len(duplicated)} ids more than once (e.g. {duplicated[0]!r}): "
                             "every row's id must be unique")
        (partial / MARKER).write_text(json.dumps(record, indent=2))
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        return record

    def _log_record(self, name: str, record: dict[str, Any]) -> None:
        self.log(f"[{name}] done" + (f" in {record['seconds']}s" if "seconds" in record else "") + ": " + ", ".join(
            f"{k} {v}" for k, v in record.items() if k not in ("stage", "seconds") and not isinstance(v, (dict, list))))

    # -- the two ways to run the row stages --------------------------------------------------------------------

    def _stream(self, names: list[str]) -> tuple[set[str], dict[str, dict[str, Any]]]:
        """``names`` (the row stages from the first not done on) as one streaming execution, then their decisions:
        the keys of the rows kept and each stage's record."""
        partial = self.root / f"{STREAM}.partial"
        started = time.perf_counter()
        self._write_rows(names, partial)
        keep, records = self._decide(names, partial)
        seconds = round(time.perf_counter() - started, 2)
        for name in names:
            records[name] = {"stage": name, "streamed": seconds, **records[name]}
            self._log_record(name, records[name])
        self.log(f"[{STREAM}] {' → '.join(names)} in one execution: {seconds}s")
        self._finish(STREAM, partial, {"stage": STREAM, "seconds": seconds, "rows": _rows_written(partial),
                                       "stages": records})
        return keep, records

    def _alone(self, name: str) -> dict[str, Any]:
        """One row stage alone: its row work into ``stages/<name>.rows``, then its decision's rows, without the
        decision columns, into ``stages/<name>``."""
        if name == "shards":
            stream = self.done(STREAM)
            return self._shards(self.root / STREAM, list(stream["stages"])) if stream else self._shards(
                self._input_folder(name), [])
        rows = self.root / f"{name}.rows"
        started = time.perf_counter()
        self._write_rows([name], rows)
        keep, records = self._decide([name], rows)
        partial = self.root / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self._kept(rows, keep).write_parquet(str(partial), ray_remote_args=LIGHT)
        record = self._finish(name, partial, {"stage": name, "seconds": round(time.perf_counter() - started, 2),
                                              **records[name]})
        shutil.rmtree(rows)
        self._log_record(name, record)
        return record

    def _input_folder(self, name: str) -> Path:
        previous = STAGES[STAGES.index(name) - 1]
        if not self.done(previous):
            raise StageError(f"stage {name!r} needs the output of {previous!r}; run that stage first")
        return self.root / previous

    def _write_rows(self, names: list[str], out: Path) -> None:
        """The row work of ``names`` (consecutive row stages) in one execution, written block by block into
        ``out``; rows whose id ``out`` already holds (a killed run's blocks) are not redone."""
        plan = out / PLAN
        settings = {"stages": names, "config": self.cfg.model_dump(mode="json", exclude=_NOT_IN_PLAN)}
        if plan.exists() and json.loads(plan.read_text()) != settings:
            self.log(f"[{names[0]}] {out.name} was written for other stages or settings: starting it again")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        plan.write_text(json.dumps(settings))
        written = _written_ids(out)
        if written:
            self.log(f"[{names[0]}] resuming: {len(written)} rows already written")
        ds = self._source(written) if names[0] == "ingest" else ray.data.read_parquet(
            str(self._input_folder(names[0])), **LIGHT)
        if ds is None:  # every row of the source was written before
            return
        if written and names[0] != "ingest":
            ds = ds.filter(expr=col("id").not_in(sorted(written)), **LIGHT)
        for name in names:
            ds = self._row_work(name, ds)
        ds.write_parquet(str(out), ray_remote_args=LIGHT)

    def _kept(self, folder: Path, keep: set[str]) -> Dataset:
        """The rows of ``folder`` that the decisions kept, without the decision columns."""
        ds = ray.data.read_parquet(str(folder), **LIGHT)
        key = ROW_KEY if ROW_KEY in ds.schema().names else "id"
        ds = ds.filter(expr=col(key).is_in(sorted(keep)), **LIGHT)
        extra = [c for c in DECISION_COLUMNS if c in ds.schema().names]
        return ds.drop_columns(extra, **LIGHT) if extra else ds

    # -- the row work of each stage ----------------------------------------------------------------------------

    def _source(self, written: set[str]) -> Dataset | None:
        """The source's rows (ingest's row work), skipping ids already written (None: nothing left)."""
        source = self.cfg.source
        resources = source.resources
        if source.kind == "synth":
            targets = {key: TargetClass.from_facts(row) for key, row in self.classes.items()}
            keys = spread_classes(targets, source.max_classes, source.seed)
            items = [{"label": key, "index": i} for key in keys for i in range(source.per_class)
                     if stages.synth_id(key, i) not in written]
            # One block per batch, so that renders stream through the later stages (and are written, and resumed)
            # batch by batch, on every CPU, rather than as one block.
            if not items:
                return None
            blocks = -(-len(items) // resources.batch_size)
            render = stages.RenderTargets({k: targets[k] for k in keys}, source.image_size, source.seed)
            ds = _map(ray.data.from_items(items, override_num_blocks=blocks), render, resources)
        elif source.kind in ("folder", "webdataset"):
            tars = source.kind == "webdataset"
            files = ray.data.read_binary_files(str(source.path), include_paths=True, **LIGHT,
                                               file_extensions=["tar"] if tars else None)
            ds = _map(files, stages.read_tar_rows if tars else stages.read_folder_rows, resources)
        elif source.kind == "crawl":
            log_dir = self.cfg.output_dir / "review" / "fetch_logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            entries = [e for e in stages.read_manifest(source.manifest) if stages.crawl_id(e["url"]) not in written]
            if not entries:
                return None
            ds = ray.data.from_items(entries).groupby("host").map_groups(
                stages.crawl_host_rows, fn_kwargs={"config": source.crawl, "log_dir": str(log_dir)},
                batch_format="numpy", num_cpus=resources.num_cpus)
        else:
            ds = ray.data.read_parquet(str(source.path), **LIGHT).map_batches(
                _parquet_rows, fn_kwargs={"source": source}, batch_format="numpy", **LIGHT)
        if written and source.kind not in ("synth", "crawl"):
            ds = ds.filter(expr=col("id").not_in(sorted(written)), **LIGHT)
        return _map(ds, stages.DecodeCheck(), resources)

    def _row_work(self, name: str, ds: Dataset) -> Dataset:
        if name == "ingest":  # the source's resources, so that Ray Data fuses it with the decode check
            return _map(ds, _with_row_keys, self.cfg.source.resources)
        if name == "dedup":
            return _map(ds, stages.HashImages(), self.cfg.dedup.resources) if self.cfg.dedup.enabled else ds
        if name == "quality":
            q = self.cfg.quality
            return _map(ds, stages.EmbedImages, q.resources, model=q.model) if self._quality_acts() else ds
        if name == "masks":
            m = self.cfg.masks
            if m.method == "provided":
                return ds.map_batches(_mark_missing_masks, batch_format="numpy", **LIGHT)
            if m.method == "cpu":
                return _map(ds, stages.CpuSegmenter(), m.resources)
            return _map(ds, stages.Sam2Masker, m.resources, checkpoint=str(m.sam2_checkpoint), config=m.sam2_config,
                        prompt=m.prompt, device=m.device)
        c = self.cfg.captions
        if c.method == "template":
            return _map(ds, stages.TemplateCaptioner(self.classes, c.seed), c.resources)
        return _map(ds, stages.VlmCaptioner, c.resources, model_path=str(c.vlm_model_path), classes=self.classes,
                    max_tokens=c.max_tokens)

    def _quality_acts(self) -> bool:
        """Whether the quality filter assesses rows: only with a trained export bundle. A registry name builds
        fresh random weights, and DBSCAN over their embeddings would cluster pixel statistics, not content: until a
        bundle is configured the stage passes every row through and its record says so."""
        q = self.cfg.quality
        if not q.enabled or Path(q.model).is_dir():
            return q.enabled
        from ogclip.models import list_models

        if q.model not in list_models():
            raise StageError(f"quality.model {q.model!r} is neither an export bundle folder nor a registered "
                             "architecture")
        return False

    # -- the decisions -----------------------------------------------------------------------------------------

    def _decide(self, names: list[str], folder: Path) -> tuple[set[str], dict[str, dict[str, Any]]]:
        """Each of ``names``' decisions in stage order over the small columns of ``folder``: the keys of the rows
        kept (the row keys, or the ids where there are none) and each stage's record."""
        table = _read_columns(folder, ("id", ROW_KEY, "label", "sha256", "dhash", "embedding", "mask_iou",
                                       "mask_missing"))
        n = len(table["id"])
        keys = table.get(ROW_KEY, table["id"])
        alive = np.ones(n, dtype=bool)
        records: dict[str, dict[str, Any]] = {}
        for name in names:
            metrics: dict[str, Any] = {}
            if name == "ingest":
                first: dict[str, int] = {}
                for i in sorted(range(n), key=lambda i: keys[i]):  # one row per id: the least row key
                    first.setdefault(table["id"][i], i)
                alive[:] = False
                alive[list(first.values())] = True
                metrics["repeated_ids_dropped"] = n - len(first)
            elif name == "dedup":
                before = int(alive.sum())
                if self.cfg.dedup.enabled:
                    kept = _dedup_keep([{"id": table["id"][i], "sha256": table["sha256"][i],
                                         "dhash": table["dhash"][i]} for i in np.flatnonzero(alive)],
                                       self.cfg.dedup.max_hamming)
                    alive &= np.array([i in kept for i in table["id"]], dtype=bool)
                metrics["removed"] = before - int(alive.sum())
            elif name == "quality":
                metrics.update(self._quality_decision(table, alive))
            elif name == "masks":
                if self.cfg.masks.method == "provided":
                    missing = int(np.asarray(table["mask_missing"], dtype=bool)[alive].sum())
                    if missing:
                        raise StageError(f"{missing} rows have no mask; use masks.method 'cpu' or 'sam2'")
                else:
                    ious = [table["mask_iou"][i] for i in np.flatnonzero(alive) if table["mask_iou"][i] is not None]
                    metrics.update(mask_iou_mean=round(float(np.mean(ious)), 4) if ious else None,
                                   mask_iou_n=len(ious))
            records[name] = {"rows": int(alive.sum()), **metrics}
        return {str(keys[i]) for i in np.flatnonzero(alive)}, records

    def _quality_decision(self, table: dict[str, list[Any]], alive: np.ndarray) -> dict[str, Any]:
        q = self.cfg.quality
        if not q.enabled:
            return {"outliers": 0, "filter": "off (quality.enabled is false)"}
        if not self._quality_acts():
            return {"filter": f"off (pass-through): quality.model {q.model!r} is a registry name with untrained "
                              "weights; set it to a trained export bundle for the filter to act"}
        rows = np.flatnonzero(alive)
        outliers = find_outliers([{"id": table["id"][i], "label": table["label"][i],
                                   "embedding": table["embedding"][i]} for i in rows], q.eps, q.min_samples)
        review = self.cfg.output_dir / "review" / "quality_outliers.jsonl"
        review.parent.mkdir(parents=True, exist_ok=True)
        review.write_text("".join(json.dumps(o) + "\n" for o in outliers))
        if q.drop_outliers:
            flagged = {o["id"] for o in outliers}
            alive &= np.array([i not in flagged for i in table["id"]], dtype=bool)
        return {"outliers": len(outliers), "review_file": str(review),
                "filter": f"on (bundle {q.model}, outliers {'dropped' if q.drop_outliers else 'flagged only'})"}

    # -- shards ------------------------------------------------------------------------------------------------

    def _shards(self, folder: Path, names: list[str], keep: set[str] | None = None) -> dict[str, Any]:
        """The training shards: the rows of ``folder`` (the stream, or the last row stage run alone) that the
        decisions of ``names`` kept (``keep`` when this run has just taken them), as Parquet and WebDataset tars.
        An interrupted write is redone whole."""
        partial = self.root / "shards.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        started = time.perf_counter()
        if keep is None and names:
            keep = self._decide(names, folder)[0]
        ds = self._kept(folder, keep) if keep is not None else ray.data.read_parquet(str(folder), **LIGHT)
        ds = ds.drop_columns(["mask_truth"], **LIGHT).materialize()
        rows = ds.count()
        metrics: dict[str, Any] = {"rows": rows}
        if "parquet" in self.cfg.writer.formats:
            ds.write_parquet(str(partial / "parquet"), min_rows_per_file=self.cfg.writer.rows_per_shard,
                             ray_remote_args=LIGHT)
            metrics["rows"] = _rows_written(partial / "parquet")
        if "webdataset" in self.cfg.writer.formats:
            (partial / "webdataset").mkdir()
            written = ds.repartition(max(1, -(-rows // self.cfg.writer.rows_per_shard))).map_batches(
                _TarWriter(str(partial / "webdataset")), batch_size=None, num_cpus=0.5,
                batch_format="numpy").take_all()
            metrics["tars"] = len(written)
        record = self._finish("shards", partial, {"stage": "shards", "seconds": round(time.perf_counter() - started,
                                                                                        2), **metrics})
        self._log_record("shards", record)
        return record


def _repeated_ids(folder: Path) -> list[str]:
    """The ids a stage output holds more than once (one entry per extra copy), read from its id column only."""
    counts: dict[str, int] = {}
    for value in _read_columns(folder, ("id",))["id"]:
        counts[value] = counts.get(value, 0) + 1
    return [key for key, n in sorted(counts.items()) for _ in range(n - 1)]


def _rows_written(folder: Path) -> int:
    """The rows of the Parquet files under ``folder``, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in folder.rglob("*.parquet"))


def _written_ids(folder: Path) -> set[str]:
    """The ids of the rows already written into ``folder``; a file an interrupted run cut short (no footer) is
    deleted, so its rows are redone."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for file in sorted(folder.rglob("*.parquet")):
        try:
            ids.update(pq.read_table(file, columns=["id"]).column("id").to_pylist())
        except (OSError, ValueError) as exc:
            _log.warning("dropping %s, cut short by an interrupted run (%s): its rows are redone", file, exc)
            file.unlink()
    return ids


def _read_columns(folder: Path, columns: tuple[str, ...]) -> dict[str, list[Any]]:
    """Those of ``columns`` that the Parquet files under ``folder`` have, as lists (``id`` always)."""
    import pyarrow.parquet as pq

    out: dict[str, list[Any]] = {"id": []}
    for file in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(file, columns=[c for c in columns if c in pq.read_schema(file).names])
        for name in table.column_names:
            out.setdefault(name, []).extend(table.column(name).to_pylist())
    return out


def _with_row_keys(batch: dict[str, Any]) -> dict[str, Any]:
    batch[ROW_KEY] = np.array([uuid.uuid4().hex for _ in range(len(batch["id"]))])
    return batch


def _mark_missing_masks(batch: dict[str, Any]) -> dict[str, Any]:
    """Which rows have no mask (the ``provided`` method's decision refuses them)."""
    batch["mask_missing"] = np.array([not stages.present(mask) for mask in batch["mask"]], dtype=bool)
    return batch


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
