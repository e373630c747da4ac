"""`/classify` against the framework's ceiling: requests/s of the real service
(``serving.service:Classifier``, default model) and of a trivial BentoML service with the same
endpoint that only decodes the upload and answers a constant (``benchmarks/ceiling_service.py``),
at concurrency 32, with 1 and with 2 API workers. Issue #18's goal: real / ceiling >= 0.95.

The servers run one after the other, never at once (the order alternates between the worker
counts, so a drift of the machine's load does not always favour the same side), each driven by
``benchmarks.http.load`` with the same requests (one 64x64 PNG and the default model's 64 labels,
top_k 5) for the same time after the same warm-up. The workers come from BentoML's config,
``BENTOML_CONFIG_OPTIONS="services.<name>.workers=N"`` (what ``@bentoml.service(workers=N)``
sets; ``bentoml serve --api-workers`` only reaches pre-1.2 services), and the number of worker
processes each server actually ran is counted from /proc and reported.

    python -m benchmarks.ceiling [--quick] [--output benchmarks/results/ceiling.json]

``CAPT_BENCH_BUNDLE=/path/to/bundle`` serves that bundle instead of the default model's export.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from unittest import mock

import tools.launch
from benchmarks.ceiling_service import NAME as CEILING_NAME
from benchmarks.common import REPO_ROOT, bento_server, default_bundle, main, png_bytes, ratio, report, toy_images
from benchmarks.http import load

CONCURRENCY = 32
WORKER_COUNTS = (1, 2)
GOAL = 0.95
SERVICES = {  # side -> (import path for `bentoml serve`, the service's name in BentoML's config)
    "classify": (tools.launch.SERVICE, "capt"),
    "ceiling": ("benchmarks.ceiling_service:Ceiling", CEILING_NAME),
}
WORKER_MODULE = "_bentoml_impl.worker.service"  # what circus runs for each worker of a new-style service


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def worker_processes(parent: int) -> list[int]:
    """Pids of the BentoML service workers that ``parent`` (the `bentoml serve` process, circus's
    arbiter) runs: its children running the worker module (circus gives each a session of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != parent:  # after "(comm)": state ppid ...
                continue
            if WORKER_MODULE in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return 0.0


@contextlib.contextmanager
def serve(side: str, bundle: Path, workers: int):
    """``bento_server`` of ``side``'s service with ``workers`` API workers. tools.launch serves
    the real service; for the ceiling its SERVICE is swapped for the time of the start."""
    target, name = SERVICES[side]
    env = {"BENTOML_CONFIG_OPTIONS": f"services.{name}.workers={workers}"}
    with mock.patch.object(tools.launch, "SERVICE", target), bento_server(bundle, env) as server:
        yield server


def measure(side: str, bundle: Path, workers: int, images: list[bytes], labels: list[str], seconds: float,
            warmup: float) -> dict:
    started = time.perf_counter()
    with serve(side, bundle, workers) as server:
        startup = time.perf_counter() - started
        pids = worker_processes(server.process.pid)
        asyncio.run(load(server.url, images, labels, 8, warmup))  # fills the label cache, warms the workers
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        measured = asyncio.run(load(server.url, images, labels, CONCURRENCY, seconds))
        # CPU per wall second of each worker during the measured window: every worker served if all are > 0.
        worker_cpu = [round((cpu_seconds(pid) - cpu_before[pid]) / measured["seconds"], 2) for pid in pids]
        if len(worker_processes(server.process.pid)) != len(pids):
            measured["note"] = "the number of worker processes changed during the run (a worker restarted?)"
        log = str(server.log.relative_to(REPO_ROOT))
    return {**measured, "side": side, "workers": workers, "worker_processes": len(pids),
            "worker_cpu": worker_cpu,
            "startup_s": round(startup, 1), "log": log}


def run(quick: bool) -> dict:
    seconds, warmup = (4, 1) if quick else (20, 3)
    load_start = load_average()
    # CAPT_BENCH_BUNDLE: a bundle folder to serve instead of the default model's (cached) export.
    bundle = Path(os.environ["CAPT_BENCH_BUNDLE"]) if os.environ.get("CAPT_BENCH_BUNDLE") else default_bundle()
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    images = [png_bytes(image) for image in toy_images(16)]
    measured: dict[tuple[str, int], dict] = {}
    for index, workers in enumerate(WORKER_COUNTS):
        order = ("classify", "ceiling") if index % 2 == 0 else ("ceiling", "classify")
        for side in order:
            measured[side, workers] = measure(side, bundle, workers, images, labels, seconds, warmup)
    load_end = load_average()

    rows, summary, notes = [], {}, []
    for workers in WORKER_COUNTS:
        real, ceiling = measured["classify", workers], measured["ceiling", workers]
        for m in (real, ceiling):
            rows.append({"workers": workers, "service": "/classify (default model)" if m is real else
                         "ceiling (decode + constant)", "worker processes": m["worker_processes"],
                         "worker CPU": " / ".join(map(str, m["worker_cpu"])),
                         "req/s": round(m["images_per_s"], 1),
                         "server CPU ms/req": round(1000 * sum(m["worker_cpu"]) / m["images_per_s"], 2), "vs ceiling": ratio(m["images_per_s"], ceiling["images_per_s"]),
                         "p50 ms": round(m["p50_ms"], 1), "p99 ms": round(m["p99_ms"], 1), "requests": m["requests"],
                         "errors": m["errors"], "client CPU": m["client_cpu_fraction"], "start s": m["startup_s"]})
            if m["errors"]:
                notes.append(f"{m['side']}, {workers} worker(s): {m['errors']} failed requests (not counted), first: "
                             f"{m['first_error']} (server log: {m['log']})")
            if m["worker_processes"] != workers:
                notes.append(f"{m['side']} was asked for {workers} worker(s) but ran {m['worker_processes']} "
                             f"(server log: {m['log']})")
            if len(m["worker_cpu"]) > 1 and min(m["worker_cpu"]) < 0.05:
                notes.append(f"{m['side']}, {workers} workers: a worker served (almost) nothing (CPU {m['worker_cpu']}): "
                             "the client's keep-alive connections were all accepted by one worker, so this is "
                             "1 worker's figure (BentoML's workers share one listening socket; whichever wakes first accepts)")
            if m.get("note"):
                notes.append(f"{m['side']}, {workers} worker(s): {m['note']}")
        summary[f"/classify / ceiling, {workers} worker(s)"] = ratio(real["images_per_s"], ceiling["images_per_s"])
    summary["goal (issue #18)"] = f">= {GOAL} at concurrency {CONCURRENCY}"
    summary["load average at start (1/5/15 min)"] = "/".join(str(v) for v in load_start.values())
    summary["load average at end (1/5/15 min)"] = "/".join(str(v) for v in load_end.values())
    notes[:0] = [
        f"concurrency {CONCURRENCY}, {seconds} s per server after {warmup} s of warm-up at concurrency 8; one 64x64 PNG "
        f"and {len(labels)} labels per request, top_k 5; the servers ran one after the other, never together",
        "ceiling = benchmarks/ceiling_service.py: the same BentoML options, endpoint signature, middlewares and "
        "image decoder (serving.images.read_upload, same limits), then a constant answer: no model work",
        "'worker processes' = the `bentoml serve` process's worker children counted in /proc; 'worker CPU' = each "
        "one's CPU seconds per wall second during the measured window (all > 0: every worker served requests); 'server CPU ms/req' = their sum per request, which "
        "says what each request costs the server even when the load generator or other jobs cap the req/s",
        "only meaningful on an idle machine: the load generator runs here too ('client CPU' = its CPU seconds per "
        "wall second), and with the load average above the cores' count other jobs took part of the CPU",
    ]
    result = report("ceiling", "HTTP /classify vs the framework's ceiling (CPU)",
                    ["workers", "service", "worker processes", "worker CPU", "req/s", "server CPU ms/req", "vs ceiling", "p50 ms", "p99 ms", "requests",
                     "errors", "client CPU", "start s"], rows, summary, notes)
    result["bundle"] = str(bundle)
    result["load_average"] = {"start": load_start, "end": load_end}
    result["runs"] = [measured[key] for key in measured]
    return result


if __name__ == "__main__":
    raise SystemExit(main("ceiling", run, {}))
