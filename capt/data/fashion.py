"""Fashion-MNIST from its idx files (Debian's ``dataset-fashion-mnist`` puts them, gzipped, in
``/usr/share/datasets/fashion-mnist``; torchvision's layout ``root/FashionMNIST/raw`` works too)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSNAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                            "Bag", "Ankle boot"]
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_mnist_arrays(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N])``; raises FileNotFoundError naming what is missing."""
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images, labels = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} idx files not found under {root} "
                                f"(on Debian: apt-get install dataset-fashion-mnist, root {DEBIAN_ROOT})")
    return _read_idx(images), _read_idx(labels)
