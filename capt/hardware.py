"""The machine this runs on, in one place: CPU vendor and model, the ISA features that decide which
numeric paths are fast (AVX2, AVX-512, AVX512_BF16, AMX, VNNI), PyTorch's CPU capability, cores,
CUDA devices and ONNX Runtime's providers, and what that implies for precision
(:func:`recommended_precision`, :func:`resolve_precision`).

Everything that decides takes a :class:`Hardware` as a parameter, so that the choices can be tested
with faked machines (``Hardware.from_flags({"avx2"})``); :func:`detect` describes the real one
(Linux: ``/proc/cpuinfo``; elsewhere the flags are unknown and every choice falls back to fp32 on CPU).

Two rules for ``auto`` on a CPU. Where it cannot measure (a clean-only evaluation, a distributed run)
it takes bf16 only with AMX-BF16 (:func:`recommended_precision`): PyTorch's bf16 autocast measured 4.8x
fp32 on ViT-B-32 on an Intel Xeon with AMX, 0.15x on an AVX2-only EPYC (bf16 emulated through fp32) and
0.30x-0.56x with AVX512_BF16 but no AMX on a loaded AMD Zen 5. Where it can measure (training,
pretraining, the probe: :func:`timed_precision`) it times bf16 against fp32 on the model itself wherever
bf16 is native, AVX512_BF16 included (:func:`offered_precision`): the model decides as much as the CPU.
On an idle Zen 5 (2026-12-02) the probe's attack step on ViT-B-32, its weights cast to bf16 once,
measured 2.3x fp32 and a pretraining step 1.0x-1.24x over four runs, while the default model's CAPT
step was 0.82x-0.95x; on the AMX Xeon that step measured 0.44x.
``python -m capt.hardware`` prints the description as JSON (``capt info`` as text).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

# What a user may ask for (``--precision``); ``cuda-bf16`` is what a legacy ``amp: true`` config did
# (bf16 autocast on CUDA, fp32 on CPU) and is accepted from configs, not offered on the command line.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LEGACY_AMP = "cuda-bf16"
CONCRETE = ("fp32", "bf16", "fp16")

# /proc/cpuinfo flag names of the features that matter here.
FEATURES = {
    "avx2": "avx2", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8", "amx_fp16": "amx_fp16",
}


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gb: float | None = None


@dataclass(frozen=True)
class Hardware:
    """A description of a machine. Build a fake one with :meth:`from_flags`."""
    cpu_vendor: str | None = None
    cpu_model: str | None = None
    # VMs often show one generic model name ("Intel(R) Xeon(R) Processor") for different generations:
    # the x86 family/model/stepping and the L3 size are what tell two such machines apart in a report.
    cpu_signature: str | None = None  # "family 6 model 207 stepping 2"; None off x86
    l3_cache_mib: float | None = None
    arch: str = "x86_64"
    flags: frozenset = field(default_factory=frozenset)
    flags_known: bool = True  # False where /proc/cpuinfo could not be read (not Linux)
    torch_cpu_capability: str | None = None
    logical_cores: int | None = None
    usable_cores: int | None = None
    physical_cores: int | None = None  # distinct (physical id, core id) pairs of /proc/cpuinfo, over the usable CPUs
    cpu_quota: float | None = None  # cgroup CPU limit in cores (a container's --cpus), None where unlimited
    torch_threads: int | None = None
    cuda: tuple = ()  # CudaDevice, one per visible device
    onnxruntime_providers: tuple = ()
    versions: dict = field(default_factory=dict)

    @classmethod
    def from_flags(cls, flags: Iterable[str], cuda: Iterable[CudaDevice | tuple] = (), **values) -> "Hardware":
        """A (fake) machine with these CPU flags; ``cuda`` as devices or ``(name, (major, minor))`` pairs."""
        devices = tuple(d if isinstance(d, CudaDevice) else CudaDevice(i, d[0], tuple(d[1]))
                        for i, d in enumerate(cuda))
        return cls(flags=frozenset(flags), cuda=devices, **values)

    # ---- features ------------------------------------------------------------------------------
    @property
    def compute_cores(self) -> int:
        """Cores that compute threads can keep busy: the usable CPUs, counting a core's SMT siblings once
        and no more than the container's CPU quota (rounded up); 1 where nothing is known."""
        cores = [c for c in (self.usable_cores, self.physical_cores) if c]
        if self.cpu_quota:
            cores.append(math.ceil(self.cpu_quota))
        return max(1, min(cores)) if cores else 1

    def has(self, feature: str) -> bool:
        return FEATURES.get(feature, feature) in self.flags

    @property
    def avx2(self) -> bool:
        return self.has("avx2")

    @property
    def avx512(self) -> bool:
        return self.has("avx512f")

    @property
    def vnni(self) -> bool:
        return self.has("avx512_vnni") or self.has("avx_vnni") or self.has("amx_int8")

    @property
    def amx(self) -> bool:
        return self.has("amx_bf16") or self.has("amx_int8")

    @property
    def native_bf16_cpu(self) -> bool:
        """bf16 matmuls run natively (AVX512_BF16 or AMX-BF16), not emulated through fp32 (native is not
        fast: see :attr:`fast_bf16_cpu`)."""
        return bool(self.native_bf16_features)

    @property
    def native_bf16_features(self) -> list[str]:
        """The features that make bf16 native here (``/proc/cpuinfo`` names)."""
        return [f for f in ("avx512_bf16", "amx_bf16") if self.has(f)]

    @property
    def fast_bf16_cpu(self) -> bool:
        """PyTorch's bf16 autocast beats fp32 on this CPU: AMX-BF16 (4.8x on ViT-B-32, Xeon). AVX512_BF16
        without AMX measured slower than fp32 (0.56x a CAPT training step, AMD Zen 5)."""
        return self.has("amx_bf16")

    def cuda_capability(self, index: int = 0) -> tuple[int, int] | None:
        for device in self.cuda:
            if device.index == index:
                return tuple(device.capability)
        return self.cuda[0].capability if self.cuda and index == 0 else None

    def features(self) -> dict[str, bool]:
        return {"avx2": self.avx2, "avx512": self.avx512, "avx512_bf16": self.has("avx512_bf16"),
                "amx_bf16": self.has("amx_bf16"), "amx_int8": self.has("amx_int8"), "vnni": self.vnni,
                "avx512_fp16": self.has("avx512_fp16")}

    def to_dict(self) -> dict:
        values = asdict(self)
        values["flags"] = sorted(f for f in self.flags if f in FEATURES.values())  # the ones that matter
        values["features"] = self.features()
        values["compute_cores"] = self.compute_cores
        values["cuda"] = [{**asdict(d), "capability": list(d.capability)} for d in self.cuda]
        values["onnxruntime_providers"] = list(self.onnxruntime_providers)
        values["recommended_precision"] = {"cpu": recommended_precision("cpu", self),
                                           **({"cuda": recommended_precision("cuda", self)} if self.cuda else {})}
        values["offered_precision"] = {"cpu": offered_precision("cpu", self),
                                     **({"cuda": offered_precision("cuda", self)} if self.cuda else {})}
        values["why"] = {"cpu": precision_reason("cpu", self),
                         **({"cuda": precision_reason("cuda", self)} if self.cuda else {})}
        return values


