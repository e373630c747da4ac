"""A synthetic stand-in for ImageNet-1k on disk: for a dry run of the paper's protocol end to end
(``capt/configs/vitb32-imagenet.yaml``: 1000 classes, 16 shots) on a machine without ImageNet.

``write_synthetic_imagenet(root)`` writes ``root/train/<wnid>/*.jpg`` and ``root/val/<wnid>/*.jpg`` for
the 1000 ImageNet-1k WordNet ids, the layout that ``capt.data.datasets``' "imagenet" loader reads
(``imagenet:ROOT:train``, ``imagenet:ROOT:val``): the class names, the templates, the 1000-way label set,
the few-shot sampling and the image decoding are those of a real run. The images are smooth random
noise, so what a run on them measures (accuracy, robustness) means nothing; only that the run works,
and how long its steps take.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "val")
# Each image is a tiny random RGB array upsampled to a random size: smooth, so that JPEG compresses it
# to a few kB (the 17,000 images of 16 + 1 per class are a small folder), and of varied sizes and aspect
# ratios, so that the resize and centre crop of the model's transform do real work.
NOISE_SIDE = 6
MIN_SIDE, MAX_SIDE = 64, 160
JPEG_QUALITY = 85
README = "README.txt"


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted: torchvision's ImageFolder
    order, and that of ``open_clip``'s ``IMAGENET_CLASSNAMES``), from timm's table of them."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as err:
        raise RuntimeError("the ImageNet-1k WordNet ids are read from timm (timm.data.ImageNetInfo), which is not "
                           "importable here; install timm (open_clip_torch depends on it)") from err
    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    # Folder names decide the labels (ImageFolder sorts them): ids out of order or of another subset
    # would silently pair images with the wrong class names.
    if (len(wnids) != 1000 or len(set(wnids)) != 1000 or wnids != sorted(wnids)
            or not all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)):
        raise RuntimeError(f"timm's ImageNet-1k label names are not 1000 sorted WordNet ids (got {len(wnids)}, "
                           f"starting {wnids[:3]})")
    return wnids


def _noise_image(rng: np.random.Generator) -> Image.Image:
    noise = rng.integers(0, 256, size=(NOISE_SIDE, NOISE_SIDE, 3), dtype=np.uint8)
    width, height = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    return Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)


def write_synthetic_imagenet(root: str | Path, images_per_class: int = 16, val_images_per_class: int = 1,
                             seed: int = 0, progress: bool = False) -> Path:
    """Write a synthetic ImageNet-1k folder (see the module docstring) under ``root``; returns ``root``.

    ``images_per_class`` training images (16: the protocol's 16 shots) and ``val_images_per_class``
    validation images per class, JPEG quality 85. Each image is seeded from (``seed``, split, class,
    index) alone, so the same arguments write the same bytes and a larger folder holds a smaller one's
    images. ``root`` must not exist or be an empty folder: noise written into a real ImageNet folder
    would be read as ImageNet."""
    if images_per_class < 1 or val_images_per_class < 1:
        raise ValueError("images_per_class and val_images_per_class must be >= 1 (each split needs an image per class)")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder: a synthetic ImageNet is written only into "
                              "a new or empty one, so that its noise never mixes with real images")
    wnids = imagenet_wnids()
    counts = {"train": images_per_class, "val": val_images_per_class}
    # Written beside root and renamed into place at the end: an interrupted write leaves no half folder
    # under root that a later run would take for a whole one.
    final, root = root, root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / README).write_text(
        "Synthetic ImageNet-1k (capt.data.synthetic.write_synthetic_imagenet): random noise images in the\n"
        "layout of ImageNet, for dry runs of the training protocol. Accuracy measured on them means nothing.\n"
        f"seed {seed}, {images_per_class} train and {val_images_per_class} val image(s) per class.\n")
    with tqdm(total=len(wnids) * sum(counts.values()), desc="synthetic imagenet", unit="image",
              disable=not progress) as bar:
        for split_index, split in enumerate(SPLITS):
            for class_index, wnid in enumerate(wnids):
                folder = root / split / wnid
                folder.mkdir(parents=True)
                for index in range(counts[split]):
                    rng = np.random.default_rng([seed, split_index, class_index, index])
                    _noise_image(rng).save(folder / f"{wnid}_{index}.jpg", "JPEG", quality=JPEG_QUALITY)
                    bar.update()
    if final.exists():
        final.rmdir()  # empty, as checked above
    os.replace(root, final)
    return final
