"""A hub model's config and tokenizer go from the driver to the workers, which never ask the hub.

The hub is an offline Hugging Face cache written here (a 2-layer BERT and MiniLM's tokenizer as
repository fltac-test/tiny-bert at one commit). Each side runs in its own process, because
huggingface_hub reads its cache folder (HF_HUB_CACHE) once, at import: the driver's machine has
the whole repository, a worker node has only the weights, or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REPO = "fltac-test/tiny-bert"
REVISION = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = ("model.safetensors",)


def _fake_hub(root: Path, files: str) -> Path:
    """A Hugging Face cache holding REPO at REVISION: files "all", "weights" or "none"."""
    snapshot = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(REVISION)
    if files == "none":
        return root
    from fltac_ray.models.builders import _tiny_backbone, load_tokenizer

    staging = root.parent / f"staging-{root.name}"
    _tiny_backbone("tiny-random-bert", "text", seed=3).save_pretrained(staging)
    load_tokenizer("minilm").save_pretrained(staging)
    for path in staging.iterdir():
        if files == "all" or path.name in WEIGHTS:
            shutil.copy(path, snapshot / path.name)
    shutil.rmtree(staging)
    return root


def _in_process(script: str, cache: Path, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


DRIVER = """
    import json, pickle, sys
    from fltac_ray.models.builders import load_backbone
    from fltac_ray.models.model_files import collect_model_files

    files = collect_model_files(sys.argv[1])
    with open(sys.argv[2], "wb") as handle:
        pickle.dump(files, handle)
    model = load_backbone(sys.argv[1], "text")
    print(json.dumps({"revision": files.revision, "names": [name for name, _ in files.files],
                      "checksum": float(sum(p.double().sum() for n, p in model.named_parameters()
                                            if not n.startswith("pooler")))}))
"""

WORKER = """
    import json, pickle, sys
    from fltac_ray.errors import ResourceUnavailableError
    from fltac_ray.models.builders import build_on_meta, load_backbone, load_tokenizer, use_shipped_files

    with open(sys.argv[1], "rb") as handle:
        files = pickle.load(handle)
    folder = files.install(__import__("pathlib").Path(sys.argv[2]))
    use_shipped_files(files.name, folder, files.revision)
    report = {"vocab": load_tokenizer(files.name).vocab_size,
              "layers": build_on_meta(files.name, "text").config.num_hidden_layers}
    try:
        model = load_backbone(files.name, "text")
        report["checksum"] = float(sum(p.double().sum() for n, p in model.named_parameters()
                                       if not n.startswith("pooler")))  # (unused, drawn at load)
    except ResourceUnavailableError as exc:
        report["error"] = str(exc)
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    driver = _in_process(DRIVER, _fake_hub(root / "driver", "all"), REPO, str(root / "files.pickle"))
    return root, driver


def test_the_driver_ships_config_and_tokenizer_with_the_revision(shipped):
    _, driver = shipped
    assert driver["revision"] == REVISION
    assert "config.json" in driver["names"] and "tokenizer.json" in driver["names"]
    assert not any(name.endswith(".safetensors") for name in driver["names"])  # never the weights


def test_a_worker_builds_the_model_from_shipped_files_and_only_its_nodes_weights(shipped):
    root, driver = shipped
    # this node's cache has the weights only: config and tokenizer can come from nowhere else
    worker = _in_process(WORKER, _fake_hub(root / "node", "weights"), str(root / "files.pickle"),
                         str(root / "node-cache"))
    assert worker["layers"] == 2 and worker["vocab"] > 1000
    assert worker["checksum"] == driver["checksum"]  # the same weights as the driver's own load


def test_a_node_without_the_weights_says_how_to_provide_them(shipped):
    root, _ = shipped
    worker = _in_process(WORKER, _fake_hub(root / "empty", "none"), str(root / "files.pickle"),
                         str(root / "empty-cache"))
    assert worker["layers"] == 2  # the architecture still builds from the shipped files
    assert f"huggingface-cli download {REPO} --revision {REVISION}" in worker["error"]
    assert "Workers never download" in worker["error"]


ENGINE = """
    import json, os, sys
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from pathlib import Path
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress
    from tests.conftest import tiny_config

    lines = []
    progress = Progress(quiet=False, bar=False)
    progress.say = lines.append
    config = tiny_config(model={"name": sys.argv[1]},
                         engine={"base_cache_dir": sys.argv[2], "num_cpus": 2, "num_workers": 2})
    result = Simulation(config, out=sys.argv[3], progress=progress).run()
    print(json.dumps({"rounds": len(result.rounds), "shipped": [l for l in lines if "shipped" in l],
                      "installed": [str(p) for p in Path(sys.argv[2]).glob("model-files/*/config.json")]}))
"""


@pytest.mark.slow
def test_a_run_on_a_hub_model_ships_its_files_to_the_workers(tmp_path):
    report = _in_process(ENGINE, _fake_hub(tmp_path / "hub", "all"), REPO, str(tmp_path / "bases"),
                         str(tmp_path / "run"))
    assert report["rounds"] == 2
    assert report["shipped"] and f"at revision {REVISION}" in report["shipped"][0]
    assert len(report["installed"]) == 1  # the workers (one node) installed the files once
