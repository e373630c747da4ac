"""serving/engine.py: which path serves the image encoder, by capability and a self-test; CAPT_ENGINE."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capt.hardware import Hardware, detect
from export.bundle import load_bundle
from serving.engine import (ENGINES, INT8_IMAGES_PER_RUN, MAX_BATCH_DIFF, MIN_GAIN, SELF_TEST_MAX_LABELS, Candidate, DerivedGraphFailed, EngineError,
                            ImageEngine, OnnxEngine, TorchAutocastEngine, _derived_graph, batch_dependence, candidates,
                            choose_engine, sample_set, self_test_labels, slower_than)
from serving.model import Limits, ServingModel

BARE = Hardware.from_flags(set())  # an x86 CPU without AVX2: only the exported fp32 graph applies
AVX2 = Hardware.from_flags({"avx2"})
ZEN5 = Hardware.from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})


@pytest.fixture(scope="module")
def bundle(default_bundle):
    return load_bundle(default_bundle, ["CPUExecutionProvider"], check=False)


class _Wrapped:
    """An engine computing the exported graph's embeddings through ``change``."""

    def __init__(self, name, session, change):
        self.name, self.session, self.change = name, session, change

    def encode(self, pixels):
        return self.change(self.session.run(None, {"pixels": pixels.astype(np.float32)})[0])


def _extra(bundle, name, change):
    return Candidate(name, True, "a test engine", lambda: _Wrapped(name, bundle.image_session, change))


def _row(report, name):
    return next(row for row in report["candidates"] if row["name"] == name)


def test_candidates_follow_the_capabilities(bundle):
    applies = {c.name: c.applies for c in candidates(bundle, ZEN5)}
    assert list(applies) == list(ENGINES)
    assert applies["onnx-fp32"] and applies["onnx-int8"] and applies["torch-bf16"]
    assert not candidates(bundle, AVX2)[2].applies  # torch-bf16 without native bf16
    if not torch.cuda.is_available():
        assert not any(applies[name] for name in ("onnx-cuda-fp32", "onnx-cuda-fp16", "tensorrt"))
    bare = {c.name: c.applies for c in candidates(bundle, BARE)}
    assert [name for name, on in bare.items() if on] == ["onnx-fp32"] or torch.cuda.is_available()


def test_only_one_candidate_needs_no_self_test(bundle):
    if torch.cuda.is_available():
        pytest.skip("CUDA paths apply here")
    engine, report = choose_engine(bundle, BARE, "auto")
    assert engine.name == "onnx-fp32" and report["self_test"] is False and isinstance(engine, ImageEngine)
    assert "only" in report["reason"]


def test_an_engine_that_disagrees_with_fp32_is_rejected(bundle):
    flipped = _extra(bundle, "flipped", lambda e: -e)  # every argmax becomes the argmin
    engine, report = choose_engine(bundle, BARE, "auto", extra=[flipped])
    assert engine.name == "onnx-fp32"
    row = _row(report, "flipped")
    assert row["verdict"].startswith("rejected: top-1 agreement") and row["top1_agreement"] < 0.99
    assert report["samples"]["images"] >= 8 and report["self_test"] is True


def test_a_candidate_that_fails_to_load_is_reported(bundle):
    def broken():
        raise OSError("no such library")
    engine, report = choose_engine(bundle, BARE, "auto", extra=[Candidate("broken", True, "test", broken)])
    assert engine.name == "onnx-fp32"
    assert "failed to load" in _row(report, "broken")["verdict"] and "no such library" in _row(report, "broken")["error"]


