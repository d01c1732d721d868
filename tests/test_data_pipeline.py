"""The Ray Data curation pipeline on a real local Ray: stages, resumability, dedup, quality filter, masks, shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import webdataset as wds
from PIL import Image

from ogclip.synth import TargetClass, render
from ogclip_jobs.config import (
    CaptionConfig,
    DataPipelineConfig,
    FolderSourceConfig,
    MaskConfig,
    QualityFilterConfig,
    SynthSourceConfig,
    WebDatasetSourceConfig,
    WriterConfig,
)
from ogclip_jobs.data.images import dhash, mask_iou, png_bytes
from ogclip_jobs.data.pipeline import STAGES, Pipeline, StageError, _dedup_keep, find_outliers
from ogclip_jobs.data.stages import CpuSegmenter


def _row(key: str, name: str, silhouette: str, colour: str, pattern: str = "plain") -> dict:
    return {"key": key, "name": name, "super_category": "military aircraft", "aliases": [], "categories": ["fighter"],
            "operators": ["Test Air Force"], "manufacturers": [], "equipment": [],
            "facts": [{"attribute": "silhouette", "value": silhouette}, {"attribute": "colour", "value": colour},
                      {"attribute": "size_class", "value": "large"}, {"attribute": "pattern", "value": pattern},
                      {"attribute": "accent", "value": "red"}]}


CLASSES = {
    "alpha": _row("alpha", "Alpha", "delta wing", "grey"),
    "bravo": _row("bravo", "Bravo", "swept wing", "white", "striped"),
    "charlie": _row("charlie", "Charlie", "rotorcraft", "dark green"),
}


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataPipelineConfig, dict]:
    cfg = DataPipelineConfig(
        output_dir=tmp_path_factory.mktemp("synth-run"),
        source=SynthSourceConfig(per_class=5, image_size=48),
        quality=QualityFilterConfig(eps=0.3, min_samples=2),
        masks=MaskConfig(method="cpu"),
        captions=CaptionConfig(method="template"),
        writer=WriterConfig(formats=["parquet", "webdataset"], rows_per_shard=6),
    )
    return cfg, Pipeline(cfg, CLASSES, log=lambda _: None).run()


def test_every_stage_runs_and_records_itself(synth_run) -> None:
    cfg, records = synth_run
    assert list(records) == list(STAGES)
    assert all(records[s]["rows"] == 15 for s in STAGES)
    assert 0.3 < records["masks"]["mask_iou_mean"] <= 1.0 and records["masks"]["mask_iou_n"] == 15
    # The default quality model is a registry name (random weights): the filter is off and says so.
    assert records["quality"]["filter"].startswith("off (pass-through)") and "outliers" not in records["quality"]
    assert not (cfg.output_dir / "review" / "quality_outliers.jsonl").exists()
    # One streaming execution for the row stages, its record holding theirs; then the shards.
    stream = json.loads((cfg.output_dir / "stages" / "stream" / "_STAGE.json").read_text())
    assert list(stream["stages"]) == list(STAGES[:-1]) and stream["rows"] == 15
    assert all(records[s]["streamed"] == stream["seconds"] for s in STAGES[:-1])
    assert (cfg.output_dir / "stages" / "shards" / "_STAGE.json").exists()
    assert sorted(p.name for p in (cfg.output_dir / "stages").iterdir()) == ["shards", "stream"]
    # The stream keeps every stage's columns: the rendered mask beside the predicted one, the hashes.
    table = ray.data.read_parquet(str(cfg.output_dir / "stages" / "stream")).take_all()
    assert all(r["mask_truth"] and r["mask"] and r["sha256"] and r["caption"] for r in table)


def test_quality_filter_acts_only_with_an_export_bundle(tmp_path: Path) -> None:
    import torch

    from ogclip.bundle import export_bundle
    from ogclip.models import create_model

    torch.manual_seed(0)
    bundle = export_bundle(create_model("og-clip-tiny", device="cpu"), tmp_path / "bundle")
    run = DataPipelineConfig(output_dir=tmp_path / "run", source=SynthSourceConfig(per_class=5, image_size=48),
                             quality=QualityFilterConfig(model=str(bundle.path), eps=0.3, min_samples=2,
                                                         drop_outliers=True))
    logged: list[str] = []
    records = Pipeline(run, CLASSES, log=logged.append).run()
    record = records["quality"]
    assert record["filter"].startswith("on (bundle") and record["rows"] == 15 - record["outliers"]
    review = tmp_path / "run" / "review" / "quality_outliers.jsonl"
    flagged = {json.loads(line)["id"] for line in review.read_text().splitlines()}
    assert Path(record["review_file"]) == review and len(flagged) == record["outliers"]
    shards = {r["id"] for r in ray.data.read_parquet(str(tmp_path / "run" / "stages" / "shards" / "parquet"))
              .select_columns(["id"]).take_all()}
    assert len(shards) == records["shards"]["rows"] == 15 - len(flagged) and not shards & flagged
    assert any("filter on" in line for line in logged)
    typo = run.model_copy(update={"output_dir": tmp_path / "typo",
                                  "quality": QualityFilterConfig(model="og-clip-tnyi")})
    with pytest.raises(StageError, match="neither an export bundle"):
        Pipeline(typo, CLASSES, log=lambda _: None).run()
    assert not (tmp_path / "typo" / "stages").exists(), "refused before anything ran"


def test_stages_run_alone_then_the_rest_streams(tmp_path: Path) -> None:
    """``--stage`` runs one stage on the previous one's output; a full run afterwards keeps those and streams the
    rest, and the shards equal those of a run streamed whole."""
    cfg = DataPipelineConfig(output_dir=tmp_path / "alone", source=SynthSourceConfig(per_class=3, image_size=32),
                             masks=MaskConfig(method="cpu"))
    pipeline = Pipeline(cfg, CLASSES, log=lambda _: None)
    with pytest.raises(StageError, match="needs the output of 'ingest'"):
        pipeline.run(only="dedup")
    assert pipeline.run(only="ingest")["ingest"]["rows"] == 9
    assert pipeline.run(only="dedup")["dedup"]["rows"] == 9
    ingest = ray.data.read_parquet(str(tmp_path / "alone" / "stages" / "ingest")).schema().names
    assert "_row" not in ingest and "sha256" not in ray.data.read_parquet(
        str(tmp_path / "alone" / "stages" / "dedup")).schema().names  # decision columns stay out of a stage's output
    # A stream a killed run began with other settings: its rows are not kept.
    import pyarrow as pa
    import pyarrow.parquet as pq

    stale = tmp_path / "alone" / "stages" / "stream.partial"
    stale.mkdir()
    (stale / "_PLAN.json").write_text(json.dumps({"stages": ["ingest"], "config": {}}))
    pq.write_table(pa.table({"id": ["synth-alpha-0"], "caption": ["stale"]}), stale / "old.parquet")
    logged: list[str] = []
    records = Pipeline(cfg, CLASSES, log=logged.append).run()
    assert any("other stages or settings" in line for line in logged)
    assert "seconds" in records["dedup"] and "streamed" in records["masks"]
    stream = json.loads((tmp_path / "alone" / "stages" / "stream" / "_STAGE.json").read_text())
    assert list(stream["stages"]) == ["quality", "masks", "captions"]
    whole = cfg.model_copy(update={"output_dir": tmp_path / "whole"})
    Pipeline(whole, CLASSES, log=lambda _: None).run()

    def shards(run: Path) -> list[tuple]:
        rows = ray.data.read_parquet(str(run / "stages" / "shards" / "parquet")).take_all()
        return sorted((r["id"], r["caption"], bytes(r["mask"])) for r in rows)

    assert shards(tmp_path / "alone") == shards(tmp_path / "whole")


def test_rerunning_finished_stages_is_a_no_op(synth_run) -> None:
    cfg, records = synth_run
    files = {p: p.stat().st_mtime_ns for p in (cfg.output_dir / "stages").rglob("*") if p.is_file()}
    logged = []
    again = Pipeline(cfg, CLASSES, log=logged.append).run()
    assert again == records
    assert all("skipped" in line for line in logged)
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_shards_are_readable_by_open_clip_style_webdataset_loading(synth_run) -> None:
    cfg, _ = synth_run
    tars = sorted(str(p) for p in (cfg.output_dir / "stages" / "shards" / "webdataset").glob("*.tar"))
    assert len(tars) >= 2
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json"))
    assert len(samples) == 15
    ids = [meta["id"] for _, _, meta in samples]
    assert len(set(ids)) == 15
    for image, caption, meta in samples:
        assert image.size == (48, 48)
        assert CLASSES[meta["label"]]["name"] in caption and "Test Air Force" in caption
    table = ray.data.read_parquet(str(cfg.output_dir / "stages" / "shards" / "parquet")).take_all()
    assert {r["id"] for r in table} == set(ids)
    assert all(r["mask"] and r["caption"] and r["label"] in CLASSES for r in table)


def test_webdataset_shards_ingest_back(synth_run, tmp_path: Path) -> None:
    cfg, _ = synth_run
    back = DataPipelineConfig(output_dir=tmp_path, source=WebDatasetSourceConfig(
        path=cfg.output_dir / "stages" / "shards" / "webdataset"))
    record = Pipeline(back, CLASSES, log=lambda _: None).run(only="ingest")
    assert record["ingest"]["rows"] == 15


def _write(path: Path, image: Image.Image, fmt: str = "PNG", **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def test_folder_ingest_drops_bad_files_and_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "images"
    target = TargetClass.from_facts(CLASSES["alpha"])
    for i in range(6):
        _write(root / "alpha" / f"{i}.png", render(target, seed=i, size=64).image)
    original = render(target, seed=0, size=64).image
    _write(root / "alpha" / "copy.png", original)  # exact duplicate of 0.png
    _write(root / "alpha" / "reencoded.jpg", original, "JPEG", quality=95)  # near duplicate
    (root / "alpha" / "garbage.png").write_bytes(b"not an image")
    _write(root / "alpha" / "bomb.png", Image.new("1", (12_000, 12_000)))  # 144 Mpx decompression bomb
    cfg = DataPipelineConfig(output_dir=tmp_path / "out", source=FolderSourceConfig(path=root))
    pipeline = Pipeline(cfg, {}, log=lambda _: None)
    records = pipeline.run(only="ingest") | pipeline.run(only="dedup")
    assert records["ingest"]["rows"] == 8, "garbage and the bomb are dropped, every real image kept"
    assert records["dedup"]["rows"] == 6 and records["dedup"]["removed"] == 2


def test_dedup_keeps_one_of_each_group() -> None:
    rows = [{"id": "a", "sha256": "x", "dhash": 0b1011}, {"id": "b", "sha256": "x", "dhash": 0b1011},
            {"id": "c", "sha256": "y", "dhash": 0b1001}, {"id": "d", "sha256": "z", "dhash": -1}]
    assert _dedup_keep(rows, max_hamming=1) == {"a", "d"}
    assert _dedup_keep(rows, max_hamming=0) == {"a", "c", "d"}


def test_dhash_is_stable_under_reencoding_and_differs_across_images() -> None:
    target = TargetClass.from_facts(CLASSES["bravo"])
    image = render(target, seed=1, size=96).image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    from ogclip_jobs.data.images import hamming

    assert hamming(dhash(image), dhash(Image.open(buffer))) <= 3
    assert hamming(dhash(image), dhash(render(target, seed=2, size=96).image)) > 8


def test_dbscan_flags_planted_outliers() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=32)
    points = [{"id": f"in-{i}", "label": "alpha", "embedding": centre + 0.05 * rng.normal(size=32)} for i in range(20)]
    points += [{"id": "planted-1", "label": "alpha", "embedding": rng.normal(size=32)},
               {"id": "planted-2", "label": "alpha", "embedding": -centre}]
    outliers = find_outliers(points, eps=0.1, min_samples=3)
    assert {o["id"] for o in outliers} == {"planted-1", "planted-2"}
    assert outliers[0]["id"] == "planted-2" and outliers[0]["score"] > outliers[1]["score"] > 0


def test_cpu_segmenter_recovers_rendered_masks() -> None:
    segmenter = CpuSegmenter()
    ious = []
    for seed in range(20):
        sample = render(TargetClass.from_facts(CLASSES["charlie"]), seed=seed, size=64)
        ious.append(mask_iou(segmenter.segment(sample.image), sample.mask > 0))
    assert np.mean(ious) > 0.5


def test_cpu_segmenter_samples_a_long_border() -> None:
    """A strip a few pixels wide is all border: its k-means reads an even sample of it, not every pixel; an image
    up to 1,024 px a side keeps every border pixel."""
    from ogclip.segment import BORDER_SAMPLES, border_colours

    strip = np.zeros((400_000, 2, 3), np.float32)
    strip[::1000] = 255.0
    sample = border_colours(strip)
    assert len(sample) == BORDER_SAMPLES and (sample == 255).any() and (sample == 0).any()
    assert len(border_colours(np.zeros((1024, 1024, 3), np.float32))) == 8 * 1024
    mask = CpuSegmenter().segment(Image.fromarray(strip[:20_000].astype(np.uint8)))
    assert mask.shape == (20_000, 2)


def test_pipeline_resumes_after_being_killed_mid_stream(tmp_path: Path, kg_settings) -> None:
    """Kill the pipeline process once its streaming execution has written some blocks: the rerun keeps those,
    streams only the rows not written yet, and the shards hold every row exactly once."""
    out = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({"output_dir": str(out), "ray_num_cpus": 2,
                                  "source": {"kind": "synth", "max_classes": 10, "per_class": 8, "image_size": 96,
                                             "resources": {"batch_size": 4}},
                                  "quality": {"enabled": False},
                                  "masks": {"method": "cpu", "resources": {"batch_size": 4}}}))
    env = {**os.environ, "OGCLIP_HOME": str(kg_settings.home), "OGCLIP_KG_BOLT_PORT": str(kg_settings.kg_bolt_port),
           "OGCLIP_KG_HTTP_PORT": str(kg_settings.kg_http_port)}
    env.pop("OGCLIP_NEO4J_URI", None)
    command = [sys.executable, "-m", "ogclip_jobs.cli", "data", "pipeline", "--config", str(config)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    partial = out / "stages" / "stream.partial"
    deadline = time.monotonic() + 300
    while not (partial.exists() and any(partial.glob("*.parquet"))) and time.monotonic() < deadline:
        assert process.poll() is None, "the pipeline ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "stages" / "stream").exists()

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "[ingest] resuming:" in finished.stderr and "[shards] done" in finished.stderr  # progress: stderr
    kept = int(finished.stderr.split("[ingest] resuming: ")[1].split()[0])
    assert 0 < kept < 80, "the rerun kept the killed run's blocks and redid the rest"
    records = json.loads(finished.stdout)  # the result: JSON on stdout
    assert records["masks"]["rows"] == records["shards"]["rows"] == 80
    rows = ray.data.read_parquet(str(out / "stages" / "shards" / "parquet")).select_columns(["id"]).take_all()
    ids = [r["id"] for r in rows]
    assert len(ids) == 80 and len(set(ids)) == 80


@pytest.mark.gpu
def test_sam2_masker_with_a_local_checkpoint() -> None:
    checkpoint = os.environ.get("OGCLIP_SAM2_CHECKPOINT")
    if not checkpoint:
        pytest.skip("set OGCLIP_SAM2_CHECKPOINT to a local SAM2 checkpoint")
    from ogclip_jobs.data.stages import Sam2Masker

    masker = Sam2Masker(checkpoint, os.environ.get("OGCLIP_SAM2_CONFIG", "configs/sam2.1/sam2.1_hiera_l.yaml"))
    sample = render(TargetClass.from_facts(CLASSES["alpha"]), seed=0, size=256)
    assert mask_iou(masker.segment(sample.image), sample.mask > 0) > 0.5
    assert png_bytes(sample.mask)


def test_crawl_source_fetches_a_manifest_politely_and_logs_every_url(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ogclip_jobs.config import CrawlConfig, CrawlSourceConfig

    images = {f"/img{i}.png": png_bytes(render(TargetClass.from_facts(CLASSES["alpha"]), seed=i, size=32).image)
              for i in range(3)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/robots.txt":
                body, kind, status = b"User-agent: *\nDisallow: /private/\n", "text/plain", 200
            elif self.path in images:
                body, kind, status = images[self.path], "image/png", 200
            elif self.path == "/page.html":
                body, kind, status = b"<html></html>", "text/html", 200
            else:
                body, kind, status = images["/img0.png"], "image/png", 200 if self.path.startswith("/private") else 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img0.png", f"{base}/img1.png", f"{base}/img2.png", f"{base}/private/x.png",
            f"{base}/page.html", f"{base}/missing.png", "http://10.0.0.1/internal.png"]
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("# url<TAB>label\n" + "".join(f"{u}\talpha\n" for u in urls))
    cfg = DataPipelineConfig(output_dir=tmp_path / "out", source=CrawlSourceConfig(
        manifest=manifest, crawl=CrawlConfig(allowed_hosts=["127.0.0.1"], min_host_interval_s=0.05, retries=0)))
    try:
        record = Pipeline(cfg, CLASSES, log=lambda _: None).run(only="ingest")
    finally:
        server.shutdown()
    assert record["ingest"]["rows"] == 3
    lines = [json.loads(line) for path in (tmp_path / "out" / "review" / "fetch_logs").glob("*.jsonl")
             for line in path.read_text().splitlines()]
    decisions = {line["url"]: line["decision"] for line in lines if line["decision"] != "robots_fetch"}
    assert set(decisions) == set(urls), "every manifest URL is logged"
    assert decisions[f"{base}/private/x.png"] == "disallowed_by_robots"
    assert decisions[f"{base}/page.html"] == "bad_content_type"
    assert decisions["http://10.0.0.1/internal.png"] == "blocked_address"
    assert [decisions[u] for u in urls[:3]] == ["ok", "ok", "ok"]


def test_parquet_ingest_keeps_captions_and_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ogclip_jobs.config import ParquetSourceConfig

    target = TargetClass.from_facts(CLASSES["bravo"])
    table = pa.table({"image": [png_bytes(render(target, seed=i, size=32).image) for i in range(4)] + [b"junk"],
                      "caption": [f"a striped jet {i}" for i in range(5)], "label": ["bravo"] * 5})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    cfg = DataPipelineConfig(output_dir=tmp_path / "out", source=ParquetSourceConfig(path=tmp_path / "in"))
    record = Pipeline(cfg, CLASSES, log=lambda _: None).run(only="ingest")
    assert record["ingest"]["rows"] == 4, "the undecodable row is dropped, the others kept"
    rows = ray.data.read_parquet(str(tmp_path / "out" / "stages" / "ingest")).take_all()
    assert sorted(r["caption"] for r in rows) == [f"a striped jet {i}" for i in range(4)]
    assert {r["label"] for r in rows} == {"bravo"}


def test_repeated_images_of_a_parquet_source_leave_one_row_each(tmp_path: Path) -> None:
    # A Parquet row's id is its image's hash: 15 rows holding 10 distinct images give 10 rows, each id once, and
    # dedup has nothing left to remove (the issue was 15 rows in, "removed 0" and 5 ids twice in the shards).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ogclip_jobs.config import ParquetSourceConfig

    target = TargetClass.from_facts(CLASSES["bravo"])
    images = [png_bytes(render(target, seed=i, size=32).image) for i in range(10)]
    table = pa.table({"image": images + images[:5], "caption": [f"jet {i}" for i in range(15)],
                      "label": ["bravo"] * 15})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    cfg = DataPipelineConfig(output_dir=tmp_path / "out", source=ParquetSourceConfig(path=tmp_path / "in"))
    pipeline = Pipeline(cfg, CLASSES, log=lambda _: None)
    record = pipeline.run(only="ingest")["ingest"]
    assert record["rows"] == 10 and record["repeated_ids_dropped"] == 5
    assert pipeline.run(only="dedup")["dedup"]["removed"] == 0
    ids = [r["id"] for r in ray.data.read_parquet(str(tmp_path / "out" / "stages" / "dedup")).take_all()]
    assert len(ids) == len(set(ids)) == 10
    # Streamed whole, the same source gives the same: the repeats may fall in different blocks.
    whole = cfg.model_copy(update={"output_dir": tmp_path / "whole", "masks": MaskConfig(method="cpu")})
    records = Pipeline(whole, CLASSES, log=lambda _: None).run()
    assert records["ingest"]["repeated_ids_dropped"] == 5 and records["dedup"]["removed"] == 0
    ids = [r["id"] for r in ray.data.read_parquet(str(tmp_path / "whole" / "stages" / "shards" / "parquet"))
           .select_columns(["id"]).take_all()]
    assert len(ids) == len(set(ids)) == 10


def test_a_file_cut_short_by_a_kill_is_dropped_and_its_rows_redone(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ogclip_jobs.data.pipeline import _written_ids

    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "whole.parquet")
    pq.write_table(pa.table({"id": ["c", "d"]}), tmp_path / "cut.parquet")
    data = (tmp_path / "cut.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # no footer, as a SIGKILL mid-write leaves it
    assert _written_ids(tmp_path) == {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.parquet"]


def test_a_stage_that_writes_an_id_twice_fails(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ogclip_jobs.data.pipeline import _repeated_ids

    pq.write_table(pa.table({"id": ["a", "b", "a", "a"]}), tmp_path / "part-0.parquet")
    assert _repeated_ids(tmp_path) == ["a", "a"]


def test_webdataset_keys_keep_every_id_apart(tmp_path: Path) -> None:
    """Ids that differ only in a dot, a slash or an underscore keep distinct sample keys that decode back."""
    import urllib.parse

    from ogclip_jobs.data.pipeline import _TarWriter

    ids = ["a/b.png", "a_b_png", "a.b/png", "a%2Eb"]
    blank = [None] * len(ids)
    written = _TarWriter(str(tmp_path))({"id": ids, "image": [b"img"] * 4, "caption": ["c"] * 4, "mask": blank,
                                         "label": ["l"] * 4, "class_name": ["n"] * 4, "super_category": ["s"] * 4,
                                         "provenance": ["{}"] * 4})
    with tarfile.open(written["tar"][0]) as tar:
        keys = {name.split(".", 1)[0] for name in tar.getnames()}
    assert len(keys) == 4 and {urllib.parse.unquote(k) for k in keys} == set(ids)
