"""serving/engine.py: what auto measured at a start (threads, engine) is kept in the engine cache and
recalled by a later start on the same machine, which rechecks the kept engine's safety, not its speed."""
import dataclasses
import json
import os
import time

import numpy as np
import pytest

import serving.engine as engine_module
from capt.hardware import Hardware
from export.bundle import IMAGE_ONNX, load_bundle
from serving.engine import (FIXED_BATCHES, RETUNE_ENV, Candidate, TorchAutocastEngine, choice_key, keep_choice, recall_choice,
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


def _edit_record(cache, change):
    (path,) = cache.glob("choice-engine-*.json")
    record = json.loads(path.read_text())
    change(record["value"])
    path.write_text(json.dumps(record))
    return path


def test_a_kept_reduced_precision_engine_is_rechecked_before_it_serves(bundle, cache, monkeypatch):
    _, measured = remembered_engine(bundle, AVX2)
    assert next(r for r in measured["candidates"] if r["name"] == "onnx-int8")["batch_invariant"] is True
    _edit_record(cache, lambda value: value.update(engine="onnx-int8"))  # whatever won, int8 was safe too
    _no_timing(monkeypatch)
    engine, report = remembered_engine(bundle, AVX2)
    recheck = report["recalled"]["recheck"]
    assert engine.name == "onnx-int8" and engine.max_batch == 1
    assert recheck["top1_agreement"] >= 0.99 and recheck["batch_invariant"] is True
    assert recheck["batch_max_abs_diff"] <= 1e-4 and recheck["images"] == measured["samples"]["images"] >= 8


def test_a_kept_bf16_engine_runs_its_recorded_chunk_size_untimed(bundle, cache, measurements, monkeypatch):
    _, measured = remembered_engine(bundle, ZEN5)  # native bf16 described: torch-bf16 is measured
    row = next(r for r in measured["candidates"] if r["name"] == "torch-bf16")
    assert row["loaded"] and row["fixed_batch"] in FIXED_BATCHES
    _edit_record(cache, lambda value: value.update(engine="torch-bf16"))

    def refuse(*args, **kwargs):
        raise AssertionError("a recorded chunk size must not be timed again")
    monkeypatch.setattr(TorchAutocastEngine, "fastest_fixed_batch", refuse)
    engine, report = remembered_engine(bundle, ZEN5)
    assert engine.name == "torch-bf16" and engine.fixed_batch == row["fixed_batch"] and "recalled" in report
    assert engine.details["fixed_batch_img_s"] == row["fixed_batch_img_s"] and len(measurements) == 1
    # A chunk size that no measurement could have chosen (an edited file) is not trusted: measured again.
    monkeypatch.undo()
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(cache))
    _edit_record(cache, lambda value: next(r for r in value["candidates"] if r["name"] == "torch-bf16")
                 .update(fixed_batch=1_000_000))
    assert "recalled" not in remembered_engine(bundle, ZEN5)[1]


def test_a_choice_made_while_a_path_failed_for_the_machine_is_not_kept(bundle, cache):
    def disk_full():
        raise OSError(28, "No space left on device")

    def no_libraries():
        raise RuntimeError("the TensorRT provider fell back to CUDA")
    remembered_engine(bundle, AVX2, extra=[Candidate("full-disk", True, "test", disk_full)])
    assert not list(cache.glob("choice-engine-*.json"))  # a passing condition: the next start measures
    remembered_engine(bundle, AVX2, extra=[Candidate("no-libraries", True, "test", no_libraries)])
    assert len(list(cache.glob("choice-engine-*.json"))) == 1  # fails the same way next time: kept


