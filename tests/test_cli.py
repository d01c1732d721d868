"""The ``ogclip`` command line, run as a user runs it."""

from __future__ import annotations

import json
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


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "demo.yaml"
    bad.write_text("model: og-clip-tiny\nsteps: 3\n")
    result = run("demo", "--config", str(bad))
    assert result.returncode == 2
    assert "steps" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = run("demo", "--steps", "3", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    for step in range(1, 7):
        assert f"[{step}/6]" in result.stdout
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["fresh_mask_gap"] == 0.0 and summary["reload_identical"] is True
    assert len(summary["history"]) == 3 and summary["model_version"].startswith("ogc-")
    ogclip.load_bundle(tmp_path / "demo" / "bundle", expected_version=summary["model_version"], device="cpu")