def test_every_candidate_is_measured_and_the_choice_is_a_safe_one(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))  # int8's graph made here, not read from ~/.cache
    engine, report = choose_engine(bundle, ZEN5, "auto")
    tried = [row for row in report["candidates"] if row.get("loaded") is not None]
    assert {row["name"] for row in tried} >= {"onnx-fp32", "onnx-int8", "torch-bf16"}
    for row in tried:
        assert row["img_s_b1"] > 0 and row["img_s_batch"] > 0 and "verdict" in row
    chosen = _row(report, engine.name)
    assert chosen["verdict"] == "chosen" and chosen["top1_agreement"] >= 0.99
    assert chosen["batch_invariant"] is True and report["batch_invariant"] is True
    int8 = _row(report, "onnx-int8")  # one image a call: its activation scales are its own
    assert int8["loaded"] and int8["batch_invariant"] is True and int8["batch_max_abs_diff"] <= MAX_BATCH_DIFF
    assert int8["images_per_call"] == 1 and "activation scales" in int8["images_per_call_why"]
    assert engine.name == report["engine"] and report["reason"]


def test_int8_runs_one_image_a_call_because_batched_int8_depends_on_the_batch(bundle, tmp_path, monkeypatch):
    """Dynamic quantisation computes one activation scale over the whole input tensor: run as a batch,
    an image's embedding moves with its neighbours (3e-3..6e-3 on the default model, 30x the bound and
    more); the served onnx-int8 engine runs each image alone and its answers do not depend on the batch."""
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    served = next(c for c in candidates(bundle, AVX2) if c.name == "onnx-int8").build()
    assert served.max_batch == INT8_IMAGES_PER_RUN == 1
    samples = sample_set(bundle, 16)[0]
    batched = OnnxEngine("batched-int8", served.session)
    assert batch_dependence(batched, samples, batched.encode(samples)) > 5 * MAX_BATCH_DIFF
    assert batch_dependence(served, samples, served.encode(samples)) <= MAX_BATCH_DIFF


def _batch_dependent(bundle, name="mixer"):
    """Subtracts a fraction of its batch's mean embedding and renormalises: alone, an image's embedding
    is its own; in a batch it leans away from its neighbours (what per-batch activation scales do)."""
    def change(e):
        shifted = e - 0.05 * e.mean(0, keepdims=True)
        return shifted / np.linalg.norm(shifted, axis=-1, keepdims=True)
    return _extra(bundle, name, change)


def test_an_engine_whose_answers_depend_on_the_batch_is_rejected(bundle):
    engine, report = choose_engine(bundle, BARE, "auto", extra=[_batch_dependent(bundle)])
    assert engine.name == "onnx-fp32" and report["batch_invariant"] is True
    row = _row(report, "mixer")
    assert row["top1_agreement"] >= 0.99  # it agrees with fp32: only the batch makes it unsafe
    assert row["batch_invariant"] is False and row["batch_max_abs_diff"] > 10 * MAX_BATCH_DIFF
    assert row["verdict"].startswith("rejected: answers depend on batch composition: max |alone - in batch| = ")


def test_slower_than_names_the_batch_where_a_path_loses():
    fp32 = {"img_s_b1": 100.0, "img_s_batch": 1000.0, "batch": 32}
    assert slower_than({"img_s_b1": 300.0, "img_s_batch": 1500.0}, fp32) is None
    assert slower_than({"img_s_b1": 95.0, "img_s_batch": 950.0}, fp32) is None  # within MIN_GAIN: noise
    assert slower_than({"img_s_b1": 80.0, "img_s_batch": 5000.0}, fp32) == "0.80x the fp32 path at batch 1"
    assert slower_than({"img_s_b1": 500.0, "img_s_batch": 700.0}, fp32) == "0.70x the fp32 path at batch 32"