# ---- detection -----------------------------------------------------------------------------------
def _cpuinfo_fields(text: str) -> Iterable[tuple[str, str]]:
    """(key in lower case, value) of each line of a /proc/cpuinfo text, stripped."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        yield key.strip().lower(), value.strip()


def parse_cpuinfo(text: str) -> tuple[str | None, str | None, frozenset]:
    """(vendor, model name, flags) of the first processor in a /proc/cpuinfo text (x86 and ARM)."""
    vendor = model = None
    flags: frozenset = frozenset()
    for key, value in _cpuinfo_fields(text):
        if key == "vendor_id" and vendor is None:
            vendor = value
        elif key == "cpu implementer" and vendor is None:
            vendor = f"ARM implementer {value}"
        elif key in ("model name", "processor name") and model is None and value:
            model = value
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return vendor, model, flags


def parse_cpu_signature(text: str) -> str | None:
    """"family F model M stepping S" of the first processor in a /proc/cpuinfo text; None where the
    text has no x86 ``cpu family`` and ``model`` lines (ARM, not Linux)."""
    found: dict[str, str] = {}
    for key, value in _cpuinfo_fields(text):
        if key == "processor" and found:
            break  # the first processor only
        if key in ("cpu family", "model", "stepping") and value.isdigit():
            found[key] = value
    if "cpu family" not in found or "model" not in found:
        return None
    return f"family {found['cpu family']} model {found['model']}" + (
        f" stepping {found['stepping']}" if "stepping" in found else "")


def read_l3_cache_mib(cache: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> float | None:
    """The size of the level-3 cache that CPU 0 shares, in MiB, from Linux's sysfs (``index*/level``
    and ``index*/size``, e.g. "491520K"); None where it is not there."""
    for index in sorted(cache.glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip().upper()
            units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}  # Linux writes kibibytes ("491520K")
            if size[-1:] in units:
                return round(float(size[:-1]) * units[size[-1]], 1)
            return round(float(size) / 1024 ** 2, 1)  # plain bytes
    return None


def parse_physical_cores(text: str, usable: Iterable[int] | None = None) -> int | None:
    """Distinct physical cores among the ``usable`` processors (all if None) of a /proc/cpuinfo text;
    None where it has no ``core id`` lines (some VMs, ARM)."""
    wanted = None if usable is None else set(usable)
    cores, processor, package = set(), None, "0"
    for key, value in _cpuinfo_fields(text):
        if key == "processor":
            processor, package = int(value) if value.isdigit() else None, "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and (wanted is None or processor in wanted):
            cores.add((package, value))
    return len(cores) or None


def parse_cpu_max(text: str) -> float | None:
    """Cores a cgroup v2 ``cpu.max`` ("quota period", "max period" when unlimited) allows."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(membership: str, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores this process's cgroups allow: the smallest quota from its own cgroup up to the root of
    the hierarchy, cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), so
    that a limit set on a parent (a systemd slice, a pod) or seen through the host's cgroup
    namespace counts too. ``membership``: the text of ``/proc/self/cgroup``; None where unlimited."""
    quotas = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            quotas += _walk_up(root, path, lambda folder: parse_cpu_max((folder / "cpu.max").read_text()))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                if mount.is_dir():
                    quotas += _walk_up(mount, path, _cfs_quota)
                    break
    quotas = [quota for quota in quotas if quota is not None]
    return min(quotas) if quotas else None


def _walk_up(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float | None]:
    """``read`` of the cgroup at ``path`` under ``mount`` and of each parent up to ``mount``; a
    folder that is not there or cannot be read counts as unlimited."""
    folder, found = mount / path.strip("/"), []
    while True:
        with contextlib.suppress(OSError, ValueError):
            found.append(read(folder))
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def _cfs_quota(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    period = int((folder / "cpu.cfs_period_us").read_text())
    return quota / period if quota > 0 and period > 0 else None


def _cpu_quota() -> float | None:
    try:
        membership = Path("/proc/self/cgroup").read_text()
    except OSError:
        membership = "0::/"
    return cgroup_cpu_quota(membership)


# ---- contention: what else used this process's CPUs while it measured --------------------------------
# A timing is a statement about this machine only if nothing else had its CPUs meanwhile: another
# process, a worker starting beside it, the hypervisor giving the time to another guest (steal) or a
# cgroup quota throttling it. On these 2-core VMs a process keeping one core busy made a 2-thread
# PyTorch timing up to 10x slower and turned bf16's 1.27x into 0.84x (README, Performance).
CONTENDED_SHARE = 0.25  # of the usable CPUs' time, on average over the measurement
CONTENDED_THROTTLED = 0.10  # of the measurement's time spent throttled by the cgroup's quota
# /proc/stat's per-CPU columns: user nice system idle iowait irq softirq steal guest guest_nice.
# guest and guest_nice are already in user and nice; idle and iowait are the idle time.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
_IDLE_COLUMNS = (3, 4)


def parse_proc_stat(text: str, cpus: Iterable[int] | None = None) -> tuple[int, int, int] | None:
    """(busy, steal, total) clock ticks of ``cpus`` (their ``cpuN`` lines; every CPU when None) from
    the text of ``/proc/stat``; busy includes steal. None where the text has none of those lines."""
    wanted = None if cpus is None else {f"cpu{c}" for c in cpus}
    busy = steal = total = 0
    found = False
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()) or (wanted is not None and name not in wanted):
            continue
        values = [int(v) for v in rest.split()]
        values += [0] * (8 - len(values))  # old kernels write fewer columns
        busy += sum(values[i] for i in _BUSY_COLUMNS)
        steal += values[7]
        total += sum(values[i] for i in (*_BUSY_COLUMNS, *_IDLE_COLUMNS))
        found = True
    return (busy, steal, total) if found else None


def parse_throttled_seconds(text: str) -> float | None:
    """Seconds a cgroup's tasks were throttled, from its ``cpu.stat``: cgroup v2 ``throttled_usec``,
    v1 ``throttled_time`` (nanoseconds). None where neither is there."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            if name == "throttled_usec":
                return int(value) / 1e6
            if name == "throttled_time":
                return int(value) / 1e9
    return None


