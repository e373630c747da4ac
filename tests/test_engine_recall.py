"""serving/engine.py: what auto measured at a start (threads, engine) is kept in the engine cache and
recalled by a later start on the same machine, which rechecks the kept engine's safety, not its speed."""
import json

import numpy as np
import pytest

import serving.engine as engine_module
from capt.hardware import Hardware
from export.bundle import IMAGE_ONNX, load_bundle
from serving.engine import (RETUNE_ENV, Candidate, TorchAutocastEngine, choice_key, keep_choice, recall_choice,
                            remembered_engine, remembered_ort_threads)
from serving.model import Limits, ServingModel

AVX2 = Hardware.from_flags({"avx2"})  # onnx-int8 applies, torch-bf16 does not
ZEN5 = Hardware.from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
# The same capabilities on another CPU: its timings are its own
AVX2_ELSEWHERE = Hardware.from_flags({"avx2"}, cpu_signature="family 25 model 1 stepping 1", l3_cache_mib=32.0)


@pytest.fixture(scope="module")
def bundle(default_bundle):
    return load_bundle(default_bundle, ["CPUExecutionProvider"], check=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.delenv(RETUNE_ENV, raising=False)
    return tmp_path


@pytest.fixture
def measurements(monkeypatch):
    """Counts the full measurements (``choose_engine``) that ``remembered_engine`` runs."""
    calls = []
    real = engine_module.choose_engine

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "choose_engine", counted)
    return calls


def _no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a recalled choice must not be timed again")
    monkeypatch.setattr(engine_module, "_best_time", refuse)
    monkeypatch.setattr(engine_module, "choose_engine", refuse)


def test_a_later_start_recalls_the_measured_engine_and_rechecks_only_its_safety(bundle, cache, measurements,
                                                                                monkeypatch):
    first, measured = remembered_engine(bundle, AVX2)
    assert len(measurements) == 1 and "recalled" not in measured
    assert len(list(cache.glob("choice-engine-*.json"))) == 1
    _no_timing(monkeypatch)
    second, recalled = remembered_engine(bundle, AVX2)
    assert second.name == first.name == recalled["engine"] == measured["engine"]
    assert recalled["candidates"] == measured["candidates"]  # the measurement it was chosen by, as it was
    kept = recalled["recalled"]
    assert kept["file"].startswith(str(cache)) and kept["measured_at"] and kept["seconds"] == measured["seconds"]
    assert RETUNE_ENV in recalled["reason"] and recalled["reason"].startswith(measured["reason"])
    if second.name != "onnx-fp32":  # the reference needs no recheck; a reduced path is rechecked now
        assert kept["recheck"]["top1_agreement"] >= 0.99 and kept["recheck"]["batch_invariant"] is True
        assert kept["recheck"]["images"] == measured["samples"]["images"]
    pixels = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(second.encode(pixels), first.encode(pixels))


def test_another_machine_a_retune_or_an_explicit_engine_measures_again(bundle, cache, measurements, monkeypatch):
    remembered_engine(bundle, AVX2)
    remembered_engine(bundle, AVX2_ELSEWHERE)  # the same candidates, another CPU: another key
    assert len(measurements) == 2 and len(list(cache.glob("choice-engine-*.json"))) == 2
    monkeypatch.setenv(RETUNE_ENV, "1")
    _, report = remembered_engine(bundle, AVX2)
    assert len(measurements) == 3 and "recalled" not in report
    monkeypatch.delenv(RETUNE_ENV)
    _, report = remembered_engine(bundle, AVX2, "onnx-int8")  # tested at every start, never recalled
    assert len(measurements) == 4 and report["override"] == "onnx-int8" and "recalled" not in report
    assert "recalled" in remembered_engine(bundle, AVX2)[1] and len(measurements) == 4


def _batch_dependent(bundle):
    """An engine whose embeddings lean away from its batch's mean: batch-dependent, so never served."""
    def encode(pixels):
        e = bundle.image_session.run(None, {"pixels": pixels.astype(np.float32)})[0]
        shifted = e - 0.05 * e.mean(0, keepdims=True)
        return shifted / np.linalg.norm(shifted, axis=-1, keepdims=True)
    engine = type("Mixer", (), {"name": "mixer", "encode": staticmethod(encode)})()
    return Candidate("mixer", True, "a test engine", lambda: engine)