@pytest.mark.parametrize("gains", [(20.0, 0.2), (0.2, 20.0)], ids=["loses-loaded", "loses-alone"])
def test_a_path_that_loses_at_one_batch_is_not_chosen_for_its_geometric_mean(bundle, monkeypatch, gains):
    """A path 20x fp32 at one batch and 0.2x at the other (2x in the geometric mean) is not served. The
    self-test's timings are replaced by those ratios to the reference's own, so no CPU's speed decides."""
    import serving.engine as engine_module
    real_self_test, measured_fp32 = engine_module.self_test, {}

    def self_test(engine, samples, text, reference, budget_s):
        result, embeddings = real_self_test(engine, samples, text, reference, budget_s)
        if reference is None:
            measured_fp32.update(result)
        elif engine.name == "lopsided":
            b1, batch = measured_fp32["img_s_b1"] * gains[0], measured_fp32["img_s_batch"] * gains[1]
            result.update(img_s_b1=b1, img_s_batch=batch, speed=(b1 * batch) ** 0.5)
        return result, embeddings
    monkeypatch.setattr(engine_module, "self_test", self_test)
    engine, report = choose_engine(bundle, BARE, "auto", extra=[_extra(bundle, "lopsided", lambda e: e.copy())])
    row, fp32 = _row(report, "lopsided"), _row(report, "onnx-fp32")
    assert row["speed"] > MIN_GAIN * fp32["speed"]  # the geometric mean alone would have chosen it
    assert engine.name == "onnx-fp32" and row["verdict"].startswith("safe, but 0.20x the fp32 path at batch ")
    assert row["verdict"].endswith("must not lose where fp32 is faster") and "not 1.10x slower" in report["reason"]
    assert (f"at batch {row['batch']}" if gains[1] < 1 else "at batch 1:") in row["verdict"]


def test_an_exact_engine_passes_the_batch_invariance_test(bundle):
    engine, report = choose_engine(bundle, BARE, "auto", extra=[_extra(bundle, "same", lambda e: e.copy())])
    for name in ("same", "onnx-fp32"):
        row = _row(report, name)
        assert row["batch_invariant"] is True and row["batch_max_abs_diff"] <= MAX_BATCH_DIFF
        assert not row["verdict"].startswith("rejected")
    assert engine.name in ("same", "onnx-fp32") and report["max_batch_diff"] == MAX_BATCH_DIFF


