"""Labelled image datasets read from local disk, never downloaded at run time.

A dataset is named by a spec ``{"name": ..., "root": ..., "split": ...}``, or on the command line
``name:root[:split]`` (e.g. ``imagefolder:data/pets``, ``cifar10:/data/cifar:test``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd

from ..images import load_image_file
from .fewshot import few_shot_indices
from .templates import templates_for


class DataUnavailable(RuntimeError):
    """The data is not on disk where the spec says; the message says what to put there."""


@dataclass
class LabeledDataset:
    name: str
    dataset: Dataset  # yields (pixels in [0, 1], label)
    classnames: list[str]
    templates: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def few_shot(self, shots: int | None, seed: int) -> "LabeledDataset":
        indices = few_shot_indices(self.labels, shots, seed)
        return LabeledDataset(self.name, Subset(self.dataset, indices), self.classnames, self.templates,
                              [self.labels[i] for i in indices])


def _labels_of(dataset: Dataset) -> list[int]:
    for attribute in ("targets", "_labels", "labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return [int(label) for label in labels]
    if hasattr(dataset, "_samples"):
        return [int(label) for _, label in dataset._samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _folder_classnames(classes: list[str]) -> list[str]:
    return [name.replace("_", " ") for name in classes]


def _check_split(dataset: str, split: str, known) -> None:
    """A split outside ``known`` is refused before anything is read: CIFAR's and MNIST's ``train`` flag
    and ``fashion_mnist_arrays`` would otherwise read any misspelling of "train" as the test set."""
    if split not in known:
        raise ValueError(f"unknown {dataset} split '{split}'; known: {sorted(known)}")


def _image_folder(root: Path, split: str | None, transform) -> tuple[Dataset, list[str]]:
    folder = root / split if split else root  # no split: the root itself holds the class folders
    if split and not folder.is_dir():
        # Falling back to the root would make "train"/"test" the class names, or evaluate on training images.
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        listed = ", ".join(present[:10]) + (f", ... ({len(present) - 10} more)" if len(present) > 10 else "")
        where = f"sub-folders of {root}: {listed or 'none'}" if root.is_dir() else f"{root} does not exist"
        raise DataUnavailable(f"image folder not found: {folder} (split '{split}'; {where})")
    if not folder.is_dir():
        raise DataUnavailable(f"image folder not found: {folder} (expected one sub-folder of images per class)")
    # Decoded by the server's own decoder (EXIF orientation, alpha on white, 16-bit, CMYK), not PIL's
    # plain convert("RGB"), so that accuracy measured here is accuracy on what the server sees.
    dataset = tvd.ImageFolder(str(folder), transform=transform, loader=load_image_file)
    return dataset, _folder_classnames(dataset.classes)


def _imagenet(root: Path, split: str | None, transform) -> tuple[Dataset, list[str]]:
    dataset, _ = _image_folder(root, split or "val", transform)
    if len(dataset.classes) != len(IMAGENET_CLASSNAMES):
        raise DataUnavailable(f"{root}: expected 1000 WordNet-id folders under '{split or 'val'}', found {len(dataset.classes)}")
    return dataset, list(IMAGENET_CLASSNAMES)


# The splits a torchvision dataset is built with: split name -> its constructor's arguments.
_TRAIN_FLAG = {"train": {"train": True}, "test": {"train": False}}


def _split_arg(*splits: str, **aliases: str) -> dict[str, dict]:
    """Splits passed as ``split=``; ``aliases`` name one of them another way (``train="trainval"``)."""
    return {**{s: {"split": s} for s in splits}, **{a: {"split": s} for a, s in aliases.items()}}


def _torchvision(cls, splits: dict[str, dict], names: Callable[[list[str]], list[str]] | None = None):
    """Builder for a torchvision dataset; ``splits`` maps each split it accepts to constructor arguments."""
    def build(root: Path, split: str | None, transform) -> tuple[Dataset, list[str]]:
        split = split or "train"
        _check_split(cls.__name__, split, splits)
        try:
            dataset = cls(str(root), transform=transform, download=False, **splits[split])
        except (RuntimeError, FileNotFoundError) as err:
            raise DataUnavailable(f"{cls.__name__} not found under {root} ({err}). Download it once with "
                                  f"torchvision (download=True) on a machine with network access and pass that "
                                  f"folder as the root.") from err
        classes = list(dataset.classes)
        return dataset, names(classes) if names else _folder_classnames(classes)
    return build


def _toyworld(task: str):
    def build(root: Path, split: str | None, transform) -> tuple[Dataset, list[str]]:
        from .toyworld import ToyWorldTask
        dataset = ToyWorldTask(task, split or "test", transform)
        return dataset, dataset.classnames
    return build


class _FashionMNIST(Dataset):
    def __init__(self, root: Path, split: str, transform):
        from PIL import Image

        from .fashion import fashion_mnist_arrays
        try:
            self.images, labels = fashion_mnist_arrays(root, split)
        except FileNotFoundError as err:
            raise DataUnavailable(str(err)) from err
        self.targets = labels.tolist()
        self.transform, self._to_image = transform, Image.fromarray

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        image = self._to_image(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def _fashion_mnist(root: Path, split: str | None, transform) -> tuple[Dataset, list[str]]:
    from .fashion import DEBIAN_ROOT, FASHION_MNIST_CLASSNAMES
    split = split or "test"
    _check_split("Fashion-MNIST", split, ("train", "test"))  # fashion_mnist_arrays reads any other split as "test"
    root = root if str(root) not in ("", ".") else Path(DEBIAN_ROOT)
    return _FashionMNIST(root, split, transform), [c.lower() for c in FASHION_MNIST_CLASSNAMES]


DATASETS: dict[str, Callable] = {
    "imagefolder": _image_folder,
    "imagenet": _imagenet,
    "cifar10": _torchvision(tvd.CIFAR10, _TRAIN_FLAG),
    "cifar100": _torchvision(tvd.CIFAR100, _TRAIN_FLAG),
    "mnist": _torchvision(tvd.MNIST, _TRAIN_FLAG, names=lambda classes: [c.split(" - ")[0] for c in classes]),
    "fashion_mnist": _fashion_mnist,  # Debian's gzipped idx files or torchvision's raw/ layout
    "toyworld_pairs": _toyworld("pairs"),
    "toyworld_shapes": _toyworld("shapes"),
    "toyworld_colours": _toyworld("colours"),
    "toyworld_counts": _toyworld("counts"),
    "stl10": _torchvision(tvd.STL10, _split_arg("train", "test")),  # its "unlabeled" images have label -1
    "dtd": _torchvision(tvd.DTD, _split_arg("train", "val", "test")),
    "oxford_pets": _torchvision(tvd.OxfordIIITPet, _split_arg("trainval", "test", train="trainval")),
    "food101": _torchvision(tvd.Food101, _split_arg("train", "test")),
    "fgvc_aircraft": _torchvision(tvd.FGVCAircraft, _split_arg("train", "val", "trainval", "test")),
    "stanford_cars": _torchvision(tvd.StanfordCars, _split_arg("train", "test")),
}


def register_dataset(name: str, builder: Callable) -> None:
    """Add a dataset: ``builder(root: Path, split: str | None, transform) -> (dataset, classnames)``."""
    DATASETS[name] = builder


def parse_data_spec(spec: str | dict) -> dict:
    if isinstance(spec, dict):
        values = dict(spec)
    else:
        name, _, rest = spec.partition(":")
        root, _, split = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        values = {"name": name, "root": root or ".", "split": split or None}
    if values.get("name") not in DATASETS:
        raise ValueError(f"unknown dataset '{values.get('name')}'; known: {sorted(DATASETS)}")
    unknown = set(values) - {"name", "root", "split", "templates", "classnames"}
    if unknown:
        raise ValueError(f"unknown dataset option(s): {sorted(unknown)}")
    return values


def load_dataset(spec: str | dict, transform) -> LabeledDataset:
    spec = parse_data_spec(spec)
    dataset, classnames = DATASETS[spec["name"]](Path(spec.get("root") or "."), spec.get("split"), transform)
    if spec.get("classnames"):
        if len(spec["classnames"]) != len(classnames):
            raise ValueError(f"{len(spec['classnames'])} class names given for {len(classnames)} classes")
        classnames = list(spec["classnames"])
    templates = list(spec.get("templates") or getattr(dataset, "templates", None) or templates_for(spec["name"]))
    return LabeledDataset(_display_name(spec), dataset, classnames, templates, _labels_of(dataset))


def _display_name(spec: dict) -> str:
    name = Path(spec.get("root") or ".").resolve().name if spec["name"] == "imagefolder" else spec["name"]
    return f"{name}:{spec['split']}" if spec.get("split") else name
