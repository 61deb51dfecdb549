"""Make .gpu-carry/: what benchmarks/gpu.py needs on a GPU node that has a stock PyTorch image
but no network (torch, transformers, peft, scikit-learn, pandas, ...; no pydantic, no Ray).

    python benchmarks/gpu_carry.py                       # for the node: CPython 3.12, x86-64 Linux
    python benchmarks/gpu_carry.py --for-this-machine    # for this interpreter (CI's Ray-free venv)

Run it on a connected machine with fltac-ray installed. It writes
  .gpu-carry/wheels/            pydantic and what it needs, at the versions installed here
  .gpu-carry/minilm-tokenizer/  MiniLM's tokenizer files (the random-* models read it; no weights)
and refuses to write more than 64 MiB (what a device call carries). Carry the folder along (it
is git-ignored); benchmarks/gpu.py picks it up from the checkout's root.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Missing on the stock image (typing-extensions is there, perhaps older than pydantic needs).
PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
NODE_PYTHON = "3.12"
# manylinux tags pip must be told one by one when it downloads for another machine
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot", ".pt", ".pth")
LIMIT_BYTES = 64 * 2 ** 20


def pinned() -> list[str]:
    """name==version of each carried package, as installed here (what fltac-ray was tested with)."""
    pins = []
    for name in PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here: install fltac-ray first (make setup)")
    return pins


def download_wheels(target: Path, for_this_machine: bool, python: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(target)]
    if not for_this_machine:
        command += ["--python-version", python, "--implementation", "cp"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
    subprocess.run(command + pinned(), check=True)


def copy_tokenizer(target: Path) -> None:
    from fltac_ray.models.builders import minilm_path

    source = Path(minilm_path())
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)


def size_of(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".gpu-carry"), help="the folder to make (replaced)")
    parser.add_argument("--python-version", default=NODE_PYTHON, help="the node's Python (default 3.12)")
    parser.add_argument("--for-this-machine", action="store_true",
                        help="wheels for this interpreter and platform instead of the node's")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    download_wheels(out / "wheels", args.for_this_machine, args.python_version)
    copy_tokenizer(out / "minilm-tokenizer")
    size = size_of(out)
    if size > LIMIT_BYTES:
        sys.exit(f"{out} holds {size / 2**20:.1f} MiB, over the 64 MiB a device call carries")
    wheels = sorted(path.name for path in (out / "wheels").glob("*.whl"))
    print(f"{out}: {size / 2**20:.1f} MiB; wheels: {', '.join(wheels)}; MiniLM's tokenizer files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
