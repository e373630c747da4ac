import random

import numpy as np
import pytest

from capt.data import load_dataset
from capt.data.fashion import fashion_mnist_arrays
from capt.data.toyworld import (COLOURS, COUNT_WORDS, SHAPES, SPLITS, Scene, ToyWorldTask, caption_sample, captions,
                                held_out_pairs, names_a_held_out_pair, render, sample_scene, scene_facts, seen_pairs)
from capt.pretrain import CaptionStream, PretrainConfig
from conftest import write_idx_gz


def test_rendering_is_a_function_of_the_seed():
    scene = Scene("star", "red", "large", "striped", 2, "middle")
    assert np.array_equal(np.asarray(render(scene, 5)), np.asarray(render(scene, 5)))
    assert not np.array_equal(np.asarray(render(scene, 5)), np.asarray(render(scene, 6)))
    assert render(scene, 5).size == (64, 64)


def test_held_out_pairs_keep_every_attribute_seen_with_partners():
    held_out = held_out_pairs()
    assert len(held_out) == round(0.2 * 64)
    seen = seen_pairs(held_out)
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    assert held_out == held_out_pairs()


def test_pretraining_stream_never_captions_a_held_out_pair_together():
    held_out = held_out_pairs()
    drawn = 0
    for index in range(400):
        _, caption, facts = caption_sample(index, 0, held_out)
        drawn += (dict(facts)["colour"], dict(facts)["shape"]) in held_out
        for colour, shape in held_out:
            assert not (colour in caption.text and (shape in caption.text)), caption
        assert not (names_a_held_out_pair(caption) and (dict(facts)["colour"], dict(facts)["shape"]) in held_out)
    assert 40 <= drawn <= 120  # about 13/64 of the images show a held-out pair, captioned by one attribute


def test_strict_stream_never_draws_a_held_out_pair():
    held_out = held_out_pairs()
    for index in range(300):
        _, _, facts = caption_sample(index, 0, held_out, draw_held_out=False)
        assert (dict(facts)["colour"], dict(facts)["shape"]) not in held_out


def test_captions_are_truthful_and_claim_what_their_text_says():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng, seen_pairs(held_out_pairs()))
        for caption in captions(scene, rng):
            assert caption.claims and caption.claims <= scene_facts(scene), caption
            claimed = dict(caption.claims)
            words = caption.text.rstrip(".").split()
            shape_named = any(w in words for w in (scene.shape, scene.shape + "s", scene.shape + "es"))
            assert shape_named == ("shape" in claimed), caption
            assert (scene.colour in words) == ("colour" in claimed), caption
            assert any(w in words for w in ("striped", "dotted")) == ("texture" in claimed), caption
            if "count" in claimed and claimed["count"] > 1:
                assert COUNT_WORDS[claimed["count"]] in words, caption
            assert not set(words) & (set(SHAPES) | set(COLOURS)) - {scene.shape, scene.colour}, caption


def test_tasks_label_what_is_drawn():
    task = ToyWorldTask("pairs", "heldout", size=50)
    held_out = held_out_pairs()
    for scene, target in zip(task.scenes, task.targets):
        assert (scene.colour, scene.shape) in held_out
        assert task.classnames[target] == f"{scene.colour} {scene.shape}"
    data = load_dataset("toyworld_shapes::test", None)
    assert data.classnames == SHAPES and data.templates == ["a photo of a {}."] and len(data) == 2000
    image, label = data.dataset[0]
    assert image.size == (64, 64) and label == data.labels[0]


def test_no_two_splits_share_an_image_and_images_draws_every_pair():
    images = ToyWorldTask("pairs", "images", size=1000)
    pairs = {(scene.colour, scene.shape) for scene in images.scenes}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES}  # the held-out pairs too, as pretraining draws them
    drawn = {split: set(zip(task.scenes, task.render_seeds)) for split in SPLITS
             for task in [ToyWorldTask("pairs", split, size=1000)]}
    for first in SPLITS:
        for second in SPLITS:
            assert first == second or not drawn[first] & drawn[second], (first, second)
    held_out = held_out_pairs()
    assert all((scene.colour, scene.shape) in held_out for scene, _ in drawn["heldout-val"])
    assert not any((scene.colour, scene.shape) in held_out for scene, _ in drawn["val"])


def test_fashion_mnist_from_gzipped_idx_files(tmp_path):
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 7]))
    images, labels = fashion_mnist_arrays(tmp_path, "train")
    assert images.shape == (2, 28, 28) and labels.tolist() == [3, 7]
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist_arrays(tmp_path, "test")


def test_caption_stream_is_reproducible_and_mixes_in_fashion_mnist(tmp_path):
    config = PretrainConfig(fashion_root=None)
    stream = CaptionStream(config, 64)
    first, again = stream[11], CaptionStream(config, 64)[11]
    assert first[1] == again[1] and np.array_equal(first[0].numpy(), again[0].numpy())
    assert first[0].shape == (3, 64, 64)
