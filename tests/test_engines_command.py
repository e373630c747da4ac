"""``capt engines``: what the engine cache holds (kept choices with what they chose and whether this code
on this machine can recall them, derived graphs, sizes, last use) and ``--clear``."""
import json
import os
import time

import pytest

from capt.cli import main
from capt.hardware import Hardware
from export.bundle import load_bundle
from serving.engine import RETUNE_ENV, remembered_engine

AVX2 = Hardware.from_flags({"avx2"})  # onnx-int8 applies: a kept choice, an int8 graph, class embeddings


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.delenv(RETUNE_ENV, raising=False)
    return tmp_path


def _listing(capsys):
    assert main(["engines", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_cache_is_listed_with_what_each_kept_choice_chose(default_bundle, cache, capsys, monkeypatch):
    import capt.hardware
    engine, report = remembered_engine(load_bundle(default_bundle, ["CPUExecutionProvider"], check=False), AVX2)
    monkeypatch.setattr(capt.hardware, "detect", lambda: AVX2)  # the machine the choice was measured on
    listing = _listing(capsys)
    assert listing["folder"] == str(cache)
    kinds = {entry["kind"] for entry in listing["entries"]}
    assert {"kept choice", "lock", "class embeddings"} <= kinds
    (choice,) = [entry for entry in listing["entries"] if entry["kind"] == "kept choice"]
    assert choice["choice"] == "engine" and choice["chosen"] == engine.name == report["engine"]
    assert choice["current"] is True and choice["measured_at"]
    # (whatever the load while it ran: the tests keep contended choices, conftest.py)
    assert choice["cpu_contention"] == report["cpu_contention"] and "contended" in choice["cpu_contention"]
    assert listing["bytes"] == sum(path.stat().st_size for path in cache.iterdir())
    # Measured on another machine (or by another version of the code): listed, never recalled here.
    monkeypatch.setattr(capt.hardware, "detect", lambda: Hardware.from_flags({"avx2"}, cpu_signature="family 25 model 1"))
    (choice,) = [entry for entry in _listing(capsys)["entries"] if entry["kind"] == "kept choice"]
    assert choice["current"] is False
    assert main(["engines"]) == 0
    text = capsys.readouterr().out
    assert str(cache) in text and f"engine: {engine.name}" in text and "never recalled" in text
    assert f"others used {report['cpu_contention']['others_share']:.0%} of the CPUs" in text


def _kept_record(cache, name: str, value: dict) -> None:
    key = {"kind": "engine", "code": "another version", "machine": {}, "sources": ["serving/engine.py"]}
    (cache / f"choice-engine-{name}.json").write_text(json.dumps({"key": key, "measured_at": "2026-12-01T00:00:00+00:00",
                                                                  "value": value}))


def test_a_kept_choice_says_what_else_used_the_cpus_while_it_was_measured(cache, capsys):
    busy = {"cpus": 2, "seconds": 3.0, "others_share": 0.6, "steal_share": 0.0, "throttled_share": 0.2,
            "contended": True, "summary": "60% ..."}
    _kept_record(cache, "0000000000000001", {"engine": "torch-bf16", "cpu_contention": busy})
    _kept_record(cache, "0000000000000002", {"engine": "onnx-fp32"})  # kept before contention was measured
    unknown = {"cpus": 2, "seconds": 3.0, "others_share": None, "contended": False, "summary": "unknown"}
    _kept_record(cache, "0000000000000003", {"engine": "onnx-int8", "cpu_contention": unknown})  # no /proc/stat
    entries = {entry["chosen"]: entry for entry in _listing(capsys)["entries"]}
    assert entries["torch-bf16"]["cpu_contention"] == busy and entries["onnx-fp32"]["cpu_contention"] is None
    assert main(["engines"]) == 0
    lines = {line.split("engine: ")[1].split(" ")[0]: line for line in capsys.readouterr().out.splitlines()
             if "engine: " in line}
    assert "others used 60% of the CPUs, throttled 20% - CONTENDED" in lines["torch-bf16"]
    assert "CPU use of others not recorded" in lines["onnx-fp32"] and "CONTENDED" not in lines["onnx-fp32"]
    assert "CPU use of others unknown" in lines["onnx-int8"]


def test_an_unreadable_kept_choice_is_listed_as_such(cache, capsys):
    (cache / "choice-engine-0123456789abcdef.json").write_text("{not json")
    (entry,) = _listing(capsys)["entries"]
    assert entry["kind"] == "kept choice" and entry["current"] is False and "JSONDecodeError" in entry["error"]


def test_clear_deletes_everything_or_what_was_unused_for_days(cache, capsys):
    old, recent = cache / "image_encoder-0123456789abcdef-int8-unannotated.onnx", cache / "text-0123456789abcdef.npy"
    (cache / "tensorrt").mkdir()
    (cache / "tensorrt" / "engine.trt").write_bytes(b"x" * 10)
    for path in (old, recent):
        path.write_bytes(b"x" * 100)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    assert main(["engines", "--clear", "--older-than", "7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in result["deleted"]] == [old.name] and result["bytes_freed"] == 100
    assert not old.exists() and recent.exists()
    future = time.time() + 86400  # a clock set back since: plain --clear deletes it too
    os.utime(recent, (future, future))
    assert main(["engines", "--clear"]) == 0
    assert "deleted 2 entries, 110 B freed" in capsys.readouterr().out
    assert list(cache.iterdir()) == []


def test_a_tensorrt_folder_is_listed_by_its_newest_file(cache, capsys):
    folder = cache / "tensorrt-0123456789abcdef"
    folder.mkdir()
    (folder / "a.engine").write_bytes(b"x" * 7)
    (folder / "b.profile").write_bytes(b"x" * 5)
    month_ago = time.time() - 31 * 86400
    os.utime(folder, (month_ago, month_ago))  # the folder itself unchanged for a month, its files written now
    (entry,) = _listing(capsys)["entries"]
    assert entry["kind"] == "TensorRT engines" and entry["bytes"] == 12 and time.time() - entry["last_used"] < 3600
    assert main(["engines", "--clear", "--older-than", "7"]) == 0 and folder.exists()


def test_listing_makes_nothing_and_a_file_named_as_the_cache_is_an_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "not-yet"
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(missing))
    assert main(["engines"]) == 0
    assert "not made yet" in capsys.readouterr().out and not missing.exists()
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path / "a-file"))
    assert main(["engines", "--clear"]) == 2
    assert "is not a folder" in capsys.readouterr().err and (tmp_path / "a-file").exists()


def test_what_cannot_be_deleted_is_said_and_the_rest_is_deleted(cache, capsys, monkeypatch):
    from pathlib import Path
    stuck, other = cache / "text-0123456789abcdef.npy", cache / "text-fedcba9876543210.npy"
    for path in (stuck, other):
        path.write_bytes(b"x")
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == stuck.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert main(["engines", "--clear"]) == 2
    captured = capsys.readouterr()
    assert "deleted 1 entry" in captured.out and f"{stuck.name} (PermissionError" in captured.err
    assert stuck.exists() and not other.exists()


@pytest.mark.parametrize("argv, message", [(["--older-than", "3"], "--older-than goes with --clear"),
                                           (["--clear", "--older-than", "-1"], "days >= 0, got -1"),
                                           (["--clear", "--older-than", "nan"], "days >= 0, got nan"),
                                           (["--clear", "--older-than", "inf"], "days >= 0, got inf")])
def test_bad_options_are_a_cli_error(cache, capsys, argv, message):
    kept = cache / "text-0123456789abcdef.npy"
    kept.write_bytes(b"x")
    assert main(["engines", *argv]) == 2
    assert message in capsys.readouterr().err and kept.exists()
