"""The ``ogclip`` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ogclip

OGCLIP = [sys.executable, "-m", "ogclip_jobs.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OGCLIP, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "models" in result.stdout and "demo" in result.stdout


def test_models_lists_every_registered_architecture() -> None:
    table = run("models")
    assert table.returncode == 0
    for name in ogclip.list_models():
        assert name in table.stdout
    rows = json.loads(run("models", "--json").stdout)
    paper = next(r for r in rows if r["name"] == "og-clip-vit-l-14")
    assert (paper["vision_layers"], paper["vision_width"], paper["patch_size"]) == (24, 1024, 14)
    assert paper["stem"] == "patch" and next(r for r in rows if r["name"] == "og-clip-tiny-conv")["stem"] == "conv"


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "demo.yaml"
    bad.write_text("output_dir: x\nsteps: 3\n")
    result = run("demo", "--config", str(bad))
    assert result.returncode == 2
    assert "steps" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("command", "content", "named"), [
    ("demo", "a: [1, 2\n", "not valid YAML at line 2"),
    ("demo", "- just\n- a list\n", "expected a mapping"),
    ("demo", "train: {model: no-such-model}\n", "unknown model 'no-such-model'"),
    ("train", "model: og-clip-tiny\ntrain: {steps: -5}\n", "train.steps"),
    ("demo", None, "is a directory"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path: Path, command: str, content: str | None,
                                                       named: str) -> None:
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    result = run(command, "--config", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and named in lines[0], result.stderr


@pytest.mark.parametrize("steps", ["0", "-5", "many"])
def test_steps_must_be_positive(steps: str) -> None:
    result = run("demo", "--steps", steps)
    assert result.returncode == 2 and "--steps" in result.stderr and "Traceback" not in result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("ogclip ")


TINY_DEMO = """
ray_num_cpus: 2
ablation: false
test_data:
  source: {kind: synth, class_set: test, max_classes: 5, per_class: 2, image_size: 64, seed: 1}
  quality: {enabled: false}
train:
  name: tiny
  model: og-clip-tiny
  data: {kind: synth, class_set: train, max_classes: 4, prefetch: 1}
  recipe: {kind: og-clip, caption_ratio: 0.0, hard_negatives: 2}
  train: {lr: 5.0e-4, min_lr: 5.0e-5, warmup_steps: 1, steps: 4, batch_size: 8}
  num_workers: 1
  cpus_per_worker: 1.0
  checkpoint_every: 2
  export_class_sets: [test]
