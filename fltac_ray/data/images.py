"""Offline image tasks: Fashion-MNIST (Debian `dataset-fashion-mnist`) and scikit-learn's digits.

Images are kept as uint8 (n, channels, height, width) at their native size; the model resizes
and normalises a batch on the fly, so workers receive 784 bytes per Fashion-MNIST image.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fltac_ray.data.types import Examples
from fltac_ray.errors import ResourceUnavailableError

FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]
# A coarser labelling of the same images (a different task on shared inputs):
# tops, bottoms and dresses, footwear, bags.
FASHION_GROUPS = ["top", "bottom or dress", "footwear", "bag"]
FASHION_GROUP_OF = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])
INSTALL_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist` or set "
                "data.fashion_mnist_dir to a folder with the four IDX .gz files")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then raw uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_arrays(folder: str) -> tuple[np.ndarray, np.ndarray]:
    base = Path(folder)
    images, labels = [], []
    for split in ("train", "t10k"):
        image_path = base / f"{split}-images-idx3-ubyte.gz"
        label_path = base / f"{split}-labels-idx1-ubyte.gz"
        for path in (image_path, label_path):
            if not path.is_file():
                raise ResourceUnavailableError(
                    f"Fashion-MNIST file {path} not found (data.fashion_mnist_dir = {folder!r}); "
                    f"{INSTALL_HINT}")
        images.append(read_idx(image_path))
        labels.append(read_idx(label_path))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def load_fashion_mnist(folder: str, n_examples: int, rng: np.random.Generator,
                       grouped: bool = False) -> Examples:
    images, labels = _fashion_arrays(folder)
    chosen = rng.choice(len(labels), size=min(n_examples, len(labels)), replace=False)
    labels = labels[chosen]
    if grouped:
        return Examples("image", FASHION_GROUP_OF[labels], FASHION_GROUPS,
                        images=images[chosen][:, None])
    return Examples("image", labels, FASHION_CLASSES, images=images[chosen][:, None])


def load_digits_task(n_examples: int, rng: np.random.Generator) -> Examples:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0-16), scaled to uint8."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    chosen = rng.choice(len(bunch.target), size=min(n_examples, len(bunch.target)), replace=False)
    images = np.round(bunch.images[chosen] * (255 / 16)).astype(np.uint8)[:, None]
    return Examples("image", bunch.target[chosen].astype(np.int64), [str(d) for d in range(10)],
                    images=images)


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every (channels, h, w) image about its centre (bilinear, zero fill)."""
    from scipy.ndimage import rotate

    if degrees % 360 == 0:
        return images
    out = rotate(images.astype(np.float32), degrees, axes=(2, 3), reshape=False, order=1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