def test_a_kept_choice_that_fails_its_recheck_is_measured_again(bundle, cache, measurements):
    mixer = _batch_dependent(bundle)
    _, measured = remembered_engine(bundle, AVX2, extra=[mixer])
    assert measured["engine"] != "mixer"
    # A record that says the batch-dependent engine was chosen (a stale or edited file): it must not serve.
    (record_path,) = cache.glob("choice-engine-*.json")
    record = json.loads(record_path.read_text())
    record["value"]["engine"] = "mixer"
    record_path.write_text(json.dumps(record))
    engine, report = remembered_engine(bundle, AVX2, extra=[mixer])
    assert engine.name != "mixer" and "recalled" not in report and len(measurements) == 2
    assert json.loads(record_path.read_text())["value"]["engine"] == engine.name  # the new measurement is kept


def test_an_unreadable_or_foreign_record_is_ignored(bundle, cache, measurements):
    remembered_engine(bundle, AVX2)
    (record_path,) = cache.glob("choice-engine-*.json")
    record_path.write_text("{not json")
    assert "recalled" not in remembered_engine(bundle, AVX2)[1] and len(measurements) == 2
    key = choice_key("engine", AVX2, graph="x")
    keep_choice(key, {"engine": "onnx-fp32"})
    assert recall_choice(key)["value"] == {"engine": "onnx-fp32"}
    assert recall_choice(choice_key("engine", AVX2, graph="y")) is None  # another graph: another key
    path = next(p for p in cache.glob("choice-engine-*.json") if p != record_path)
    record = json.loads(path.read_text())
    record["key"]["graph"] = "y"  # a file whose key is not the one asked for
    path.write_text(json.dumps(record))
    assert recall_choice(key) is None


def test_the_ort_threads_are_measured_once_per_graph_and_machine(default_bundle, cache, monkeypatch):
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    graph, digest = default_bundle / IMAGE_ONNX, manifest["files"][IMAGE_ONNX]
    two_cores = Hardware.from_flags({"avx2"}, usable_cores=2, physical_cores=2, logical_cores=2)
    measured = remembered_ort_threads(graph, digest, 64, two_cores)
    assert "recalled" not in measured and set(measured["images_per_s"]) == {"1", "2"}

    def refuse(*args, **kwargs):
        raise AssertionError("recalled threads must not be timed again")
    monkeypatch.setattr(engine_module, "choose_ort_threads", refuse)
    recalled = remembered_ort_threads(graph, digest, 64, two_cores)
    assert recalled["used"] == measured["used"] and recalled["images_per_s"] == measured["images_per_s"]
    assert recalled["recalled"]["seconds"] == measured["seconds"] and RETUNE_ENV in recalled["reason"]
    elsewhere = Hardware.from_flags({"avx2"}, usable_cores=2, physical_cores=2, logical_cores=2,
                                    cpu_signature="family 25 model 1 stepping 1")
    with pytest.raises(AssertionError, match="must not be timed"):
        remembered_ort_threads(graph, digest, 64, elsewhere)  # another CPU, as many cores: measured again


def test_the_bf16_engine_is_built_with_its_recorded_chunk_size_untimed(bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a recorded chunk size must not be timed again")
    monkeypatch.setattr(TorchAutocastEngine, "fastest_fixed_batch", refuse)
    row = {"fixed_batch": 4, "fixed_batch_img_s": {"1": 10.0, "4": 30.0}, "fixed_batch_why": "measured"}
    engine = next(c for c in engine_module.candidates(bundle, ZEN5) if c.name == "torch-bf16").build_as_recorded(row)
    assert engine.fixed_batch == 4 and engine.details == row


def test_a_restarted_server_recalls_its_threads_and_engine(default_bundle, cache):
    limits = Limits(probe_precision="fp32")
    first = ServingModel(default_bundle, limits, check_twin=False)
    second = ServingModel(default_bundle, limits, check_twin=False)
    assert "recalled" not in first.engine_report and "recalled" in second.engine_report
    assert second.engine.name == first.engine.name and second.ort_threads == first.ort_threads
    assert "recalled" not in first.ort_threads_report and "recalled" in second.ort_threads_report
    info = second.info()
    assert info["image_engine"]["recalled"]["file"] == second.engine_report["recalled"]["file"]