def _cgroup_cpu_stat(membership: str, root: Path = Path("/sys/fs/cgroup")) -> Path | None:
    """This process's own cgroup's ``cpu.stat`` (v2, else v1's cpu controller), where there is one."""
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            folders = [root / path.strip("/"), root]
        elif "cpu" in controllers.split(","):
            folders = [mount / path.strip("/")
                       for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu")]
        else:
            continue
        for folder in folders:
            if (folder / "cpu.stat").is_file():
                return folder / "cpu.stat"
    return None


@dataclass
class CpuContention:
    """What used this process's CPUs while a block ran (:func:`measuring_contention`): other processes
    and the hypervisor (``others_share``: their part of the usable CPUs' time, on average), of which
    ``steal_share`` was stolen by the hypervisor, and the time the cgroup's quota throttled it. A share
    is None where it cannot be read (no ``/proc/stat``: not Linux), which counts as uncontended."""
    cpus: int
    seconds: float = 0.0
    others_share: float | None = None
    steal_share: float | None = None
    throttled_share: float | None = None

    @property
    def contended(self) -> bool:
        return ((self.others_share or 0.0) >= CONTENDED_SHARE
                or (self.throttled_share or 0.0) >= CONTENDED_THROTTLED)

    def describe(self) -> str:
        if self.others_share is None:
            return "unknown (no /proc/stat)"
        parts = [f"{self.others_share:.0%} of this process's {self.cpus} CPU(s) used by others over {self.seconds:.1f} s"]
        if self.steal_share:
            parts.append(f"{self.steal_share:.0%} stolen by the hypervisor")
        if self.throttled_share:
            parts.append(f"throttled by the cgroup's CPU quota {self.throttled_share:.0%} of the time")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "contended": self.contended, "summary": self.describe()}