def test_deleting_a_derived_graphs_failure_record_measures_the_choice_again(bundle, cache, measurements):
    from export.bundle import IMAGE_ONNX
    failed = cache / f"image_encoder-{bundle.manifest['files'][IMAGE_ONNX][:16]}-int8-test.onnx.ort-0.failed"
    failed.write_text("making the int8 graph failed: a test\n")
    remembered_engine(bundle, AVX2)
    assert "recalled" in remembered_engine(bundle, AVX2)[1] and len(measurements) == 1
    failed.unlink()  # "delete it to retry": the choice made while it stood is not recalled
    assert "recalled" not in remembered_engine(bundle, AVX2)[1] and len(measurements) == 2


def test_an_unusable_cache_costs_the_recall_not_the_start(default_bundle, bundle, cache, monkeypatch):
    def no_cache():
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(engine_module, "cache_dir", no_cache)
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    report = remembered_ort_threads(default_bundle / IMAGE_ONNX, manifest["files"][IMAGE_ONNX], 64, AVX2)
    assert report["used"] >= 1 and "recalled" not in report
    engine, report = remembered_engine(bundle, AVX2)  # int8 cannot be made without a cache: reported, not fatal
    assert engine.name in ("onnx-fp32", "onnx-int8") and "recalled" not in report


