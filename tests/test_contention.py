"""What else used this process's CPUs while it measured (capt.hardware.measuring_contention), and the
engine cache's rule: a choice measured under other processes' load serves its start but is not kept."""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import serving.engine as engine_module
from capt import hardware
from capt.hardware import CONTENDED_SHARE, CpuContention, measuring_contention, parse_proc_stat, \
    parse_throttled_seconds
from export.bundle import IMAGE_ONNX, load_bundle
from serving.engine import KEEP_CONTENDED_ENV, RETUNE_ENV, remembered_engine, remembered_ort_threads

PROC_STAT = """cpu  900 0 300 5000 100 0 0 40 0 0
cpu0 400 0 100 2500 50 0 0 30 0 0
cpu1 500 0 200 2500 50 0 0 10 0 0
intr 12345
"""


def test_proc_stat_is_read_per_cpu_with_steal_as_busy():
    # busy = user + nice + system + irq + softirq + steal; total adds idle and iowait
    assert parse_proc_stat(PROC_STAT) == (400 + 100 + 30 + 500 + 200 + 10, 40, 3080 + 3260)
    assert parse_proc_stat(PROC_STAT, cpus=[1]) == (710, 10, 3260)
    assert parse_proc_stat(PROC_STAT, cpus=[7]) is None  # not this machine's CPU
    assert parse_proc_stat("cpu  1 2 3 4\n") is None  # the summary line alone does not count
    assert parse_proc_stat("cpu0 10 0 5 85\n") == (15, 0, 100)  # an old kernel's four columns


@pytest.mark.parametrize("text, seconds", [
    ("usage_usec 10\nnr_throttled 3\nthrottled_usec 2500000\n", 2.5),  # cgroup v2
    ("nr_periods 10\nnr_throttled 2\nthrottled_time 1500000000\n", 1.5),  # v1, in nanoseconds
    ("usage_usec 10\n", None),
    ("throttled_usec nonsense\n", None),
])
def test_the_cgroups_throttled_time_is_read_in_seconds(text, seconds):
    assert parse_throttled_seconds(text) == seconds


def test_the_cgroups_cpu_stat_is_found_for_v2_and_v1(tmp_path):
    (tmp_path / "pod/ctr").mkdir(parents=True)
    (tmp_path / "pod/ctr/cpu.stat").write_text("throttled_usec 0\n")
    assert hardware._cgroup_cpu_stat("0::/pod/ctr\n", tmp_path) == tmp_path / "pod/ctr/cpu.stat"
    (tmp_path / "cpu,cpuacct/docker/x").mkdir(parents=True)
    (tmp_path / "cpu,cpuacct/docker/x/cpu.stat").write_text("throttled_time 0\n")
    assert hardware._cgroup_cpu_stat("4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n", tmp_path) \
        == tmp_path / "cpu,cpuacct/docker/x/cpu.stat"
    assert hardware._cgroup_cpu_stat("0::/elsewhere\n", tmp_path / "none") is None


def test_contended_means_a_quarter_of_the_cpus_or_a_tenth_throttled():
    assert not CpuContention(cpus=2, seconds=1, others_share=CONTENDED_SHARE - 0.01).contended
    assert CpuContention(cpus=2, seconds=1, others_share=CONTENDED_SHARE).contended
    assert CpuContention(cpus=2, seconds=1, others_share=0.0, throttled_share=0.2).contended
    unknown = CpuContention(cpus=2, seconds=1)
    assert not unknown.contended and "unknown" in unknown.to_dict()["summary"]
    report = CpuContention(cpus=2, seconds=3.0, others_share=0.5, steal_share=0.25).to_dict()
    assert report["contended"] and "50%" in report["summary"] and "hypervisor" in report["summary"]
    json.dumps(report)


SPIN = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < {seconds}: pass\n"
needs_proc_stat = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat (not Linux)")