def test_an_explicit_batch_dependent_engine_is_served_and_flagged(bundle, caplog):
    with caplog.at_level("WARNING", logger="capt.serving"):
        engine, report = choose_engine(bundle, BARE, "mixer", extra=[_batch_dependent(bundle)])
    assert engine.name == "mixer" and report["batch_invariant"] is False
    assert "batch-dependent" in report["warning"] and "batch-dependent" in report["reason"]
    assert _row(report, "mixer")["verdict"].startswith("chosen (override), batch-dependent: answers depend on batch")
    assert any("batch-dependent" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_an_explicit_engine_is_honoured_and_a_bad_one_refused(bundle):
    same = _extra(bundle, "same", lambda e: e.copy())
    engine, report = choose_engine(bundle, BARE, "same", extra=[same])
    assert engine.name == "same" and _row(report, "same")["verdict"] == "chosen (override)"
    with pytest.raises(EngineError, match="top-1 agreement"):
        choose_engine(bundle, BARE, "flipped", extra=[_extra(bundle, "flipped", lambda e: -e)])
    with pytest.raises(EngineError, match="not an engine"):
        choose_engine(bundle, BARE, "fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA loads here")
def test_a_gpu_engine_on_a_machine_without_one_is_refused(bundle):
    with pytest.raises(EngineError, match="cannot serve"):
        choose_engine(bundle, detect(), "onnx-cuda-fp32")


def test_capt_engine_is_read_by_the_serving_model(default_bundle, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE", "onnx-fp32")
    model = ServingModel(default_bundle, Limits(), ["CPUExecutionProvider"], check_twin=False)
    assert model.engine.name == "onnx-fp32" and model.engine_report["self_test"] is False
    monkeypatch.setenv("CAPT_ENGINE", "no-such-engine")
    with pytest.raises(EngineError, match="CAPT_ENGINE='no-such-engine'"):
        ServingModel(default_bundle, Limits(), ["CPUExecutionProvider"], check_twin=False)
    monkeypatch.setenv("CAPT_ENGINE", "torch-bf16")  # an explicit engine runs even where auto would not offer it
    model = ServingModel(default_bundle, Limits(), check_twin=False)
    assert model.engine_report["override"] == "torch-bf16"


def test_info_says_which_path_serves_and_why(default_bundle, monkeypatch):
    monkeypatch.delenv("CAPT_ENGINE", raising=False)
    model = ServingModel(default_bundle, Limits(), ["CPUExecutionProvider"], check_twin=False)
    info = model.info()
    assert info["image_engine"]["serving"] == model.engine.name == info["image_engine"]["engine"]
    assert info["image_engine"]["reason"] and info["image_engine"]["candidates"]
    assert info["image_engine"]["batch_invariant"] in (True, None) and not info["image_engine"].get("warning")
    assert {row["name"] for row in info["image_engine"]["candidates"]} == set(ENGINES)
    assert info["hardware"]["features"] == detect().to_dict()["features"]
    assert info["probe_precision"]["used"] in ("fp32", "bf16") and info["onnx_provider"] == "CPUExecutionProvider"


def test_classify_runs_on_the_chosen_engine(default_bundle):
    model = ServingModel(default_bundle, Limits(), check_twin=False, engine="onnx-fp32")
    calls = []

    class Spy:
        name = "spy"

        def encode(self, pixels):
            calls.append(len(pixels))
            return model.encode_images_exported(pixels)
    model.engine = Spy()
    from PIL import Image
    answer = model.classify([Image.new("RGB", (64, 64), (200, 30, 30))], ["red", "green"], top_k=1)
    assert calls == [1] and answer[0][0]["label"] in ("red", "green")


def test_the_probe_attacks_under_autocast_and_judges_in_fp32(default_bundle):
    from PIL import Image

    from capt.prompts import ZeroShotClassifier
    model = ServingModel(default_bundle, Limits(probe_precision="bf16", max_probe_seconds=3600), check_twin=False,
                         engine="onnx-fp32")
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    labels = ["red", "green", "blue"]
    assert {p.dtype for p in model.probe_model.parameters()} == {torch.bfloat16}  # weights cast once
    attacked_dtypes = []
    real_encode = type(model.torch_model).encode_image

    def spy(self, pixels, *args, **kwargs):
        attacked_dtypes.append(next(self.parameters()).dtype)
        return real_encode(self, pixels, *args, **kwargs)
    import capt.prompts
    original = capt.prompts.PromptedCLIP.encode_image
    capt.prompts.PromptedCLIP.encode_image = spy
    try:
        result = model.probe(image, labels, eps=4 / 255, steps=3, attack="pgd", return_images=True)
    finally:
        capt.prompts.PromptedCLIP.encode_image = original
    assert result["attack"]["precision"] == "bf16"
    # the attack's steps ran on the bf16 copy, the clean prediction and the judgement on the fp32 twin
    assert torch.bfloat16 in attacked_dtypes and torch.float32 in attacked_dtypes
    import base64
    import io
    adversarial = Image.open(io.BytesIO(base64.b64decode(result["adversarial_png"]))).convert("RGB")
    pixels = torch.from_numpy(model.pixels([adversarial]))
    classifier = ZeroShotClassifier(model.torch_model, torch.from_numpy(model.class_embeddings(labels)).float())
    with torch.no_grad():
        logits = classifier(pixels)[0]  # fp32
    target = labels.index(result["target"])
    others = torch.cat([logits[:target], logits[target + 1:]])
    assert float(logits[target] - others.max()) == pytest.approx(result["margin_adversarial"], abs=1e-4)
    with pytest.raises(ValueError, match="precision must be one of"):
        ServingModel(default_bundle, Limits(probe_precision="int4"), check_twin=False, engine="onnx-fp32")


def test_onnx_engine_reports_its_provider(bundle):
    engine = OnnxEngine("onnx-fp32", bundle.image_session)
    assert engine.provider == "CPUExecutionProvider"
    out = engine.encode(np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float64))
    assert out.dtype == np.float32 and out.shape[0] == 2


def test_a_derived_graph_is_made_once_and_a_failure_is_not_retried(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    calls = []

    def copy(source, target):
        calls.append("copy")
        target.write_bytes(source.read_bytes())

    def fail(source, target):
        calls.append("fail")
        target.write_bytes(b"half a graph")
        raise ValueError("shape inference failed on node 7")

    made = _derived_graph(bundle, "copy", copy)
    assert _derived_graph(bundle, "copy", copy) == made and calls == ["copy"]
    for _ in range(2):  # the first start fails and records it; the second reads the record
        with pytest.raises(DerivedGraphFailed, match="shape inference failed on node 7"):
            _derived_graph(bundle, "broken", fail)
    assert calls == ["copy", "fail"]
    assert [p.name for p in tmp_path.iterdir() if "broken" in p.name] == [
        next(p.name for p in tmp_path.iterdir() if p.name.endswith(".failed"))]  # no partial graph is left
    for record in tmp_path.glob("*.failed"):
        record.unlink()  # deleting the record retries
    with pytest.raises(DerivedGraphFailed):
        _derived_graph(bundle, "broken", fail)
    assert calls == ["copy", "fail", "fail"]


def test_a_machine_error_while_deriving_a_graph_is_not_recorded(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    calls = []

    def disk_full(source, target):
        calls.append("write")
        raise OSError(28, "No space left on device")

    for _ in range(2):  # retried at the next start: the graph may well quantise once there is room
        with pytest.raises(OSError, match="No space left"):
            _derived_graph(bundle, "int8", disk_full)
    assert calls == ["write", "write"] and not list(tmp_path.glob("*.failed"))


def test_the_self_test_encodes_at_most_its_label_limit_of_a_large_label_set(bundle):
    import dataclasses
    labels = [f"class number {i}" for i in range(SELF_TEST_MAX_LABELS * 3 + 5)]
    subset = self_test_labels(labels)
    assert len(subset) == SELF_TEST_MAX_LABELS == len(set(subset)) and subset == sorted(subset, key=labels.index)
    assert subset == self_test_labels(labels) and subset != labels[:SELF_TEST_MAX_LABELS]  # seeded, spread out
    assert self_test_labels(labels[:10]) == labels[:10]
    large = dataclasses.replace(bundle, manifest={**bundle.manifest, "labels": labels})
    pixels, text, _ = sample_set(large, 8)
    assert text.shape[0] == SELF_TEST_MAX_LABELS and len(pixels) == 8


def test_partial_files_a_killed_start_left_are_swept_at_the_next_one(bundle, tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    old = tmp_path / ".image_encoder-0123456789abcdef-int8-unannotated.onnx.999.partial.unannotated.onnx"
    fresh = tmp_path / ".image_encoder-0123456789abcdef-int8-unannotated.onnx.998.partial"
    kept = tmp_path / "image_encoder-0123456789abcdef-int8-unannotated.onnx"  # a finished graph, however old
    old_choice = tmp_path / ".choice-engine-0123456789abcdef.json.abc123.partial"  # a kept choice being written
    old_text = tmp_path / ".text-0123456789abcdef.npy.abc123.partial"  # class embeddings being written
    for path in (old, fresh, kept, old_choice, old_text):
        path.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for path in (old, kept, old_choice, old_text):
        os.utime(path, (two_hours_ago, two_hours_ago))
    _derived_graph(bundle, "copy", lambda source, target: target.write_bytes(source.read_bytes()))
    assert not old.exists() and fresh.exists() and kept.exists()
    assert not old_choice.exists() and not old_text.exists()


def _bf16_engine(bundle, fixed_batch):
    engine = TorchAutocastEngine.from_twin("torch-bf16", bundle.twin, "bf16", "cpu")  # no image size: no timing
    engine.fixed_batch = fixed_batch
    return engine


def test_the_bf16_engine_casts_its_weights_once_and_leaves_the_twin_fp32(bundle):
    engine = _bf16_engine(bundle, None)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.twin.parameters()} == {torch.float32}  # the probe and its judge use the twin
    pixels = np.random.default_rng(1).random((3, 3, 64, 64), dtype=np.float32)
    exported = bundle.image_session.run(None, {"pixels": pixels})[0]
    assert np.abs(engine.encode(pixels) - exported).max() < 0.05  # bf16 of the same embeddings, not others


@pytest.mark.parametrize("fixed_batch", [2, 4])
def test_the_bf16_engine_answers_an_image_alike_alone_and_in_any_batch(bundle, fixed_batch):
    engine = _bf16_engine(bundle, fixed_batch)
    pixels = np.random.default_rng(2).random((31, 3, 64, 64), dtype=np.float32)
    batch = engine.encode(pixels)  # 31 images: chunks of 2 or 4, the last one padded
    assert batch.shape == bundle.image_session.run(None, {"pixels": pixels})[0].shape
    for index in (0, 3, 17, 30):  # first of a chunk, inside one, in the padded last one
        alone = engine.encode(pixels[index:index + 1])
        with_others = engine.encode(np.concatenate([1 - pixels[:2], pixels[index:index + 1]]))[-1]
        assert np.abs(alone[0] - batch[index]).max() <= MAX_BATCH_DIFF / 100
        assert np.abs(with_others - batch[index]).max() <= MAX_BATCH_DIFF / 100


def test_the_bf16_engine_runs_its_chunks_at_one_size(bundle, monkeypatch):
    """bf16 GEMM kernels change with the number of rows (ViT-B-32 on an AMX Xeon: 1.4e-3 between an image
    alone and in a batch of 32); a fake run whose answer shifts with its batch's size stands in for them,
    so that this fails without the fixed chunks on every CPU."""
    engine = _bf16_engine(bundle, 4)
    sizes = []
    real = engine._run

    def size_dependent(pixels):
        sizes.append(len(pixels))
        return real(pixels) + 1e-3 * len(pixels)
    monkeypatch.setattr(engine, "_run", size_dependent)
    pixels = np.random.default_rng(3).random((9, 3, 64, 64), dtype=np.float32)
    batch = engine.encode(pixels)
    assert batch.shape[0] == 9 and sizes == [4, 4, 4]
    assert np.abs(engine.encode(pixels[8:9])[0] - batch[8]).max() <= MAX_BATCH_DIFF / 100
    assert np.abs(engine.encode(pixels[1:2])[0] - batch[1]).max() <= MAX_BATCH_DIFF / 100


def test_the_bf16_chunk_size_is_the_best_geometric_mean_within_the_budget(bundle, monkeypatch):
    import serving.engine as engine_module
    engine = _bf16_engine(bundle, None)
    seconds = {1: 1.0, 2: 1.2, 4: 1.5, 8: 4.0, 16: 9.0}  # sqrt(size) / t: 1.00, 1.18, 1.33, 0.71, 0.44
    ran = []
    monkeypatch.setattr(engine, "_run", lambda pixels: ran.append(len(pixels)))
    monkeypatch.setattr(engine_module, "_best_time", lambda fn, budget, minimum=1, maximum=10: seconds[ran[-1]])
    size, details = engine.fastest_fixed_batch(8, budget_s=60)
    assert size == 4 and details["fixed_batch"] == 4 and set(details["fixed_batch_img_s"]) == {"1", "2", "4", "8", "16"}
    assert "chunks of 4" in details["fixed_batch_why"]
    seconds.update({1: 1.0, 2: 1.3, 4: 1.9})  # 1.00, 1.09, 1.05: a near tie goes to the smaller chunk
    assert engine.fastest_fixed_batch(8, budget_s=60, sizes=(1, 2, 4))[0] == 1
    clock = iter(range(0, 1000, 10))  # every size "takes" 10 s of the clock: only the first fits a 5 s budget
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: next(clock))
    size, details = engine.fastest_fixed_batch(8, budget_s=5)
    assert size == 1 and set(details["fixed_batch_img_s"]) == {"1"}


def test_the_probe_times_auto_on_an_attack_step_of_the_twin_once_and_later_starts_recall_it(
        default_bundle, monkeypatch, machine_offers_bf16, tmp_path):
    import serving.model
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.delenv("CAPT_ENGINE_RETUNE", raising=False)
    timed = []

    def fake_timing(step, device, hardware=None, budget_s=None):
        step()  # a real forward and backward of the twin to its pixels
        timed.append(device)
        return "fp32", "fp32: bf16 measured slower on this model (test)"
    monkeypatch.setattr(serving.model, "timed_precision", fake_timing)
    model = ServingModel(default_bundle, Limits(), check_twin=False, engine="onnx-fp32")
    assert timed == ["cpu"] and (model.probe_precision, model.probe_precision_why) == (
        "fp32", "fp32: bf16 measured slower on this model (test)")
    assert "recalled" not in model.info()["probe_precision"]
    precision, why, reduced = model._probe_precision("bf16")
    assert (precision, why) == ("bf16", "CAPT_PROBE_PRECISION=bf16") and timed == ["cpu"]
    assert reduced is not model.torch_model and {p.dtype for p in reduced.parameters()} == {torch.bfloat16}
    assert all(p.grad is None for p in model.torch_model.parameters())  # the step touched no weights
    # A later start on this machine recalls the timing; CAPT_ENGINE_RETUNE=1 times again.
    later = ServingModel(default_bundle, Limits(), check_twin=False, engine="onnx-fp32")
    assert timed == ["cpu"] and later.probe_precision == "fp32" and later.probe_model is later.torch_model
    assert "measured by an earlier start" in later.probe_precision_why
    assert later.info()["probe_precision"]["recalled"]["file"].endswith(".json")
    # Another PyTorch thread count is another measurement.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        ServingModel(default_bundle, Limits(), check_twin=False, engine="onnx-fp32")
    finally:
        torch.set_num_threads(threads)
    assert timed == ["cpu", "cpu"]
    monkeypatch.setenv("CAPT_ENGINE_RETUNE", "1")
    ServingModel(default_bundle, Limits(), check_twin=False, engine="onnx-fp32")
    assert timed == ["cpu", "cpu", "cpu"]


def test_the_bf16_engine_computes_on_the_served_thread_count(default_bundle, monkeypatch):
    """The server leaves a core to its event loop by its intra-op thread count (CAPT_ORT_THREADS or auto);
    the torch engine must compute on that count too, not on PyTorch's one per core, and give the calling
    thread its own count back afterwards (a probe may run on that thread next)."""
    import threading
    one_thread = load_bundle(default_bundle, ["CPUExecutionProvider"], check=False, ort_threads=1)
    engine = {c.name: c for c in candidates(one_thread, ZEN5)}["torch-bf16"].build()
    assert engine.threads == 1
    engine.fixed_batch = None  # one call of the model below, whatever chunk size the timing chose
    calls, during, after = [], [], []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real_set(n))[1])
    encode_image = engine.model.encode_image
    engine.model.encode_image = lambda pixels: (during.append(torch.get_num_threads()), encode_image(pixels))[1]

    def encode_on_a_worker_thread():  # as the server calls it; OpenMP's count is per calling thread
        real_set(2)  # the thread's own count, whatever this machine's default
        engine.encode(np.random.default_rng(3).random((2, 3, 64, 64), dtype=np.float32))
        after.append(torch.get_num_threads())
    worker = threading.Thread(target=encode_on_a_worker_thread)
    worker.start()
    worker.join()
    assert during == [1] and calls == [1, 2] and after == [2]


