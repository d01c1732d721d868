"""Ray Train training on a real local Ray: a 2-worker CPU run that survives a killed worker, export to the graph
read back by a fresh process, and the evaluation metrics on inputs with known answers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_shards

from ogclip.config import PreprocessConfig
from ogclip.synth import render
from ogclip.transforms import apply_visual_prompt
from ogclip_jobs.config import EvalConfig, TrainConfig, TrainJobConfig
from ogclip_jobs.evaluate import zero_shot_scores
from ogclip_jobs.train import sample_texts
from ogclip_kg.prompts import prompts_for


def _parent(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so read after the last ")".
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _train_worker_pids() -> list[int]:
    """This test's Ray Train workers: processes named after their actor (``ray::RayTrainWorker...``; no dashboard
    is needed to find them this way) that descend from this process, the driver of the test's Ray, so that a Ray
    job of someone else on the machine is never touched."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not (proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")):
                continue
            ancestor = int(proc.name)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent(ancestor)
            if ancestor == os.getpid():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def test_two_worker_training_survives_a_killed_worker_then_exports(tmp_path: Path, graph, job_settings,
                                                                     local_ray) -> None:
    """Two gloo workers; once the first checkpoint exists one worker is SIGKILLed. The run resumes from the
    checkpoint, reaches its last step, and the export's class embeddings read back in a fresh process."""
    from ogclip_jobs.train import run_training

    data = tmp_path / "shards"
    keys = write_shards(graph, data)
    cfg = TrainJobConfig(name="resume", model="og-clip-tiny", data=data, output_dir=tmp_path / "runs",
                         train=TrainConfig(lr=5e-4, min_lr=5e-5, warmup_steps=2, steps=30, batch_size=8),
                         num_workers=2, cpus_per_worker=0.5, checkpoint_every=6, log_every=3, max_failures=2,
                         export_class_sets=[], cache_decoded=True, ray_num_cpus=2)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["model"], outcome["summary"] = run_training(cfg, log=lambda _: None)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    run = tmp_path / "runs" / "resume"
    deadline = time.monotonic() + 400
    snapshot = run / "ray" / "checkpoint_manager_snapshot.json"
    # A checkpoint counts once the controller has registered it (its folder appears a moment earlier).
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()) and time.monotonic() < deadline \
            and thread.is_alive():
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert pids, "no training worker to kill"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["final_metrics"]["step"] == 30
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [entry["step"] for entry in log if entry.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0] % 6 == 0 and resumed[0] >= 6, log
    after = [entry["step"] for entry in log[[e.get("event") for e in log].index("resumed") + 1:]]
    assert after[0] > resumed[0] and after[-1] == 30, "did not continue from the checkpoint to the last step"
    assert all(math.isfinite(entry["loss"]) for entry in log if "loss" in entry)

    version = summary["model_version"]
    assert summary["class_embeddings"] == len(keys)
    script = ("import json,sys; from ogclip.settings import get_settings; from ogclip_kg.store import GraphStore; "
              "s=GraphStore.from_settings(get_settings()); e=s.read_embeddings(sys.argv[1]); "
              "print(json.dumps({k: v[:4] for k, v in e.items()}))")
    env = {**os.environ}
    read = subprocess.run([sys.executable, "-c", script, version], env=env, capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    stored = json.loads(read.stdout)
    assert sorted(stored) == keys
    from ogclip.bundle import load_bundle
    from ogclip.zeroshot import class_embeddings
    from ogclip_kg.prompts import fetch_class_facts

    model, info = load_bundle(summary["bundle"], expected_version=version, device="cpu")
    expected = class_embeddings(model, prompts_for(fetch_class_facts(graph, keys), "kg"))
    assert torch.allclose(torch.tensor([stored[k] for k in keys]), expected[:, :4], atol=1e-5)

    # The config's model changed since the run's checkpoints were written: a clear refusal, not a worker traceback.
    from ogclip.models import CheckpointError

    other = cfg.model_copy(update={"model": "og-clip-tiny-conv", "max_failures": 0})
    with pytest.raises(CheckpointError, match=r"do not fit og-clip-tiny-conv: give the run another name"):
        run_training(other, log=lambda _: None)


def test_zero_shot_scores_on_known_predictions() -> None:
    """Three classes, orthogonal class vectors; images built to be right or wrong by construction."""
    classes = torch.eye(3, 8)
    # class 0: both images right; class 1: one of two right; class 2: wrong (looks like class 0).
    images = torch.stack([classes[0], classes[0], classes[1], classes[2] * 0.1 + classes[0], classes[0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    scores = zero_shot_scores(images, labels, classes, [4, 8], ["air", "air", "sea"])
    assert scores["per_class"] == pytest.approx([1.0, 0.5, 0.0])
    assert scores["macc"] == pytest.approx(0.5)
    assert scores["per_super_category"] == pytest.approx({"air": 0.75, "sea": 0.0})
    assert scores["macc_by_dim"] == pytest.approx({4: 0.5, 8: 0.5}) and scores["images"] == 5


def test_a_class_without_images_is_left_out_of_macc() -> None:
    classes = torch.eye(3, 4)
    scores = zero_shot_scores(torch.stack([classes[0], classes[1]]), torch.tensor([0, 1]), classes, [4],
                              ["a", "a", "b"])
    assert scores["macc"] == pytest.approx(1.0) and math.isnan(scores["per_class"][2])
    assert scores["per_super_category"] == {"a": 1.0}


def test_visual_prompts_change_only_what_they_claim() -> None:
    cfg = PreprocessConfig(image_size=32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:16, 10:20] = 1
    same, roi = apply_visual_prompt(images, masks, "roi", cfg)
    assert same is images and roi is masks
    plain, ones = apply_visual_prompt(images, masks, "none", cfg)
    assert torch.equal(plain, images) and bool((ones == 1).all())
    cut, _ = apply_visual_prompt(images, masks, "background_mask", cfg)
    assert bool((cut[:, :, :8] == 0).all()) and torch.equal(cut[:, :, 8:16, 10:20], images[:, :, 8:16, 10:20])
    circled, _ = apply_visual_prompt(images, masks, "red_circle", cfg)
    changed = (circled != images).any(dim=1)
    assert changed.any() and not changed[:, 9:15, 12:18].any()  # a ring around the object, not over its middle
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(circled[0, :, changed[0]].T, red.expand(int(changed[0].sum()), 3))
    with pytest.raises(ValueError, match="unknown visual prompt"):
        apply_visual_prompt(images, masks, "blur", cfg)  # type: ignore[arg-type]


def test_prompts_by_mode_and_training_texts() -> None:
    import random

    row = {"key": "f-16", "name": "F-16", "super_category": "military aircraft", "categories": ["fighter"],
           "aliases": [], "operators": [], "manufacturers": [], "equipment": [],
           "facts": [{"attribute": "silhouette", "value": "delta wing"}, {"attribute": "colour", "value": "grey"}]}
    kg, label = prompts_for([row], "kg")["f-16"], prompts_for([row], "label")["f-16"]
    assert len(label) == 1 and "F-16" in label[0] and "delta wing" not in label[0]
    assert any("delta wing" in p for p in kg) and any("painted grey" in p for p in kg)
    assert not any("F-16" in p for p in kg), "kg prompts describe the look, not the name"
    assert sum("delta wing" in p or "grey" in p for p in kg) == 2, "one attribute per prompt"
    texts, owner = sample_texts(["f-16"] * 200, ["its caption"] * 200, {"f-16": kg}, "kg", random.Random(0))
    assert "its caption" in texts and set(texts) <= {*kg, "its caption"}
    assert len(owner) == len(texts) and sorted(set(owner)) == list(range(200))
    ensembles = [[t for t, o in zip(texts, owner, strict=True) if o == i] for i in range(200)]
    assert all(e == ["its caption"] or e == kg for e in ensembles), "an image gets its caption or the whole ensemble"
    texts, owner = sample_texts(["f-16"] * 50, ["its caption"] * 50, {"f-16": kg}, "kg", random.Random(0), 0.0)
    assert "its caption" not in texts and len(texts) == 50 * len(kg)
    texts, _ = sample_texts(["f-16"] * 50, ["its caption"] * 50, {"f-16": label}, "label", random.Random(0))
    assert set(texts) == set(label)


def test_eval_refuses_an_unknown_class_set(graph, tmp_path: Path) -> None:
    from ogclip_jobs.evaluate import eval_classes

    with pytest.raises(ValueError, match="empty or unknown"):
        eval_classes(graph, EvalConfig(class_set="no-such-set", data=tmp_path))


def test_synthetic_stream_renders_fresh_deterministic_rows(graph) -> None:
    """The on-the-fly training stream: the columns the loop reads, classes drawn over the whole set, every row a
    new picture, the same rows for the same seed."""
    from ogclip_jobs.train import RenderForTraining
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="train")][:40]
    facts = {row["key"]: row for row in fetch_class_facts(graph, keys)}
    preprocess = PreprocessConfig(image_size=32, roi_zoom=2.0).model_dump(mode="json")
    stage = RenderForTraining(preprocess, facts, seed=3)
    batch = stage({"id": list(range(64))})
    assert batch["image"].shape == (64, 3, 32, 32) and batch["mask"].shape == (64, 1, 32, 32)
    assert set(batch["key"]) <= set(keys) and len(set(batch["key"])) > 20
    assert [sorted(keys)[i] for i in batch["label"]] == list(batch["key"])
    assert len({row.tobytes() for row in batch["image"]}) == 64, "every row is a new render"
    assert 0 < batch["mask"].mean() < 0.5 and set(batch["mask"].ravel().tolist()) <= {0.0, 1.0}
    again = RenderForTraining(preprocess, facts, seed=3)({"id": [5, 6]})
    assert (again["image"] == batch["image"][5:7]).all() and list(again["key"]) == list(batch["key"][5:7])
    other = RenderForTraining(preprocess, facts, seed=4)({"id": [5, 6]})
    assert not (other["image"] == batch["image"][5:7]).all()
    # A row is the evaluation transform (the model's ROI zoom included) of the render's pixels.
    from ogclip.transforms import image_mask_transform

    index = int(batch["label"][0])
    draw = int.from_bytes(hashlib.sha256(b"3:0").digest()[:16], "big")
    sample = render(stage.targets[index], seed=draw >> 64, size=32)
    image, mask = image_mask_transform(PreprocessConfig.model_validate(preprocess))(sample.image, sample.mask)
    assert float(mask.mean()) > 2 * sample.area, "zoomed onto the target"
    torch.testing.assert_close(torch.from_numpy(batch["image"][0]), image, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(batch["mask"][0]), mask)


def test_render_stream_splits_ranks_and_resumes_where_it_left_off(graph, local_ray) -> None:
    """The synthetic stream through renderer actors: each rank its own renders, batches in order, and a run resumed
    at batch 2 gets exactly the batches 2 and 3 an uninterrupted run gets."""
    from ogclip_jobs.train import RenderStream
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="train")][:30]
    facts = {row["key"]: row for row in fetch_class_facts(graph, keys)}
    cfg = TrainJobConfig.model_validate({"name": "stream", "model": "og-clip-tiny", "output_dir": "unused",
                                         "data": {"kind": "synth", "seed": 5, "render_tasks": 2}})
    preprocess = PreprocessConfig(image_size=32).model_dump(mode="json")
    renderers = RenderStream.start_renderers(cfg, preprocess, facts)
    rank0 = list(RenderStream(renderers, 8, rank=0, world=2).batches(0, 4))
    rank1 = list(RenderStream(renderers, 8, rank=1, world=2).batches(0, 4))
    resumed = list(RenderStream(renderers, 8, rank=0, world=2, prefetch=1).batches(2, 4))
    assert [b["image"].shape for b in rank0] == [(8, 3, 32, 32)] * 4
    pictures = [row.tobytes() for batch in rank0 + rank1 for row in batch["image"]]
    assert len(set(pictures)) == 64, "the ranks' batches are all different renders"
    for ahead, again in zip(rank0[2:], resumed, strict=True):
        assert (ahead["image"] == again["image"]).all() and list(ahead["key"]) == list(again["key"])
