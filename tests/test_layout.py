"""The package layout of DESIGN.md: one wheel, four import packages, no shadowed stdlib ``platform``."""

from __future__ import annotations

import importlib
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ogclip.config import load_yaml_config
from ogclip_jobs.config import (
    AblationConfig,
    DataPipelineConfig,
    DemoConfig,
    DenseConfig,
    EvalConfig,
    TrainJobConfig,
)
from ogclip_serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]

# Every YAML config the project ships, and the schema it must satisfy.
CONFIG_SCHEMAS = {"infra/configs/demo.yaml": DemoConfig, "infra/configs/demo-gpu.yaml": DemoConfig,
                  "infra/configs/demo-data.yaml": DataPipelineConfig,
                  "infra/configs/train-cpu.yaml": TrainJobConfig, "infra/configs/ablation-cpu.yaml": AblationConfig,
                  "infra/configs/eval-cpu.yaml": EvalConfig, "infra/serve/demo.yaml": ServeConfig,
                  "infra/configs/data-cluster.yaml": DataPipelineConfig,
                  "infra/configs/data-test-cluster.yaml": DataPipelineConfig,
                  "infra/configs/train-8gpu.yaml": TrainJobConfig, "infra/configs/eval-cluster.yaml": EvalConfig,
                  "infra/configs/detailclip-cpu.yaml": TrainJobConfig, "infra/configs/dense-cpu.yaml": DenseConfig,
                  "infra/configs/ablation-detailclip-cpu.yaml": AblationConfig,
                  "infra/configs/mpsclip-cpu.yaml": TrainJobConfig,
                  "infra/configs/ablation-mpsclip-cpu.yaml": AblationConfig}


def test_platform_is_the_standard_library_module() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert platform.python_version()


@pytest.mark.parametrize("package", ["ogclip", "ogclip_kg", "ogclip_jobs", "ogclip_serve"])
def test_import_packages(package: str) -> None:
    assert importlib.import_module(package).__doc__


def test_core_does_not_import_ray_or_neo4j() -> None:
    code = "import sys, ogclip; bad = {'ray', 'neo4j'} & set(sys.modules); print(sorted(bad)); sys.exit(bool(bad))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_what_ray_data_workers_import_leaves_out_torch() -> None:
    """Every Ray Data worker of the pipeline imports the pipeline's module to run its functions; a worker that
    imported torch, torchvision or scikit-learn with it took ~20 s to start on 2 cores, once per stage. Models load
    inside the stages that use them."""
    code = ("import sys, ogclip_jobs.data.pipeline, ogclip_jobs.data.stages; "
            "bad = {'torch', 'torchvision', 'open_clip', 'sklearn'} & set(sys.modules); print(sorted(bad)); "
            "sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_shipped_yaml_config_is_validated() -> None:
    # Kubernetes manifests (infra/k8s) are not configs: tests/test_infra.py validates them.
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "infra").rglob("*.yaml") if p.parent != ROOT / "infra" / "k8s"}
    assert shipped == set(CONFIG_SCHEMAS), "register each shipped YAML config in CONFIG_SCHEMAS"
    for path, schema in CONFIG_SCHEMAS.items():
        load_yaml_config(ROOT / path, schema)


def test_yaml_config_rejects_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "demo.yaml"
    bad.write_text("train:\n  train:\n    lr: 1.0e-4\n    stpes: 10\n")
    with pytest.raises(ValueError, match="stpes"):
        load_yaml_config(bad, DemoConfig)


def test_every_package_is_listed_for_the_wheel() -> None:
    """The images install the wheel, which holds only the packages pyproject lists: a subpackage left out imports
    in a checkout (editable install) and fails in the image."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {top + "".join(f".{part}" for part in init.parent.relative_to(ROOT / folder).parts)
             for top, folder in setuptools["package-dir"].items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found == set(setuptools["packages"])