def _spinners(seconds: float) -> list[subprocess.Popen]:
    """One busy process per CPU this process may use."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
            for _ in range(len(os.sched_getaffinity(0)))]


@needs_proc_stat
def test_other_processes_keeping_the_cpus_busy_are_measured():
    spinners = _spinners(2.0)
    try:
        with measuring_contention() as contention:
            time.sleep(1.0)
    finally:
        for spinner in spinners:
            spinner.wait()
    # Every CPU busy with another process for the whole block: about 1.0 (0 if others went uncounted).
    assert contention.others_share >= 0.6 and contention.contended, contention


@needs_proc_stat
def test_this_processs_own_work_and_its_waited_children_are_not_others():
    with measuring_contention() as contention:
        for spinner in _spinners(1.0):  # as busy as above, but this process's own (its children, waited for)
            spinner.wait()
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:  # and this process itself
            pass
    # About 0; counting this process's work as others' would read about 1.0 for the children.
    assert contention.others_share < 0.5 and contention.seconds >= 1.4, contention


# ---- the engine cache's rule -------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.delenv(RETUNE_ENV, raising=False)
    monkeypatch.delenv(KEEP_CONTENDED_ENV, raising=False)  # conftest keeps every choice; here the rule is tested
    return tmp_path


def _load(monkeypatch, others_share: float):
    """Every measurement reads ``others_share`` of the CPUs used by other processes."""
    @contextlib.contextmanager
    def faked():
        contention = CpuContention(cpus=2)
        yield contention
        contention.seconds, contention.others_share, contention.steal_share = 1.0, others_share, 0.0
    monkeypatch.setattr(engine_module, "measuring_contention", faked)


def _threads(bundle_dir, hardware_):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return remembered_ort_threads(bundle_dir / IMAGE_ONNX, manifest["files"][IMAGE_ONNX], 64, hardware_)


TWO_CORES = hardware.Hardware.from_flags({"avx2"}, usable_cores=2, physical_cores=2, logical_cores=2)


def test_a_choice_measured_under_load_serves_its_start_and_is_not_kept(default_bundle, cache, monkeypatch):
    _load(monkeypatch, others_share=0.6)
    loaded = _threads(default_bundle, TWO_CORES)
    assert loaded["kept"] is False and "60%" in loaded["not_kept"] and loaded["cpu_contention"]["contended"]
    assert loaded["used"] in (1, 2) and not list(cache.glob("choice-*.json"))
    _load(monkeypatch, others_share=0.05)
    idle = _threads(default_bundle, TWO_CORES)  # measured again, on an idle machine now: kept
    assert "recalled" not in idle and "kept" not in idle and not idle["cpu_contention"]["contended"]
    assert len(list(cache.glob("choice-ort-threads-*.json"))) == 1
    recalled = _threads(default_bundle, TWO_CORES)
    assert "recalled" in recalled and recalled["cpu_contention"] == idle["cpu_contention"]


def test_an_engine_chosen_under_load_is_measured_again_at_the_next_start(default_bundle, cache, monkeypatch):
    bundle = load_bundle(default_bundle, ["CPUExecutionProvider"], check=False)
    measured = []
    real = engine_module.choose_engine
    monkeypatch.setattr(engine_module, "choose_engine", lambda *a, **k: measured.append(1) or real(*a, **k))
    _load(monkeypatch, others_share=0.9)
    engine, report = remembered_engine(bundle, TWO_CORES)
    assert report["kept"] is False and engine.name == report["engine"]
    engine, report = remembered_engine(bundle, TWO_CORES)
    assert len(measured) == 2 and "recalled" not in report and not list(cache.glob("choice-engine-*.json"))


def test_keep_contended_keeps_a_choice_measured_under_load(default_bundle, cache, monkeypatch):
    monkeypatch.setenv(KEEP_CONTENDED_ENV, "1")
    _load(monkeypatch, others_share=0.9)
    measured = _threads(default_bundle, TWO_CORES)
    assert "kept" not in measured and measured["cpu_contention"]["contended"]
    assert "recalled" in _threads(default_bundle, TWO_CORES)
