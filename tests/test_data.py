import struct
from collections import Counter

import numpy as np
import pytest

from capt.data import DataUnavailable, few_shot_indices, load_dataset, parse_data_spec
from capt.models import pixel_transform


def test_few_shot_takes_k_per_class_reproducibly():
    labels = [i % 5 for i in range(100)]
    chosen = few_shot_indices(labels, 4, seed=1)
    assert Counter(labels[i] for i in chosen) == {c: 4 for c in range(5)}
    assert chosen == few_shot_indices(labels, 4, seed=1)
    assert chosen != few_shot_indices(labels, 4, seed=2)
    assert few_shot_indices(labels, None, seed=1) == list(range(100))


def test_few_shot_keeps_all_of_a_small_class():
    labels = [0] * 10 + [1] * 2
    chosen = few_shot_indices(labels, 4, seed=0)
    assert Counter(labels[i] for i in chosen) == {0: 4, 1: 2}
    with pytest.raises(ValueError):
        few_shot_indices(labels, 0, seed=0)


def test_image_folder_gives_pixels_labels_and_class_names(colour_folder, tiny_clip):
    data = load_dataset(f"imagefolder:{colour_folder}:train", pixel_transform(tiny_clip.preprocess_cfg))
    assert data.classnames == ["blue", "green", "red"]
    assert len(data) == 18 and sorted(set(data.labels)) == [0, 1, 2]
    pixels, label = data.dataset[0]
    assert pixels.shape == (3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    few = data.few_shot(2, seed=0)
    assert len(few) == 6 and [few.dataset[i][1] for i in range(6)] == few.labels
    assert data.templates == ["a photo of a {}."]


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_read_from_a_local_root(tmp_path, tiny_clip):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):  # torchvision checks that both splits are there
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(20) % 10)
    data = load_dataset({"name": "fashion_mnist", "root": str(tmp_path), "split": "test"},
                        pixel_transform(tiny_clip.preprocess_cfg))
    assert len(data) == 20 and data.labels[:3] == [0, 1, 2]
    assert data.classnames[0] == "t-shirt/top" and len(data.classnames) == 10
    assert data.dataset[0][0].shape == (3, 32, 32)


def test_missing_data_is_a_clear_error_not_a_download(tmp_path, tiny_clip):
    transform = pixel_transform(tiny_clip.preprocess_cfg)
    with pytest.raises(DataUnavailable, match="CIFAR10 not found"):
        load_dataset(f"cifar10:{tmp_path}", transform)
    with pytest.raises(DataUnavailable, match="image folder not found"):
        load_dataset(f"imagefolder:{tmp_path}/nothing", transform)
    assert not any(tmp_path.iterdir())


def test_a_missing_image_folder_split_is_an_error_not_the_root(colour_folder, tiny_clip):
    transform = pixel_transform(tiny_clip.preprocess_cfg)
    # Before: the root was read instead, with "test" and "train" as the class names.
    with pytest.raises(DataUnavailable, match=r"tset.*sub-folders of .*: test, train"):
        load_dataset(f"imagefolder:{colour_folder}:tset", transform)
    # No split still means the root itself holds the class folders.
    assert load_dataset(f"imagefolder:{colour_folder / 'test'}", transform).classnames == ["blue", "green", "red"]


def test_imagenet_without_its_split_folder_is_an_error(colour_folder, tiny_clip):
    with pytest.raises(DataUnavailable, match=r"val.*sub-folders of .*: test, train"):
        load_dataset(f"imagenet:{colour_folder}", pixel_transform(tiny_clip.preprocess_cfg))


@pytest.mark.parametrize("spec, message", [
    ("cifar10:{root}:tset", r"unknown CIFAR10 split 'tset'; known: \['test', 'train'\]"),
    ("mnist:{root}:val", "unknown MNIST split 'val'"),
    ("stl10:{root}:unlabeled", "unknown STL10 split 'unlabeled'"),
    ("oxford_pets:{root}:val", "unknown OxfordIIITPet split 'val'"),
    ("toyworld_pairs::tset", "unknown toy-world split 'tset'"),  # ToyWorldTask has always refused it
])
def test_an_unknown_split_is_refused_before_any_data_is_read(tmp_path, tiny_clip, spec, message):
    # Before: CIFAR and MNIST took any split but "train" for the test set (here: "not found" from the empty root).
    with pytest.raises(ValueError, match=message):
        load_dataset(spec.format(root=tmp_path), pixel_transform(tiny_clip.preprocess_cfg))


def test_a_misspelt_fashion_mnist_split_is_not_read_as_the_test_set(tmp_path, tiny_clip):
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((10, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(10))
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'tarin'"):
        load_dataset(f"fashion_mnist:{tmp_path}:tarin", pixel_transform(tiny_clip.preprocess_cfg))


def test_data_specs():
    assert parse_data_spec("cifar10:/data/cifar:test") == {"name": "cifar10", "root": "/data/cifar", "split": "test"}
    assert parse_data_spec("imagefolder:pets") == {"name": "imagefolder", "root": "pets", "split": None}
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        parse_data_spec("nope:/x")
    with pytest.raises(ValueError, match="unknown dataset option"):
        parse_data_spec({"name": "cifar10", "download": True})


def test_imagenet_class_names_and_templates_ship_with_open_clip():
    from capt.data import templates_for
    from capt.data.datasets import IMAGENET_CLASSNAMES
    assert len(IMAGENET_CLASSNAMES) == 1000
    templates = templates_for("imagenet")
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