def test_the_tensorrt_engine_allows_fp16_in_one_profile_for_every_served_batch(bundle, tmp_path, monkeypatch):
    """Written for a CUDA machine with TensorRT and unrun here: what can be checked without one is that
    its options name the exported graph's real input, cover every batch the server sends, and land in the
    engine cache; and that its session asks for TensorRT, then CUDA, then the CPU."""
    import onnx

    import export.bundle
    import serving.engine
    from export.bundle import IMAGE_ONNX
    from serving.engine import TENSORRT_MAX_BATCH, tensorrt_options
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    graph = onnx.load(str(bundle.path / IMAGE_ONNX), load_external_data=False)
    (graph_input,) = graph.graph.input
    size = int(bundle.manifest["inputs"]["image"]["shape"][-1])
    digest = bundle.manifest["files"][IMAGE_ONNX]
    options = tensorrt_options(size, digest)
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    # ONNX Runtime names cached engines by the graph's structure: another graph's weights get a folder of their own
    assert tensorrt_options(size, "0" * 64)["trt_engine_cache_path"] != options["trt_engine_cache_path"]
    assert options["trt_profile_min_shapes"] == f"{graph_input.name}:1x3x{size}x{size}"
    assert options["trt_profile_max_shapes"] == f"{graph_input.name}:{TENSORRT_MAX_BATCH}x3x{size}x{size}"
    assert TENSORRT_MAX_BATCH >= Limits().max_batch and TENSORRT_MAX_BATCH >= Limits().max_images
    assert options["trt_engine_cache_path"] == str(tmp_path / f"tensorrt-{digest[:16]}")

    asked = {}

    class CpuSession:  # what ONNX Runtime gives where TensorRT does not load
        def get_providers(self):
            return ["CPUExecutionProvider"]

    def fake_session(path, providers, threads=0, provider_options=None, **_):
        asked.update(providers=providers, options=provider_options)
        return CpuSession()
    monkeypatch.setattr(export.bundle, "onnx_session", fake_session)
    with pytest.raises(EngineError, match="fell back to CPUExecutionProvider instead of TensorrtExecutionProvider"):
        serving.engine._tensorrt_engine(bundle.path / IMAGE_ONNX, size, digest)
    assert asked["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert asked["options"] == {"TensorrtExecutionProvider": options}
    assert Path(options["trt_engine_cache_path"]).is_dir()


def test_an_onnx_engine_runs_batches_over_its_limit_in_parts_in_order():
    seen = []

    class Doubling:
        def run(self, outputs, feeds):
            seen.append(len(feeds["pixels"]))
            return [feeds["pixels"].reshape(len(feeds["pixels"]), -1) * 2]
    pixels = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    out = OnnxEngine("tensorrt", Doubling(), max_batch=4).encode(pixels)
    assert seen == [4, 4, 2] and np.array_equal(out, pixels.reshape(10, -1) * 2)


def test_onnx_sessions_take_options_by_provider(default_bundle, monkeypatch):
    """Options go to ONNX Runtime as its documented (name, options) pairs, for the providers asked for."""
    import onnxruntime

    from export.bundle import IMAGE_ONNX, onnx_session
    real, asked = onnxruntime.InferenceSession, []

    def spy(path, sess_options=None, providers=None):
        asked.append(providers)
        return real(path, sess_options=sess_options, providers=providers)
    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    session = onnx_session(default_bundle / IMAGE_ONNX, ["CPUExecutionProvider"],
                           provider_options={"CPUExecutionProvider": {"use_arena": "0"},
                                             "TensorrtExecutionProvider": {"trt_fp16_enable": True}})
    assert session.get_providers() == ["CPUExecutionProvider"]  # ONNX Runtime took the pair
    assert asked == [[("CPUExecutionProvider", {"use_arena": "0"})]]  # options of a provider not asked for stay out
    onnx_session(default_bundle / IMAGE_ONNX, ["CPUExecutionProvider"])
    assert asked[-1] == ["CPUExecutionProvider"]
