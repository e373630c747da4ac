"""Shared helpers of the benchmarks: worker subprocesses, a timing loop, the report (JSON + markdown),
a description of the machine, the default bundle (cached) and a `bentoml serve` subprocess.

Every comparison runs each side in its own process (``python -m benchmarks.<name> --worker <side>``):
ONNX Runtime and PyTorch each keep a pool of busy-waiting threads, so two runtimes in one process
slow each other down and the comparison measures the interference, not the runtimes. The parent
process orchestrates (and generates HTTP load); it never runs model code itself.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Sequence

from capt import default_model
from capt.hardware import parse_proc_stat
from export.fingerprint import export_fingerprint
from tools.launch import Server, bentoml_serve, png_bytes  # noqa: F401 - png_bytes: the scripts' upload encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
CACHE_DIR = BENCH_DIR / ".cache"  # exported graphs and bundles, reused between runs (gitignored)
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PROMPTS, DEFAULT_WEIGHTS = default_model.PROMPTS, default_model.BASE_WEIGHTS


# ---- worker subprocesses ------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A worker subprocess failed; the message holds the tail of its output."""


def _child_env(extra: dict | None = None) -> dict:
    # A hub lookup would hang ~46 s before failing on an offline machine.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_worker(module: str, side: str, config: dict | None = None, timeout: float = 1800,
               env: dict | None = None) -> dict:
    """Run ``side`` of ``benchmarks.<module>`` in a fresh Python process and return its JSON result.
    The result comes back through a file, so whatever the libraries print cannot corrupt it."""
    with tempfile.TemporaryDirectory(prefix="capt-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", "--worker", side,
                   "--config", json.dumps(config or {}), "--result", str(result_path)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, env=_child_env(env), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise WorkerError(f"{module} worker '{side}' ran past {timeout} s") from err
        if done.returncode != 0 or not result_path.is_file():
            raise WorkerError(f"{module} worker '{side}' exited with {done.returncode}:\n{done.stdout[-3000:]}")
        result = json.loads(result_path.read_text())
    result.setdefault("worker_seconds", round(time.perf_counter() - started, 2))
    return result


def error_text(err: BaseException, limit: int = 300) -> str:
    """A one-line reason for a report ("failed: ...")."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[-1] if isinstance(err, WorkerError) and text else " ".join(text))[:limit]


# ---- timing ---------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, max_seconds: float | None = None) -> dict:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls. Stops early after ``max_seconds``
    (with at least 3 timed calls) so slow configurations do not dominate a run. The median, not the
    mean: a 2-core machine has noisy neighbours (the OS, the load generator)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - started > max_seconds and len(times) >= 3:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "calls": len(times)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


# ---- machine --------------------------------------------------------------------------------------
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy (steal included) over ``seconds`` while this process sleeps: other
    jobs' load. A 2-core machine with one core taken makes 2-thread PyTorch up to 10x slower."""
    def sample() -> tuple[int, int, int] | None:
        return parse_proc_stat(Path("/proc/stat").read_text())
    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return None
    if before is None or after is None:
        return None
    return round((after[0] - before[0]) / max(1, after[2] - before[2]), 3)


def hardware() -> dict:
    """capt.hardware's description of this machine (the one home of CPU features, cores, CUDA and the
    precision auto picks), from a subprocess so that the parent never imports torch."""
    try:
        done = subprocess.run([sys.executable, "-m", "capt.hardware"], cwd=REPO_ROOT, env=_child_env(),
                              capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as err:
        return {"error": error_text(err)}


def machine() -> dict:
    """What the numbers were measured on (read without importing torch in the parent)."""
    memory_gb = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    described = hardware()
    gpu = ", ".join(f"{d['name']} (capability {'.'.join(map(str, d['capability']))})"
                    for d in described.get("cuda") or []) or None
    features = [name for name, on in (described.get("features") or {}).items() if on]
    return {
        "cpu": described.get("cpu_model") or platform.processor() or platform.machine(),
        "cpu_vendor": described.get("cpu_vendor"),
        "cpu_signature": described.get("cpu_signature"),  # tells apart VMs that share one model name
        "l3_cache_mib": described.get("l3_cache_mib"),
        "cpu_features": ", ".join(features) if features else None,
        "torch_cpu_capability": described.get("torch_cpu_capability"),
        "precision_auto": described.get("recommended_precision"),  # untimed work
        "precision_auto_timed": described.get("offered_precision"),  # what training, pretraining, the probe time
        "logical_cores": described.get("logical_cores", os.cpu_count()),
        "usable_cores": described.get("usable_cores", os.cpu_count()),
        # Anything else running skews every figure here: the 1-minute load average when the report was made.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "memory_gb": memory_gb,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "onnx": _version("onnx"),
        "bentoml": _version("bentoml"),
        "numpy": _version("numpy"),
        "hardware": described,
    }


# ---- report ---------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, columns: Sequence[str], rows: Sequence[dict], summary: dict | None = None,
           notes: Sequence[str] = ()) -> dict:
    """The result of one benchmark: table rows (the markdown columns name row keys), headline
    figures in ``summary`` and free-text notes. ``run`` functions return this."""
    return {"benchmark": name, "title": title, "columns": list(columns), "rows": list(rows),
            "summary": summary or {}, "notes": list(notes)}


def to_markdown(result: dict) -> str:
    parts = [f"### {result.get('title', result['benchmark'])}"]
    if result.get("skipped"):
        parts.append(f"Skipped: {result['skipped']}")
    elif result.get("error"):
        parts.append(f"Failed: {result['error']}")
    if result.get("rows"):
        parts.append(markdown_table(result["rows"], result["columns"]))
    if result.get("summary"):
        parts.append("\n".join(f"- **{key}**: {_cell(value)}" for key, value in result["summary"].items()))
    if result.get("notes"):
        parts.append("\n".join(f"- {note}" for note in result["notes"]))
    seconds = result.get("seconds")
    parts.append(f"_{'quick' if result.get('quick') else 'full'} run, {seconds} s_" if seconds is not None else "")
    return "\n\n".join(p for p in parts if p) + "\n"


def machine_markdown(info: dict) -> str:
    # The full capt.hardware description stays in the JSON; its summary keys are listed here.
    return "\n".join(f"- {key}: {value}" for key, value in info.items() if value is not None and key != "hardware")


def main(name: str, run: Callable[[bool], dict], workers: dict[str, Callable[[dict], dict]],
         argv: Sequence[str] | None = None) -> int:
    """Command line of a benchmark script: ``--quick`` / ``--output`` for people, ``--worker`` for
    the parent's subprocesses. JSON goes to stdout, the markdown table to stderr (so
    ``> result.json`` captures clean JSON); ``--output x.json`` also writes ``x.md``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and smaller sizes (a smoke run)")
    parser.add_argument("--output", type=Path, help="also write the JSON here (and the markdown next to it, .md)")
    parser.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = workers[args.worker](json.loads(args.config))
        args.result.write_text(json.dumps(result))
        return 0
    result = run_benchmark(name, run, args.quick)
    result["machine"] = machine()
    text = json.dumps(result, indent=2)
    print(text)
    markdown = to_markdown(result)
    print("\n" + markdown, file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        args.output.with_suffix(".md").write_text(f"{markdown}\nMachine:\n\n{machine_markdown(result['machine'])}\n")
    return 0 if not result.get("error") else 1


def run_benchmark(name: str, run: Callable[[bool], dict], quick: bool) -> dict:
    """Run one benchmark, timing it; a failure becomes a result with ``error`` rather than a crash,
    so `run_all` keeps the other benchmarks' figures."""
    busy_before = cpu_busy_fraction()
    started = time.perf_counter()
    try:
        result = run(quick)
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        result = {"benchmark": name, "title": name, "columns": [], "rows": [], "error": error_text(err, 2000)}
    result["quick"] = quick
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["cpu_busy_before"] = busy_before
    if busy_before is not None and busy_before > 0.1 and result.get("rows"):
        result.setdefault("notes", []).append(
            f"other processes kept {busy_before:.0%} of the CPU busy just before this run: the figures are not "
            "reliable (rerun on an idle machine)")
    return result


# ---- default model bundle -----------------------------------------------------------------------
def files_digest(*paths: Path | str, extra: str = "") -> str:
    """A short key of files' contents (and ``extra``) for cache folder names."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def default_bundle(precision: str = "fp32") -> Path:
    """The default model (models/capt-toy) exported as `make serve` exports it, cached under
    benchmarks/.cache keyed by the prompts, the weights, the exporter's sources and the library
    versions (``export.fingerprint``). Exported in a subprocess (~20 s) so that the parent never loads torch."""
    key = export_fingerprint(DEFAULT_PROMPTS / "prompts.safetensors", DEFAULT_PROMPTS / "prompt_config.json",
                             DEFAULT_WEIGHTS, extra=precision)[:12]
    bundle = CACHE_DIR / f"default-bundle-{precision}-{key}"
    code = ("import sys; from export import export_bundle; "
            "export_bundle(sys.argv[1], sys.argv[2], pretrained=sys.argv[3], sample_data=sys.argv[5], "
            "precision=sys.argv[4])")
    return _export_once(bundle, code, [str(DEFAULT_PROMPTS), str(bundle), str(DEFAULT_WEIGHTS), precision, default_model.SAMPLE_DATA])


def random_bundle(model: str, labels: Sequence[str]) -> Path:
    """A bundle of ``model`` with random CLIP weights and the prompts of benchmarks/encoder.py, for
    speed figures of a model whose compute, not per-request overhead, dominates. Cached like
    ``default_bundle``; exported in a subprocess (a few minutes for ViT-B-32)."""
    key = export_fingerprint(REPO_ROOT / "benchmarks" / "encoder.py", extra=model + "\n".join(labels))[:12]
    bundle = CACHE_DIR / f"random-bundle-{model}-{key}"
    code = ("import json, sys, tempfile\n"
            "from benchmarks.encoder import build_model\n"
            "from capt.checkpoint import save_checkpoint\n"
            "from export import export_bundle\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    checkpoint = save_checkpoint(tmp, 1, build_model(sys.argv[1]), {'method': 'random', 'classnames': json.loads(sys.argv[3])})\n"
            "    export_bundle(checkpoint, sys.argv[2], sample_count=8)\n")
    return _export_once(bundle, code, [model, str(bundle), json.dumps(list(labels))])


def _export_once(bundle: Path, code: str, args: list[str]) -> Path:
    """``bundle``, exported by running ``code`` with ``args`` in a subprocess (so that the parent
    never loads torch) unless it is already there: export_bundle renames the folder into place only
    when complete, so a manifest means a finished bundle."""
    if (bundle / "manifest.json").is_file():
        return bundle
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=_child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise WorkerError(f"exporting {bundle.name} failed:\n{done.stdout[-3000:]}")
    return bundle


# ---- the HTTP server -------------------------------------------------------------------------------
@contextlib.contextmanager
def bento_server(bundle: Path, env: dict | None = None, ready_timeout: float = 180) -> Iterator[Server]:
    """``tools.launch.bentoml_serve`` of ``bundle`` with its log under benchmarks/.cache/logs (the
    newest 20 kept) and BentoML's home in the cache, not ~/bentoml: the bundle is given as a folder."""
    logs = CACHE_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in sorted(logs.glob("serve-*.log"), key=lambda p: p.stat().st_mtime)[:-19]:
        old.unlink(missing_ok=True)
    log = logs / f"serve-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    with bentoml_serve(bundle, log, {**_child_env(), "BENTOML_HOME": str(CACHE_DIR / "bentoml"), **(env or {})},
                       ready_within=ready_timeout) as server:
        yield server


def classify_form(images: Sequence[bytes], labels: Sequence[str], top_k: int = 5) -> dict:
    """httpx keyword arguments of a multipart ``/classify`` request."""
    return {"files": [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
            "data": {"labels": json.dumps(list(labels)), "top_k": str(top_k)}}


def toy_images(count: int, seed: int = 0) -> list:
    """Toy-world test images (PIL) of the default model's world."""
    from capt.data.toyworld import ToyWorldTask
    task = ToyWorldTask("pairs", "test")
    return [task[i % len(task)][0] for i in range(seed, seed + count)]
