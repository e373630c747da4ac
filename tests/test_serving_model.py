"""The service's logic in-process (serving/model.py), on the embedded default model."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import toy_image
from serving.errors import Busy, ProbeTimeout, RequestError
from serving.engine import choose_ort_threads, ort_threads_choice
from serving.model import Limits, ServingModel
from capt.data.toyworld import COLOURS, SHAPES, ToyWorldTask


@pytest.fixture(scope="module")
def served(default_bundle):
    # No time limit that a loaded CI machine could hit; the limit has its own test below.
    return ServingModel(default_bundle, Limits(probe_precision="fp32", max_concurrent_probes=1, max_probe_seconds=3600))


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
    # The exported graph (fp32); the served engine may be another path (serving/engine.py, tests/test_engine.py).
    onnx = served.encode_images_exported(served.pixels(images))
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
    # Two forwards (one with autograd, one without) may take different attention kernels: 7e-6 apart
    # measured; 1e-4 is still four orders of magnitude under a margin's size. linf_distance is exact.
    assert result["margin_clean"] == pytest.approx(result["margin_adversarial"], abs=1e-4)
    assert result["sanity"]["attack_did_nothing"]


def test_probe_with_a_large_eps_flips_and_reports(served):
    result = served.probe(toy_image("star", "red"), list(COLOURS), eps=32 / 255, steps=20, restarts=2,
                          return_images=True, search_eps=True)
    assert result["flipped"] and result["margin_adversarial"] < 0 < result["margin_clean"]
    assert result["linf_distance"] <= 32 / 255 + 1e-6
    assert result["adversarial_png"] and result["perturbation_png"]
    assert result["linf_distance_255"] <= 32 and result["adversarial_quantised"] is True
    search = result["eps_search"]
    assert search["smallest_flipping_eps"] is not None and search["smallest_flipping_eps"] <= 32 / 255
    assert search["grid"][0]["eps_255"] == 1  # no smaller eps: an 8-bit image moves by 1/255 or not at all
    assert search["largest_holding_eps"] < search["smallest_flipping_eps"]


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


@pytest.mark.parametrize("resize_mode, message", [("shortest", "would be resized to"), ("longest", "too thin")])
def test_images_whose_resize_is_out_of_bounds_are_refused(served, monkeypatch, resize_mode, message):
    # "shortest": a 16384x1 strip becomes 64 x 1,048,576 pixels; "longest": a 2048x8 strip's short side
    # becomes 0 and torchvision raises (a 500) unless the model refuses it first.
    from serving.errors import ImageRejected
    monkeypatch.setitem(served.torch_model.preprocess_cfg, "resize_mode", resize_mode)
    strip = Image.new("RGB", (16384, 1) if resize_mode == "shortest" else (2048, 8))
    with pytest.raises(ImageRejected, match=message):
        served.classify([strip], ["a", "b"])
    assert served.pixels([Image.new("RGB", (128, 64))]).shape[1:] == (3, 64, 64)  # a plain image still goes through


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


@pytest.mark.parametrize("name, raw", [("CAPT_ORT_THREADS", "abc"), ("CAPT_ORT_THREADS", "1.5"), ("CAPT_MAX_IMAGES", ""),
                                       ("CAPT_MAX_IMAGES", "-3"), ("CAPT_MAX_PROBE_EPS", "nan"), ("CAPT_MAX_PROBE_EPS", "x")])
def test_a_bad_limit_in_the_environment_is_refused_by_name(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=rf"^{name} must be (an integer|a number) >= 0 .*got {re.escape(repr(raw))}$"):
        Limits.from_env()


def test_a_probe_past_its_time_limit_stops_at_the_next_forward_pass(default_bundle):
    model = ServingModel(default_bundle, Limits(probe_precision="fp32", max_probe_seconds=0.0))
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
    one_thread = ServingModel(default_bundle, Limits(probe_precision="fp32", probe_threads=1, max_probe_seconds=3600))
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


# ---- templates ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hand_prompted(tmp_path_factory, colour_folder):
    """A bundle without learned text prompts (vision prompts only): there request templates are applied."""
    from safetensors.torch import save_file
    from capt import PromptConfig, PromptedCLIP, create_clip
    from capt.checkpoint import save_checkpoint
    from export import export_bundle
    root = tmp_path_factory.mktemp("hand-prompted")
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip("capt-tiny-vit").model.state_dict().items()}, weights)
    torch.manual_seed(0)
    model = PromptedCLIP(create_clip("capt-tiny-vit", str(weights)), PromptConfig(vision_n_ctx=2, vision_depth=1))
    checkpoint = save_checkpoint(root / "run", 1, model, {"method": "vpt", "classnames": ["red", "green", "blue"]})
    export_bundle(checkpoint, root / "bundle", sample_data=f"imagefolder:{colour_folder}:test")
    return ServingModel(root / "bundle", Limits(probe_precision="fp32", max_probe_seconds=3600))


MALFORMED_TEMPLATES = [
    ("{x} a photo of {}", "exactly once"),        # passes a count of "{}", then a KeyError in .format
    ("{0.__class__} {}", "exactly once"),         # an attribute lookup, then an IndexError
    ("a photo of {0}", "plain '{}'"),
    ("a photo of {!r}", "plain '{}'"),
    ("a photo of {:>40}", "plain '{}'"),
    ("a photo of {label}", "plain '{}'"),
    ("a { photo of {}", "not a valid format string"),
    ("a photo of {} }", "not a valid format string"),
    ("a photo", "exactly once"),
]


@pytest.mark.parametrize("bundle", ["served", "hand_prompted"])
@pytest.mark.parametrize("template,message", MALFORMED_TEMPLATES)
def test_malformed_templates_are_refused(request, bundle, template, message):
    model = request.getfixturevalue(bundle)
    with pytest.raises(RequestError, match=re.escape(message)):
        model.classify([toy_image()], ["red", "blue"], templates=["a photo of a {}.", template])


def test_templates_with_literal_braces_are_applied_where_the_bundle_uses_templates(hand_prompted):
    labels, template = ["red", "blue"], "a {{photo}} of a {}."
    assert hand_prompted.templates_apply([template])
    tokens = hand_prompted.torch_model.tokenize(labels, template)
    assert torch.equal(tokens, hand_prompted.torch_model.tokenize(["a {photo} of a red.", "a {photo} of a blue."], "{}"))
    answer = hand_prompted.classify_answer([toy_image()], labels, templates=[template, "a {} thing"])
    assert answer["templates_applied"] is True and "templates_note" not in answer
    assert {p["label"] for p in answer["predictions"][0]} == set(labels)
    plain = hand_prompted.classify_answer([toy_image()], labels)
    assert plain["templates_applied"] is False and "templates_note" not in plain


def test_templates_are_reported_as_not_applied_on_a_text_prompted_bundle(served):
    assert served.torch_model.config.text_n_ctx > 0  # the default model has learned text prompts
    labels = ["a {weird} label", "a plain label"]
    plain = served.classify_answer([toy_image()], labels)
    assert plain["templates_applied"] is False and "templates_note" not in plain
    templated = served.classify_answer([toy_image()], labels, templates=["a {{photo}} of a {}."])
    assert templated["templates_applied"] is False and "learned" in templated["templates_note"]
    # Templates that are not used do not make another label set: the same embeddings, from the cache.
    assert templated["label_cache_hit"] is True
    assert _ranking(templated) == _ranking(plain)


def test_a_template_that_passes_the_check_always_formats():
    """The check is what keeps ``template.format(label)`` from raising (a 500) on any bundle."""
    from hypothesis import given, strategies as st
    from capt.data.templates import check_template

    @given(st.text(alphabet="{}!:0x. a", max_size=12))
    def formats_or_is_refused(template):
        try:
            check_template(template)
        except ValueError:
            return
        assert template.format("LABEL").count("LABEL") == 1  # the alphabet has no L: that is the label
    formats_or_is_refused()


def test_concurrent_cold_classify_requests_encode_the_label_set_once(served, monkeypatch):
    """Threads started together with a label set no one has asked for: one text encode, one miss."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from serving.model import LabelCache
    threads, labels = 8, ["a fresh red thing", "a fresh blue thing"]
    monkeypatch.setattr(served, "label_cache", LabelCache(8))
    start, arrived, condition, encodes = threading.Barrier(threads), [0], threading.Condition(), []
    encode_texts = served.encode_texts

    def encode_once_all_arrived(texts, template=None):  # so that every request comes in while it runs
        with condition:
            assert condition.wait_for(lambda: arrived[0] == threads, timeout=60)
        encodes.append(tuple(texts))
        return encode_texts(texts, template)
    monkeypatch.setattr(served, "encode_texts", encode_once_all_arrived)

    def request(_):
        start.wait(timeout=60)
        with condition:
            arrived[0] += 1
            condition.notify_all()
        return served.classify_answer([toy_image()], labels)
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(request, range(threads)))
    assert encodes == [tuple(labels)]
    assert [a["label_cache_hit"] for a in answers].count(False) == 1
    assert (served.label_cache.misses, served.label_cache.hits) == (1, threads - 1)
    assert all(_ranking(a) == _ranking(answers[0]) for a in answers)