def _own_cpu_seconds() -> float:
    times = os.times()  # this process's threads, and its children once waited for
    return times.user + times.system + times.children_user + times.children_system


def _contention_sample(cpus: list[int] | None, cpu_stat: Path | None) -> tuple:
    """(wall clock, this process's CPU seconds, /proc/stat's ticks of ``cpus``, throttled seconds)."""
    ticks = throttled = None
    with contextlib.suppress(OSError, ValueError):
        ticks = parse_proc_stat(Path("/proc/stat").read_text(), cpus)
    if cpu_stat is not None:
        with contextlib.suppress(OSError, ValueError):
            throttled = parse_throttled_seconds(cpu_stat.read_text())
    return time.perf_counter(), _own_cpu_seconds(), ticks, throttled


@contextlib.contextmanager
def measuring_contention() -> Iterator[CpuContention]:
    """Measures what else used this process's CPUs (its affinity) while the block runs; the yielded
    :class:`CpuContention` is filled in when the block ends."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    membership = ""
    with contextlib.suppress(OSError):
        membership = Path("/proc/self/cgroup").read_text()
    cpu_stat = _cgroup_cpu_stat(membership)
    result = CpuContention(cpus=len(cpus) if cpus else (os.cpu_count() or 1))
    before = _contention_sample(cpus, cpu_stat)
    try:
        yield result
    finally:
        after = _contention_sample(cpus, cpu_stat)
        result.seconds = round(after[0] - before[0], 3)
        if before[2] is not None and after[2] is not None:
            busy, steal, total = (a - b for a, b in zip(after[2], before[2]))
            if total > 0:
                tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
                capacity = total / tick  # CPU seconds the usable CPUs had over the block
                own = after[1] - before[1]
                result.others_share = round(min(1.0, max(0.0, busy / tick - own) / capacity), 3)
                result.steal_share = round(steal / total, 3)
        if before[3] is not None and after[3] is not None and result.seconds > 0:
            # Summed over the CPUs' run queues that were throttled, hence per CPU of the block's time.
            throttled = max(0.0, after[3] - before[3])
            result.throttled_share = round(min(1.0, throttled / (result.seconds * result.cpus)), 3)


def _cuda_devices(torch) -> tuple:
    devices = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                devices.append(CudaDevice(i, props.name, (props.major, props.minor),
                                          round(props.total_memory / 1024 ** 3, 1)))
    except Exception:  # noqa: BLE001 - a broken driver is "no CUDA" here
        return ()
    return tuple(devices)


def _versions() -> dict:
    from importlib import metadata
    found = {"python": platform.python_version()}
    for key, dists in {"torch": ("torch",), "onnxruntime": ("onnxruntime-gpu", "onnxruntime")}.items():
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[key] = metadata.version(dist)
                break
    return found


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """This machine (cached: the hardware does not change while a process runs)."""
    vendor = model = physical = signature = None
    flags: frozenset = frozenset()
    known = False
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        vendor, model, flags = parse_cpuinfo(cpuinfo)
        signature = parse_cpu_signature(cpuinfo)
        physical = parse_physical_cores(cpuinfo, affinity)
        known = True
    if model is None:
        model = platform.processor() or None
    capability = threads = None
    cuda: tuple = ()
    try:
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
        threads = torch.get_num_threads()
        cuda = _cuda_devices(torch)
    except Exception:  # noqa: BLE001 - no torch: described without it
        pass
    providers: tuple = ()
    with contextlib.suppress(Exception):
        import onnxruntime
        providers = tuple(onnxruntime.get_available_providers())
    usable = len(affinity) if affinity is not None else os.cpu_count()
    return Hardware(cpu_vendor=vendor, cpu_model=model, cpu_signature=signature, l3_cache_mib=read_l3_cache_mib(),
                    arch=platform.machine(), flags=flags, flags_known=known,
                    torch_cpu_capability=capability, logical_cores=os.cpu_count(), usable_cores=usable,
                    physical_cores=physical, cpu_quota=_cpu_quota(),
                    torch_threads=threads, cuda=cuda, onnxruntime_providers=providers, versions=_versions())


# ---- precision -----------------------------------------------------------------------------------
def _device_type(device) -> str:
    return str(device).split(":")[0] if isinstance(device, str) else getattr(device, "type", str(device))


def _cuda_index(device) -> int:
    index = None if isinstance(device, str) else getattr(device, "index", None)
    if index is None and ":" in str(device):
        index = int(str(device).split(":")[1])
    return index or 0


def recommended_precision(device, hardware: Hardware | None = None) -> str:
    """The fastest numerically sound autocast precision on ``device`` ("cpu", "cuda", "cuda:1" or a
    torch.device): bf16 on a CPU with AMX-BF16 (fp32 on every other CPU, AVX512_BF16 without AMX
    included: measured slower than fp32 there); on a GPU bf16 from compute capability 8.0 (Ampere),
    fp16 below; fp32 anywhere else."""
    hardware = hardware or detect()
    kind = _device_type(device)
    if kind == "cuda":
        capability = hardware.cuda_capability(_cuda_index(device))
        if capability is None:
            return "fp32"
        return "bf16" if tuple(capability) >= (8, 0) else "fp16"
    if kind == "cpu":
        return "bf16" if hardware.fast_bf16_cpu else "fp32"
    return "fp32"


def offered_precision(device, hardware: Hardware | None = None) -> str:
    """The reduced precision ``auto`` times against fp32 where it can measure the model
    (:func:`timed_precision`), or "fp32" where there is none worth timing: on a CPU bf16 wherever bf16
    is native (AVX512_BF16 or AMX-BF16), on a GPU what :func:`recommended_precision` says."""
    hardware = hardware or detect()
    if _device_type(device) == "cpu":
        return "bf16" if hardware.native_bf16_cpu else "fp32"
    return recommended_precision(device, hardware)


def precision_reason(device, hardware: Hardware | None = None) -> str:
    """One sentence: why :func:`recommended_precision` chose what it did."""
    hardware = hardware or detect()
    kind = _device_type(device)
    chosen = recommended_precision(device, hardware)
    if kind == "cuda":
        capability = hardware.cuda_capability(_cuda_index(device))
        if capability is None:
            return "fp32: no CUDA device is visible"
        cap = f"{capability[0]}.{capability[1]}"
        return (f"bf16 autocast: CUDA capability {cap} >= 8.0 has native bf16" if chosen == "bf16" else
                f"fp16 autocast: CUDA capability {cap} < 8.0 has no fast bf16 (fp16 with a gradient scaler in training)")
    if kind == "cpu":
        if chosen == "bf16":
            return ("bf16 autocast: the CPU has AMX-BF16 (on an AMX Xeon ViT-B-32 ran 2.5x fp32; where a model "
                    "can be timed, training, pretraining and the probe still check it: the default model's CAPT "
                    "step measured 0.44x there)")
        if not hardware.flags_known:
            return "fp32: the CPU's features are unknown here (no /proc/cpuinfo), so AMX-BF16 is not assumed"
        if hardware.has("avx512_bf16"):
            return ("fp32: AVX512_BF16 without AMX measured 0.30x-0.56x fp32 on a loaded AMD Zen 5 (where a model "
                    "can be timed, training, pretraining and the probe time bf16 on it instead)")
        return "fp32: the CPU has no native bf16 (no AVX512_BF16 or AMX-BF16): bf16 would be emulated, and slower (0.15x)"
    return f"fp32: no reduced-precision path is known for device type '{kind}'"


def check_precision(value: str, allow_legacy: bool = False) -> str:
    allowed = PRECISIONS + ((LEGACY_AMP,) if allow_legacy else ())
    if value not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {value!r}")
    return value


def resolve_precision(requested: str, device, hardware: Hardware | None = None) -> str:
    """``requested`` (auto, fp32, bf16, fp16 or the legacy cuda-bf16) as a concrete precision on ``device``."""
    check_precision(requested, allow_legacy=True)
    if requested == "auto":
        return recommended_precision(device, hardware)
    if requested == LEGACY_AMP:
        return "bf16" if _device_type(device) == "cuda" else "fp32"
    return requested


# A reduced precision that auto chooses by timing must beat fp32 by this much (a short timing is noisy,
# and without a clear gain fp32's exact arithmetic is worth more).
MIN_PRECISION_GAIN = 1.10
# Timed rounds of each precision after the warm-up (at least MIN_TIMED_ROUNDS, more while the budget
# lasts): the gain must hold in each. On an idle Zen 5, a pretraining step measured 1.24x and 1.04x in
# bf16 in two runs an hour apart, and a single timing once chose bf16 for a run that then went 0.90x fp32.
TIMED_ROUNDS = 3
MIN_TIMED_ROUNDS = 2
# Warm-up rounds (both precisions) until each side's latest step is within WARM_TOLERANCE of its fastest
# before it, either way (a step still getting faster has not settled either: a cold first round is
# usually the slowest): at least MIN_WARMUP_ROUNDS, at most MAX_WARMUP_ROUNDS, and no more once half
# the budget is spent. So whatever the budget, at least 2 warm-up and 2 timed rounds run (4 steps
# each way: a slow model's timing outlasts the budget). One round was not enough: on an AMX Xeon
# (model 167, 2026-12-04) the pretraining step's fp32 side took 650-990 ms instead of ~420 ms in
# rounds 1-3 after its first bf16 step (glibc's allocator still growing its mmap threshold for fp32's
# twice larger tensors: with MALLOC_MMAP_THRESHOLD_ fixed the slow rounds all but vanished), so three timed rounds all showed bf16 1.26-2.15x, and auto chose bf16
# for a run in which bf16 then went 0.96x fp32.
MIN_WARMUP_ROUNDS = 2
MAX_WARMUP_ROUNDS = 6
WARM_TOLERANCE = 0.10


def timed_precision(step: Callable[[], object], device, hardware: Hardware | None = None,
                    budget_s: float = 6.0) -> tuple[str, str]:
    """What ``auto`` means for one workload on ``device``: the reduced precision this device offers
    (:func:`offered_precision`) only if ``step()`` (one forward and backward of the real model,
    run here under each side's autocast) runs at least ``MIN_PRECISION_GAIN`` times faster in it than in
    fp32; fp32 otherwise. Why measure: the rule is about the CPU, the speed also about the model. On an
    Intel Xeon with AMX, bf16 autocast ran ViT-B-32's image tower 2.5x fp32 but the default model's CAPT
    training step at 0.50x (its 128-wide matrices are too small for AMX to pay for the casts).
    ``step`` must leave no trace (gradients it made are the caller's to drop); the global RNG is
    restored afterwards. Returns (precision, why)."""
    import torch
    hardware = hardware or detect()
    offered = offered_precision(device, hardware)
    if offered == "fp32":
        return "fp32", precision_reason(device, hardware)
    kind = _device_type(device)
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    seconds: dict[str, float] = {}
    ratios: list[float] = []  # fp32 / reduced, one per timed round
    started = time.perf_counter()
    warmup = 0  # rounds spent warming up
    fastest: dict[str, float] = {}  # each side's fastest warm-up step so far

    def one_round() -> dict[str, float]:
        this_round = {}
        for precision in ("fp32", offered):  # the precisions alternating
            t0 = time.perf_counter()
            with autocast_factory(precision, device)():
                step()
            sync()
            this_round[precision] = time.perf_counter() - t0
        return this_round

    with measuring_contention() as contention, \
            torch.random.fork_rng(devices=[_cuda_index(device)] if kind == "cuda" else []):
        while warmup < MAX_WARMUP_ROUNDS:  # warm-up rounds until both sides have settled
            this_round = one_round()
            warmup += 1
            settled = all(before / (1 + WARM_TOLERANCE) <= taken <= before * (1 + WARM_TOLERANCE)
                          for p, taken in this_round.items() for before in [fastest.get(p, math.inf)])
            fastest = {p: min(fastest.get(p, math.inf), taken) for p, taken in this_round.items()}
            if warmup >= MIN_WARMUP_ROUNDS and (settled or time.perf_counter() - started > budget_s / 2):
                break
        for round_ in range(1, TIMED_ROUNDS + 1):  # then the timed rounds
            this_round = one_round()
            ratios.append(this_round["fp32"] / this_round[offered])
            for precision, taken in this_round.items():
                seconds[precision] = min(seconds.get(precision, math.inf), taken)
            if round_ >= MIN_TIMED_ROUNDS and time.perf_counter() - started > budget_s:
                break
    # Every timed round must show the gain: on a VM whose speed drifts, one lucky round is not a gain.
    speedup = min(ratios)
    timing = (f"measured here: one step {seconds['fp32'] * 1e3:.1f} ms in fp32, {seconds[offered] * 1e3:.1f} ms "
              f"in {offered}, {speedup:.2f}x in its worst of {len(ratios)} round(s)"
              + (f" ({', '.join(f'{r:.2f}x' for r in ratios)})" if len(ratios) > 1 else "")
              + f" after {warmup} warm-up round(s)" + ("" if settled else " (not settled)"))
    if kind == "cpu" and contention.others_share is not None:
        # The rounds alternate, so a neighbour's load slows both sides, but not always alike (AMX and the
        # caches are shared): the record of a run says what the choice was measured beside.
        timing += f"; meanwhile {contention.describe()}"
        if contention.contended:
            timing += " (contended: timed again on an idle machine, the choice may differ)"
            logger.warning("precision auto was timed while %s: the choice may differ on an idle machine",
                           contention.describe())
    if speedup >= MIN_PRECISION_GAIN:
        native = ("the CPU has native bf16: " + ", ".join(hardware.native_bf16_features)
                  if kind == "cpu" else precision_reason(device, hardware))
        return offered, f"{offered} autocast: {timing} ({native})"
    return "fp32", (f"fp32: {offered} autocast is what this machine offers, but on this model it {timing}, "
                    f"under the {MIN_PRECISION_GAIN:.2f}x it must gain")


def reduced_dtype(precision: str):
    """The torch dtype of a concrete reduced ``precision`` ("bf16" or "fp16")."""
    import torch
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"not a reduced precision: {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_factory(precision: str, device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context for a concrete ``precision`` on ``device``
    (a null context for fp32)."""
    import torch
    check_precision(precision)
    if precision not in CONCRETE:
        raise ValueError(f"resolve {precision!r} first (resolve_precision)")
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = reduced_dtype(precision)
    kind = _device_type(device)
    return lambda: torch.autocast(kind, dtype=dtype)


# ---- text ----------------------------------------------------------------------------------------
def describe(hardware: Hardware | None = None) -> str:
    """The lines ``capt info`` prints."""
    hardware = hardware or detect()
    yes = [name for name, on in hardware.features().items() if on]
    identity = [hardware.cpu_vendor or "unknown vendor", hardware.arch, hardware.cpu_signature,
                f"L3 {hardware.l3_cache_mib:g} MiB" if hardware.l3_cache_mib else None]
    lines = [f"CPU: {hardware.cpu_model or 'unknown'} ({', '.join(part for part in identity if part)})",
             f"cores: {hardware.usable_cores} usable of {hardware.logical_cores}"
             f" ({hardware.physical_cores or 'unknown'} physical"
             + (f", CPU quota {hardware.cpu_quota:g}" if hardware.cpu_quota else ", no CPU quota")
             + f": {hardware.compute_cores} for compute); torch threads {hardware.torch_threads}",
             "features: " + (", ".join(yes) if yes else "none of avx2/avx512/bf16/amx/vnni")
             + ("" if hardware.flags_known else " (flags unknown: no /proc/cpuinfo)"),
             f"torch CPU capability: {hardware.torch_cpu_capability}"]
    if hardware.cuda:
        lines += [f"CUDA {d.index}: {d.name}, capability {d.capability[0]}.{d.capability[1]}"
                  + (f", {d.memory_gb} GB" if d.memory_gb else "") for d in hardware.cuda]
    else:
        lines.append("CUDA: none visible")
    lines.append("ONNX Runtime providers: " + (", ".join(hardware.onnxruntime_providers) or "onnxruntime not installed")
                 + (" (as built; GPU providers need a visible CUDA device)"
                    if not hardware.cuda and "CUDAExecutionProvider" in hardware.onnxruntime_providers else ""))
    offered = offered_precision("cpu", hardware)
    lines.append("precision auto on cpu, timed (training, pretraining, the probe): "
                 + (f"{offered} against fp32 on the model itself, taken at {MIN_PRECISION_GAIN:.2f}x or better"
                    if offered != "fp32" else "fp32 (no native bf16 to time)"))
    lines.append(f"precision auto on cpu, untimed (clean-only evaluation, distributed): {precision_reason('cpu', hardware)}")
    if hardware.cuda:
        lines.append(f"precision auto on cuda: {precision_reason('cuda', hardware)}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in hardware.versions.items()))
    return "\n".join(lines)


def _info(args) -> None:
    hardware = detect()
    print(json.dumps(hardware.to_dict(), indent=2) if args.json else describe(hardware))


def register(subparsers) -> tuple[type[BaseException], ...]:
    """``capt info`` (the ``capt.commands`` entry point, pyproject.toml)."""
    p = subparsers.add_parser("info", help="this machine: CPU features, cores, CUDA, ONNX Runtime providers and "
                                           "the precision that --precision auto picks")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=_info)
    return ()


if __name__ == "__main__":
    print(json.dumps(detect().to_dict(), indent=2))
    sys.exit(0)