probe: {train_classes: 40, renders_per_class: 2, regularisation: [1.0e-3]}  # one strength: a fit, not four
"""


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, kg_settings) -> None:
    """The main job on a tiny world against the test session's graph server, training on the synthetic world
    rendered on the fly with hard negatives: every step, a bundle, class embeddings in the graph for its version,
    an evaluation report and the attribute probes."""
    config = tmp_path / "demo.yaml"
    config.write_text(TINY_DEMO)
    env = {**os.environ, "OGCLIP_HOME": str(kg_settings.home), "OGCLIP_KG_BOLT_PORT": str(kg_settings.kg_bolt_port),
           "OGCLIP_KG_HTTP_PORT": str(kg_settings.kg_http_port)}
    env.pop("OGCLIP_NEO4J_URI", None)
    out = tmp_path / "demo"
    result = subprocess.run([*OGCLIP, "demo", "--config", str(config), "--output-dir", str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in range(1, 6):
        assert f"[{step}/5]" in result.stderr  # progress through `logging`, on stderr
    # A quiet console: the job's own lines only (Ray's logs stay in its session folder), none twice, no warnings.
    console = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(console) <= 80, "\n".join(console)
    assert len(set(console)) == len(console), "\n".join(console)
    assert not [line for line in console if "Warning" in line or "WARNING" in line], "\n".join(console)
    assert sum(line.lstrip().startswith("step ") for line in console) == 2  # steps 2 and 4 (checkpoint_every 2)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["fresh_mask_gap"] == 0.0 and summary["train"]["final_metrics"]["step"] == 4
    version = summary["train"]["model_version"]
    assert version.startswith("ogc-") and summary["eval"]["model_version"] == version
    assert summary["train"]["class_embeddings"] >= 5 + 4
    assert 0.0 <= summary["eval"]["macc"] <= 1.0 and (out / "eval" / "report.md").exists()
    assert "rendered on the fly" in result.stderr and not (out / "data-train").exists()
    assert (out / "probe" / "probe.md").exists() and summary["probe"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["prompts"] == "kg" and summary["eval"]["macc_label_prompts"] == report["by_prompts"]["label"]["macc"]
    assert "with label prompts instead of kg" in result.stderr
    ogclip.load_bundle(summary["train"]["bundle"], expected_version=version, device="cpu")


def test_a_result_on_stdout_is_json_and_progress_goes_to_stderr(tmp_path: Path, kg_settings) -> None:
    env = {**os.environ, "OGCLIP_HOME": str(kg_settings.home), "OGCLIP_KG_BOLT_PORT": str(kg_settings.kg_bolt_port),
           "OGCLIP_KG_HTTP_PORT": str(kg_settings.kg_http_port)}
    env.pop("OGCLIP_NEO4J_URI", None)
    result = subprocess.run([*OGCLIP, "data", "synth", "--classes", "test", "--per-class", "1", "--max-classes", "3",
                             "--image-size", "32", "--output-dir", str(tmp_path / "synth")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["ingest"]["rows"] == 3  # `ogclip data synth … | jq .ingest.rows` works
    assert "[ingest] done" in result.stderr


def test_the_platform_logs_through_logging_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from ogclip.settings import PACKAGE_LOGGERS, configure_logging

    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in PACKAGE_LOGGERS}
    try:
        configure_logging("INFO")
        configure_logging("INFO")  # again: still one handler, so still one line per message
        logging.getLogger("ogclip_jobs.train").info("step 1/2")
        logging.getLogger("ogclip_serve").debug("hidden at INFO")
        configure_logging("DEBUG")
        logging.getLogger("ogclip_kg.server").debug("shown at DEBUG")
        captured = capfd.readouterr()
        assert captured.out == ""  # stdout is for results
        lines = captured.err.splitlines()
        assert lines[0] == "step 1/2" and len(lines) == 2, lines
        assert " DEBUG ogclip_kg.server: shown at DEBUG" in lines[1]
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("LOUD")
        configure_logging("INFO", "json")
        try:
            raise KeyError("boom")
        except KeyError:
            logging.getLogger("ogclip_jobs.evaluate").exception("failed on %d images", 3)
        record = json.loads(capfd.readouterr().err)  # one record, one line
        assert record["levelname"] == "ERROR" and record["name"] == "ogclip_jobs.evaluate"
        assert record["message"] == "failed on 3 images" and "KeyError: 'boom'" in record["exc_text"]
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


# A job's own Ray: a task logs through the platform's logger; where its record lands and how it reads.
_WORKER_LOG_SCRIPT = """
import logging, ray
from ogclip_jobs.runtime import ensure_ray, ray_log_folder

@ray.remote
def work():
    logging.getLogger("ogclip_jobs.data.stages").info("stage row %d", 7)
    logging.getLogger("ogclip_jobs.data.stages").debug("not at INFO")

ensure_ray(num_cpus=1)
ray.get(work.remote())
print(ray_log_folder())
ray.shutdown()
"""


def test_ray_workers_log_at_the_platforms_level_in_its_format() -> None:
    env = {**os.environ, "OGCLIP_LOG_FORMAT": "json", "OGCLIP_LOG_LEVEL": "INFO"}
    result = subprocess.run([sys.executable, "-c", _WORKER_LOG_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage row" not in result.stderr, "workers' records stay in Ray's session folder unless verbose"
    folder = Path(result.stdout.strip().splitlines()[-1])
    lines = [line for path in folder.glob("worker-*.err") for line in path.read_text().splitlines()
             if "stage row" in line or "not at INFO" in line]
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["message"] == "stage row 7" and record["levelname"] == "INFO"
    assert record["name"] == "ogclip_jobs.data.stages", "routable by the logger's name"
    assert record["job_id"] and record["worker_id"] and record["task_name"] == "work"
