"""The service's logic in-process (serving/model.py), on the embedded default model."""

import numpy as np
import pytest
import torch

from conftest import toy_image
from serving.errors import Busy, ProbeTimeout, RequestError
from serving.model import Limits, ServingModel
from capt.data.toyworld import COLOURS, SHAPES, ToyWorldTask


@pytest.fixture(scope="module")
def served(default_bundle):
    # No time limit that a loaded CI machine could hit; the limit has its own test below.
    return ServingModel(default_bundle, Limits(max_concurrent_probes=1, max_probe_seconds=3600))


def test_label_sets_are_given_per_request(served):
    image = toy_image("star", "blue")
    shapes = served.classify([image], SHAPES, top_k=3)[0]
    colours = served.classify([image], list(COLOURS), top_k=8)[0]
    assert [p["label"] for p in shapes] != [] and all(p["label"] in SHAPES for p in shapes) and len(shapes) == 3
    assert {p["label"] for p in colours} == set(COLOURS)
    assert sum(p["probability"] for p in colours) == pytest.approx(1.0, abs=1e-5)
    assert shapes[0]["probability"] >= shapes[1]["probability"] >= shapes[2]["probability"]


def test_the_default_model_really_classifies(served):
    """Well above chance (1/8) on toy-world images of pairs seen in pretraining, through the served path."""
    for task, floor in (("shapes", 0.5), ("colours", 0.85)):
        data = ToyWorldTask(task, "test", size=64)
        images = [data[i][0] for i in range(len(data))]
        ranked = served.classify(images[:32], data.classnames, top_k=1) + served.classify(images[32:], data.classnames, top_k=1)
        accuracy = np.mean([r[0]["label"] == data.classnames[t] for r, t in zip(ranked, data.targets)])
        assert accuracy >= floor, (task, accuracy)


def test_repeated_label_sets_hit_the_cache(served):
    labels = ["a red thing", "a blue thing"]
    hits = served.label_cache.hits
    served.classify([toy_image()], labels)
    served.classify([toy_image()], labels)
    assert served.label_cache.hits == hits + 1


def test_onnx_and_pytorch_agree_on_clean_images(served):
    images = [toy_image(s, c, seed=3) for s, c in [("ring", "pink"), ("arrow", "orange"), ("diamond", "purple")]]
    labels = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    onnx = served.encode_images(served.pixels(images))
    with torch.no_grad():
        reference = served.torch_model.encode_image(torch.from_numpy(served.pixels(images))).numpy()
    assert np.abs(onnx - reference).max() < 1e-4
    for image in images:
        result = served.probe(image, labels, eps=0.0, steps=1)
        assert result["served_onnx"]["clean"]["label"] == result["clean"]["label"]


def test_probe_with_zero_eps_never_flips(served):
    result = served.probe(toy_image(), ["red star", "blue star", "red circle"], eps=0.0, steps=10)
    assert not result["flipped"] and result["linf_distance"] == 0.0
    # The clean logits come from a gradient-tracking forward, which may take other kernels: 1e-5.
    assert result["margin_clean"] == pytest.approx(result["margin_adversarial"], abs=1e-5)
    assert result["sanity"]["attack_did_nothing"]


def test_probe_with_a_large_eps_flips_and_reports(served):
    result = served.probe(toy_image("star", "red"), list(COLOURS), eps=32 / 255, steps=20, restarts=2,
                          return_images=True, search_eps=True)
    assert result["flipped"] and result["margin_adversarial"] < 0 < result["margin_clean"]
    assert result["linf_distance"] <= 32 / 255 + 1e-6
    assert result["adversarial_png"] and result["perturbation_png"]
    assert result["eps_search"]["smallest_flipping_eps"] is not None
    assert result["eps_search"]["smallest_flipping_eps"] <= 32 / 255


@pytest.mark.parametrize("kwargs,message", [
    ({"labels": ["only one"]}, "at least 2"),
    ({"labels": ["a", "a"]}, "duplicate"),
    ({"labels": ["a", ""]}, "empty"),
    ({"labels": ["a", "b"], "eps": -0.1}, "eps must be"),
    ({"labels": ["a", "b"], "eps": float("nan")}, "eps must be"),
    ({"labels": ["a", "b"], "eps": 1.0}, "over the limit"),
    ({"labels": ["a", "b"], "steps": 10_000}, "steps must be"),
    ({"labels": ["a", "b"], "restarts": 0}, "restarts must be"),
    ({"labels": ["a", "b"], "true_label": "c"}, "not one of the labels"),
])
def test_bad_probe_requests_are_refused(served, kwargs, message):
    with pytest.raises(RequestError, match=message):
        served.probe(toy_image(), **kwargs)


def test_bad_classify_requests_are_refused(served):
    with pytest.raises(RequestError, match="at least 1"):
        served.classify([toy_image()], [])
    with pytest.raises(RequestError, match="template"):
        served.classify([toy_image()], ["a"], templates=["no placeholder"])
    with pytest.raises(RequestError, match="no image"):
        served.classify([], ["a"])


def test_probes_beyond_the_limit_are_refused_at_once(served):
    served.probe_slots.acquire()
    try:
        with pytest.raises(Busy, match="already running"):
            served.probe(toy_image(), ["a", "b"], eps=0.0)
    finally:
        served.probe_slots.release()


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPT_MAX_PROBE_STEPS", "7")
    monkeypatch.setenv("CAPT_MAX_PROBE_EPS", "0.01")
    limits = Limits.from_env()
    assert limits.max_probe_steps == 7 and limits.max_probe_eps == 0.01
    assert limits.max_labels == Limits().max_labels


def test_a_probe_past_its_time_limit_stops_at_the_next_forward_pass(default_bundle):
    model = ServingModel(default_bundle, Limits(max_probe_seconds=0.0))
    with pytest.raises(ProbeTimeout, match="limit of 0 s"):
        model.probe(toy_image(), list(COLOURS), eps=4 / 255, steps=5)
    assert model.probe_slots.acquire(blocking=False)  # the slot was given back


def test_labels_longer_than_the_text_context_are_refused(served):
    room = served.manifest["tokenizer"]["context_length"]
    with pytest.raises(RequestError, match=f"longer than the text context of {room} tokens"):
        served.classify([toy_image()], ["red", "very " * room + "red"])
    assert served.classify([toy_image()], ["red", "very " * (room // 4) + "red"])  # a long one that fits


def test_a_probe_on_one_thread_runs_on_one_thread_and_finds_the_same_attack(default_bundle, served):
    import threading
    one_thread = ServingModel(default_bundle, Limits(probe_threads=1, max_probe_seconds=3600))
    seen = {}

    def probe_in_a_worker_thread():  # as the server runs it; OpenMP's thread count is per calling thread
        seen["result"] = one_thread.probe(toy_image(), list(COLOURS), eps=4 / 255, steps=5)
        seen["threads"] = torch.get_num_threads()
    worker = threading.Thread(target=probe_in_a_worker_thread)
    worker.start()
    worker.join()
    reference = served.probe(toy_image(), list(COLOURS), eps=4 / 255, steps=5)
    assert seen["threads"] == 1
    assert seen["result"]["adversarial"]["label"] == reference["adversarial"]["label"]
    assert seen["result"]["margin_adversarial"] == pytest.approx(reference["margin_adversarial"], abs=1e-4)
