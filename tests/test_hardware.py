"""capt/hardware.py: the machine's description and the precision it implies, with faked machines."""
import json

import pytest

from capt import hardware
from capt.cli import main
from capt.hardware import CudaDevice, Hardware, cgroup_cpu_quota, parse_cpu_max, parse_physical_cores, precision_reason, \
    recommended_precision, resolve_precision

AVX2 = {"sse4_2", "avx", "avx2", "fma"}
ZEN5 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni"}
SAPPHIRE = AVX2 | {"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9005
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9005
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_cpuinfo_is_parsed_into_vendor_model_and_flags():
    vendor, model, flags = hardware.parse_cpuinfo(CPUINFO)
    assert (vendor, model) == ("AuthenticAMD", "AMD EPYC 9005")
    assert {"avx2", "avx512_bf16", "avx512_vnni"} <= flags
    assert hardware.parse_cpuinfo("") == (None, None, frozenset())


XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
"""


def test_the_cpu_signature_tells_apart_machines_with_one_model_name():
    assert hardware.parse_cpu_signature(XEON_CPUINFO) == "family 6 model 207 stepping 2"  # the first processor's
    assert hardware.parse_cpu_signature(XEON_CPUINFO.replace("model\t\t: 207", "model\t\t: 167")) \
        == "family 6 model 167 stepping 2"
    assert hardware.parse_cpu_signature(CPUINFO) is None  # no family/model lines (as on ARM)
    machine = Hardware.from_flags(SAPPHIRE, cpu_model="Intel(R) Xeon(R) Processor", cpu_vendor="GenuineIntel",
                                  cpu_signature="family 6 model 167 stepping 1", l3_cache_mib=480.0)
    assert hardware.describe(machine).splitlines()[0] == \
        "CPU: Intel(R) Xeon(R) Processor (GenuineIntel, x86_64, family 6 model 167 stepping 1, L3 480 MiB)"


def test_the_l3_cache_is_read_from_sysfs(tmp_path):
    for name, level, size in [("index0", 1, "48K"), ("index2", 2, "2048K"), ("index3", 3, "491520K")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert hardware.read_l3_cache_mib(tmp_path) == 480.0
    (tmp_path / "index3" / "size").write_text("32M\n")
    assert hardware.read_l3_cache_mib(tmp_path) == 32.0
    (tmp_path / "index3" / "level").write_text("2\n")
    assert hardware.read_l3_cache_mib(tmp_path) is None  # no level-3 cache
    assert hardware.read_l3_cache_mib(tmp_path / "missing") is None


@pytest.mark.parametrize("flags, expected", [(AVX2, "fp32"), (set(), "fp32"), (ZEN5, "fp32"), (SAPPHIRE, "bf16"),
                                             (AVX2 | {"amx_bf16"}, "bf16"), (AVX2 | {"avx512f"}, "fp32"),
                                             (AVX2 | {"avx512f", "avx512_bf16"}, "fp32")])
def test_cpu_precision_is_bf16_only_with_amx(flags, expected):
    machine = Hardware.from_flags(flags)
    assert recommended_precision("cpu", machine) == expected
    assert resolve_precision("auto", "cpu", machine) == expected
    assert precision_reason("cpu", machine).startswith(expected)


def test_the_cpu_reasons_say_why():
    zen5 = precision_reason("cpu", Hardware.from_flags(ZEN5))
    assert zen5.startswith("fp32: AVX512_BF16 without AMX") and "Zen 5" in zen5 and "time bf16" in zen5
    assert Hardware.from_flags(ZEN5).native_bf16_cpu and not Hardware.from_flags(ZEN5).fast_bf16_cpu
    assert "AMX-BF16" in precision_reason("cpu", Hardware.from_flags(SAPPHIRE))
    assert "emulated" in precision_reason("cpu", Hardware.from_flags(AVX2))


@pytest.mark.parametrize("flags, expected", [(AVX2, "fp32"), (set(), "fp32"), (ZEN5, "bf16"), (SAPPHIRE, "bf16"),
                                             (AVX2 | {"avx512f"}, "fp32"), (AVX2 | {"avx512f", "avx512_bf16"}, "bf16")])
def test_auto_times_bf16_on_every_cpu_with_native_bf16(flags, expected):
    assert hardware.offered_precision("cpu", Hardware.from_flags(flags)) == expected


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 0), "fp16"), ((7, 5), "fp16")])
def test_cuda_precision_follows_the_compute_capability(capability, expected):
    machine = Hardware.from_flags(AVX2, cuda=[("GPU", capability)])
    assert recommended_precision("cuda", machine) == expected
    assert recommended_precision("cuda:0", machine) == expected
    assert recommended_precision("cpu", machine) == "fp32"  # the CPU of that machine has no AMX


def test_cuda_without_a_device_and_other_devices_are_fp32():
    assert recommended_precision("cuda", Hardware.from_flags(ZEN5)) == "fp32"
    assert recommended_precision("mps", Hardware.from_flags(ZEN5)) == "fp32"


def test_second_cuda_device_is_looked_up_by_index():
    machine = Hardware.from_flags(AVX2, cuda=[CudaDevice(0, "A100", (8, 0)), CudaDevice(1, "V100", (7, 0))])
    assert recommended_precision("cuda:1", machine) == "fp16"
    assert recommended_precision("cuda:0", machine) == "bf16"


def test_unknown_flags_are_not_assumed_native():
    machine = Hardware(flags=frozenset(), flags_known=False)
    assert recommended_precision("cpu", machine) == "fp32"
    assert "unknown" in precision_reason("cpu", machine)


def test_explicit_and_legacy_precisions_resolve():
    machine = Hardware.from_flags(ZEN5, cuda=[("GPU", (8, 0))])
    assert resolve_precision("fp32", "cpu", machine) == "fp32"
    assert resolve_precision("fp16", "cpu", machine) == "fp16"
    assert resolve_precision("cuda-bf16", "cpu", machine) == "fp32"  # what a legacy amp: true did on CPU
    assert resolve_precision("cuda-bf16", "cuda", machine) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", "cpu", machine)


def test_features_and_description_serialise():
    machine = Hardware.from_flags(SAPPHIRE, cpu_model="Xeon", cuda=[("H200", (9, 0))],
                                  onnxruntime_providers=("CPUExecutionProvider",))
    described = machine.to_dict()
    json.dumps(described)
    assert described["features"]["amx_bf16"] and described["features"]["vnni"]
    assert described["recommended_precision"] == {"cpu": "bf16", "cuda": "bf16"}
    text = hardware.describe(machine)
    assert "Xeon" in text and "H200" in text and "capability 9.0" in text
    zen5 = Hardware.from_flags(ZEN5)
    assert zen5.to_dict()["recommended_precision"] == {"cpu": "fp32"} and zen5.to_dict()["offered_precision"] == {"cpu": "bf16"}
    lines = hardware.describe(zen5).splitlines()
    assert any(line.startswith("precision auto on cpu, timed") and "bf16 against fp32" in line for line in lines)
    assert any(line.startswith("precision auto on cpu, untimed") and "fp32" in line for line in lines)
    assert "fp32 (no native bf16 to time)" in hardware.describe(Hardware.from_flags(AVX2))


def test_this_machine_is_described():
    machine = hardware.detect()
    assert machine.logical_cores and machine.torch_cpu_capability
    assert recommended_precision("cpu", machine) in ("fp32", "bf16")


def test_capt_info_prints_the_machine(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "CPU:" in text and "precision auto on cpu" in text
    assert main(["info", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["recommended_precision"]["cpu"] in ("fp32", "bf16") and "features" in described


def test_benchmark_reports_describe_the_machine_through_capt_hardware():
    from benchmarks.common import machine, machine_markdown
    info = machine()
    assert info["hardware"]["features"] == hardware.detect().to_dict()["features"]
    assert info["precision_auto"]["cpu"] == recommended_precision("cpu")
    assert info["cpu_signature"] == hardware.detect().cpu_signature
    assert "hardware" not in machine_markdown(info).split(":")[0]


SMT_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {package}\ncore id\t\t: {core}\nflags\t\t: avx2"
    for cpu, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)]))


def test_physical_cores_count_smt_siblings_once_and_only_usable_processors():
    assert parse_physical_cores(SMT_CPUINFO) == 4  # 8 processors, 2 packages x 2 cores
    assert parse_physical_cores(SMT_CPUINFO, usable={0, 2}) == 1  # two siblings of one core
    assert parse_physical_cores(SMT_CPUINFO, usable={0, 1, 4}) == 3
    assert parse_physical_cores("processor\t: 0\nflags\t: avx2\n") is None  # no core ids (some VMs, ARM)


@pytest.mark.parametrize("text, cores", [("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5),
                                         ("garbage", None), ("0 100000", None)])
def test_cgroup_cpu_max_is_read_as_cores(text, cores):
    assert parse_cpu_max(text) == cores


def _cgroup_files(root, files):
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


@pytest.mark.parametrize("membership, files, cores", [
    # cgroup v2, a private namespace: the container's own cgroup is the mount's root
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2 through the host's namespace: the limit is on a parent slice, the process's own cgroup has none
    ("0::/kubepods.slice/pod1/ctr\n", {"cpu.max": "max 100000", "kubepods.slice/pod1/cpu.max": "50000 100000",
                                       "kubepods.slice/pod1/ctr/cpu.max": "max 100000"}, 0.5),
    ("0::/a/b\n", {"a/cpu.max": "300000 100000", "a/b/cpu.max": "200000 100000"}, 2.0),  # the smallest
    ("0::/gone\n", {}, None),  # no files at all: unlimited, not an error
    ("0::/\n", {"cpu.max": "garbage"}, None),
    # cgroup v1, cpu and cpuacct mounted together; -1 = unlimited
    ("4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "250000",
                                                      "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"}, 2.5),
    ("3:cpu,cpuacct:/docker/x\n", {"cpuacct,cpu/docker/x/cpu.cfs_quota_us": "100000",  # mounted the other way round
                                   "cpuacct,cpu/docker/x/cpu.cfs_period_us": "100000"}, 1.0),
    ("3:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "-1",
                                   "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"}, None),
    ("3:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "nonsense",
                                   "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"}, None),
])
def test_the_cpu_quota_is_the_smallest_on_the_way_up_the_cgroup_tree(tmp_path, membership, files, cores):
    _cgroup_files(tmp_path, files)
    assert cgroup_cpu_quota(membership, tmp_path) == cores


def test_a_quota_under_one_core_still_computes_on_one():
    assert Hardware(usable_cores=8, cpu_quota=0.5).compute_cores == 1


@pytest.mark.parametrize("values, cores", [
    ({"usable_cores": 64}, 64),
    ({"usable_cores": 64, "physical_cores": 32}, 32),
    ({"usable_cores": 64, "physical_cores": 32, "cpu_quota": 1.5}, 2),  # a container with --cpus 1.5
    ({}, 1),
])
def test_compute_cores_are_the_fewest_of_usable_physical_and_quota(values, cores):
    assert Hardware(**values).compute_cores == cores
