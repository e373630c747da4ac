"""The synthetic ImageNet-1k folder: the layout and class order the "imagenet" loader reads, images
that decode, the same bytes for the same seed, and never written over existing files."""
import pytest

from capt.data import load_dataset
from capt.data.datasets import IMAGENET_CLASSNAMES
from capt.data.synthetic import imagenet_wnids, write_synthetic_imagenet
from capt.images import pixel_transform


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return write_synthetic_imagenet(tmp_path_factory.mktemp("synthetic") / "imagenet", images_per_class=1,
                                    val_images_per_class=1)


def test_the_wordnet_ids_are_imagenet_1k_in_class_index_order():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench, toilet paper


def test_each_split_has_a_folder_of_images_per_class(synthetic_root):
    for split in ("train", "val"):
        folders = sorted(p for p in (synthetic_root / split).iterdir())
        assert [p.name for p in folders] == imagenet_wnids()
        assert all(len(list(p.glob("*.jpg"))) == 1 for p in folders)


def test_the_imagenet_loader_reads_it_with_the_imagenet_class_names(synthetic_root):
    data = load_dataset(f"imagenet:{synthetic_root}:train", pixel_transform({"size": 32}))
    assert len(data) == 1000 and data.classnames == list(IMAGENET_CLASSNAMES)
    assert data.labels == list(range(1000))  # one image per class, in class-index order
    for index in (0, 999):
        pixels, label = data.dataset[index]
        assert label == index and pixels.shape == (3, 32, 32) and 0 <= pixels.min() <= pixels.max() <= 1
        assert pixels.std() > 0.01  # noise, not a blank image
    assert len(load_dataset(f"imagenet:{synthetic_root}:val", None)) == 1000


def test_the_same_seed_writes_the_same_bytes(synthetic_root, tmp_path):
    again = write_synthetic_imagenet(tmp_path / "again", images_per_class=1, val_images_per_class=1)
    name = "train/n01440764/n01440764_0.jpg"
    assert (again / name).read_bytes() == (synthetic_root / name).read_bytes()
    other = write_synthetic_imagenet(tmp_path / "other", images_per_class=1, val_images_per_class=1, seed=1)
    assert (other / name).read_bytes() != (synthetic_root / name).read_bytes()


def test_it_refuses_a_folder_that_holds_anything(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_synthetic_imagenet(tmp_path / "imagenet", images_per_class=1)
    assert list((tmp_path / "imagenet").iterdir()) == [tmp_path / "imagenet" / "train"]  # nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_synthetic_imagenet(empty, images_per_class=1) == empty  # an empty folder is fine


def test_the_command_refuses_a_folder_with_files_and_writes_a_new_one(tmp_path, capsys):
    from capt.cli import main
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"not noise")
    assert main(["synthetic-imagenet", str(tmp_path / "mine"), "--no-progress"]) != 0
    assert "photo.jpg" in {p.name for p in (tmp_path / "mine").iterdir()} and len(list((tmp_path / "mine").iterdir())) == 1
    assert main(["synthetic-imagenet", str(tmp_path / "new"), "--images-per-class", "1", "--no-progress"]) == 0
    assert f"imagenet:{tmp_path / 'new'}:train" in capsys.readouterr().out
    assert len(list((tmp_path / "new" / "train").iterdir())) == 1000