def _ranking(answer):
    return [[p["label"] for p in row] for row in answer["predictions"]]


def test_onnx_runtime_threads_of_the_served_sessions_come_from_the_limits(default_bundle, served, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE", "onnx-fp32")  # the exported graph's own session, no self-test
    one = ServingModel(default_bundle, Limits(ort_threads=1), check_twin=False)
    for session in (one.image_session, one.text_session, one.engine.session):
        assert session.get_session_options().intra_op_num_threads == 1
    assert one.info()["ort_threads"]["used"] == 1
    image = toy_image("star", "blue")
    assert one.encode_images(one.pixels([image])) == pytest.approx(served.encode_images_exported(served.pixels([image])), abs=1e-5)
    with pytest.raises(ValueError, match="CAPT_ORT_THREADS must be >= 0"):
        ServingModel(default_bundle, Limits(ort_threads=-1), check_twin=False)


@pytest.mark.parametrize("cores, seconds, threads", [
    (1, None, 1),
    (16, None, 15),  # 16 / 15 < 1.3: no measurement could make all cores worth it
    (2, {1: {1: 1.0, 8: 8.0}, 2: {1: 1.5, 8: 7.8}}, 1),  # the default model here: a second thread buys nothing
    (2, {1: {1: 1.0, 8: 8.0}, 2: {1: 0.55, 8: 4.4}}, 2),  # a large model: the encoder limits the server
    (4, {3: {1: 1.0, 8: 8.0}, 4: {1: 0.8, 8: 6.4}}, 3),  # 1.25x < 1.3
])
def test_auto_onnx_runtime_threads_leave_the_event_loop_a_core_unless_the_encoder_needs_them(cores, seconds, threads):
    chosen, reason = ort_threads_choice(cores, seconds)
    assert chosen == threads and reason


def test_the_served_sessions_use_the_measured_auto_threads_by_default(served):
    reported = served.info()["ort_threads"]
    assert served.limits.ort_threads == 0 and reported["requested"] == 0 and served.ort_threads == reported["used"]
    sessions = [served.image_session, served.text_session]
    if hasattr(served.engine, "session"):  # the served encoder's own session (onnx-*)
        sessions.append(served.engine.session)
    for session in sessions:
        assert session.get_session_options().intra_op_num_threads == served.ort_threads
    cores = served.hardware.compute_cores
    if cores >= 2 and cores / (cores - 1) >= 1.3:  # 2, 3 or 4 cores: timed with cores - 1 and cores threads
        times = reported["images_per_s"]
        assert set(times) == {str(cores - 1), str(cores)} and all(set(t) == {"1", "8"} for t in times.values())
        seconds = {int(t): {int(b): int(b) / v for b, v in by_batch.items()} for t, by_batch in times.items()}
        speedup = np.exp(np.mean([np.log(seconds[cores - 1][b] / seconds[cores][b]) for b in (1, 8)]))
        if abs(speedup - 1.3) > 0.02:  # the report's figures are rounded: right at the threshold either is right
            assert served.ort_threads == ort_threads_choice(cores, seconds)[0]


def test_choose_ort_threads_times_the_graph_with_both_thread_counts(default_bundle):
    from export.bundle import IMAGE_ONNX
    threads, report = choose_ort_threads(default_bundle / IMAGE_ONNX, 64, cores=2, budget_s=0.2)
    assert threads in (1, 2) and report["used"] == threads
    assert report["reason"].startswith("every core" if threads == 2 else "one core left to the event loop")
    assert set(report["images_per_s"]) == {"1", "2"} and all(v > 0 for t in report["images_per_s"].values() for v in t.values())