def test_a_kernel_setting_in_the_environment_is_part_of_the_key(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = choice_key("engine", AVX2, graph="x")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # e.g. AMX turned off for torch's bf16 kernels
    assert choice_key("engine", AVX2, graph="x") != plain


def test_a_restarted_server_recalls_its_threads_and_engine(default_bundle, cache):
    limits = Limits(probe_precision="fp32")
    first = ServingModel(default_bundle, limits, check_twin=False)
    second = ServingModel(default_bundle, limits, check_twin=False)
    assert "recalled" not in first.engine_report and "recalled" in second.engine_report
    assert second.engine.name == first.engine.name and second.ort_threads == first.ort_threads
    assert "recalled" not in first.ort_threads_report and "recalled" in second.ort_threads_report
    info = second.info()
    assert info["image_engine"]["recalled"]["file"] == second.engine_report["recalled"]["file"]


def test_workers_starting_together_take_turns_the_first_measures_the_others_recall(default_bundle, cache, monkeypatch):
    import threading
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    real, calls = engine_module.choose_ort_threads, []

    def slow_measurement(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough that, unlocked, the other worker would find nothing kept and measure too
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "choose_ort_threads", slow_measurement)
    reports = {}

    def start(name):
        reports[name] = remembered_ort_threads(default_bundle / IMAGE_ONNX, manifest["files"][IMAGE_ONNX], 64, AVX2)
    workers = [threading.Thread(target=start, args=(f"worker-{i}",), name=f"worker-{i}") for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(calls) == 1 and sorted("recalled" in r for r in reports.values()) == [False, True]
    assert len({r["used"] for r in reports.values()}) == 1


def test_threads_of_one_process_find_the_same_cache(cache):
    """Its write probe once had one name per process: two threads probing at once raced, and one fell
    back to the temporary folder (another lock, other records)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        found = set(pool.map(lambda _: engine_module.cache_dir(), range(400)))
    assert found == {cache}


def test_what_no_start_used_for_30_days_is_swept_and_what_a_start_uses_is_marked(bundle, cache):
    remembered_engine(bundle, AVX2)  # a kept choice (and its lock), and int8's graph where it was tried
    (record,) = cache.glob("choice-engine-*.json")
    unused = [cache / "image_encoder-0123456789abcdef-int8-unannotated.onnx",  # a bundle no longer served
              cache / "image_encoder-0123456789abcdef-int8.onnx.ort-1.0.failed",
              cache / "choice-engine-0123456789abcdef.json", cache / "choice-engine-0123456789abcdef.lock",
              cache / "text-0123456789abcdef.npy"]
    recent = cache / "image_encoder-fedcba9876543210-int8-unannotated.onnx"
    for path in (*unused, recent):
        path.write_bytes(b"x")
    month_ago, week_ago = time.time() - 31 * 86400, time.time() - 7 * 86400
    for path in unused:
        os.utime(path, (month_ago, month_ago))
    os.utime(recent, (week_ago, week_ago))
    os.utime(record, (month_ago, month_ago))  # kept long ago, but the next start recalls it
    assert "recalled" in remembered_engine(bundle, AVX2)[1]
    assert not any(path.exists() for path in unused) and recent.exists()
    assert record.exists() and time.time() - record.stat().st_mtime < 3600  # marked as used
    (text,) = cache.glob("text-*.npy")  # the recheck's class embeddings, marked as they are read
    assert time.time() - text.stat().st_mtime < 3600


class _CountingSession:
    """The bundle's text session, counting its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)

    def get_outputs(self):
        return self.session.get_outputs()


def test_the_self_tests_class_embeddings_are_computed_once_per_bundle_and_labels(bundle, cache, monkeypatch):
    from serving.engine import sample_class_embeddings
    counting = _CountingSession(bundle.text_session)
    monkeypatch.setattr(bundle, "text_session", counting)
    labels = ["a red circle", "a blue star", "a green square"]
    first = sample_class_embeddings(bundle, labels)
    second = sample_class_embeddings(bundle, labels)
    assert counting.runs == 1 and np.array_equal(first, second) and first.shape[0] == 3
    (kept,) = cache.glob("text-*.npy")
    direct = bundle.text_session.session.run(None, {"tokens": bundle.twin.tokenize(labels).numpy()})[0]
    assert np.array_equal(second, direct)
    other = sample_class_embeddings(bundle, labels[:2])  # other labels: another file
    assert counting.runs == 2 and other.shape[0] == 2 and len(list(cache.glob("text-*.npy"))) == 2
    files = {**bundle.manifest["files"], "text_encoder.onnx": "0" * 64}  # another bundle's text graph: another file
    sample_class_embeddings(dataclasses.replace(bundle, manifest={**bundle.manifest, "files": files}), labels)
    assert counting.runs == 3 and len(list(cache.glob("text-*.npy"))) == 3
    # Every read marks the file, so the 30-day sweep keeps what starts still read.
    month_ago = time.time() - 31 * 86400
    os.utime(kept, (month_ago, month_ago))
    sample_class_embeddings(bundle, labels)
    assert counting.runs == 3 and time.time() - kept.stat().st_mtime < 3600


_UNPICKLED = []


def _record_unpickling(note):
    _UNPICKLED.append(note)
    return note


class _Payload:
    """Unpickling it calls :func:`_record_unpickling`: a file that was unpickled leaves a trace."""

    def __reduce__(self):
        return _record_unpickling, ("unpickled",)


@pytest.mark.parametrize("damage", ["garbage", "wrong shape", "wrong width", "pickled objects", "not finite", "zip"])
def test_a_damaged_kept_class_embedding_file_is_computed_again_never_unpickled(bundle, cache, monkeypatch, damage):
    from serving.engine import sample_class_embeddings
    labels = ["a red circle", "a blue star", "a green square"]
    good = sample_class_embeddings(bundle, labels)
    (kept,) = cache.glob("text-*.npy")
    if damage == "garbage":
        kept.write_bytes(b"\x93NUMPY not really")
    elif damage == "wrong shape":
        np.save(kept, good[:2])
    elif damage == "wrong width":
        np.save(kept, good[:, :1])  # the right number of rows: a width check is what refuses it
    elif damage == "pickled objects":
        payload = np.empty(3, dtype=object)
        payload[:] = [_Payload(), _Payload(), _Payload()]
        np.save(kept, payload, allow_pickle=True)
    elif damage == "zip":
        with kept.open("wb") as f:
            np.savez(f, good)
    else:
        np.save(kept, np.full_like(good, np.nan))
    counting = _CountingSession(bundle.text_session)
    monkeypatch.setattr(bundle, "text_session", counting)
    again = sample_class_embeddings(bundle, labels)
    assert counting.runs == 1 and np.array_equal(again, good) and _UNPICKLED == []
    assert np.array_equal(np.load(kept, allow_pickle=False), good)  # and kept again, whole
