"""`/classify` against the framework's ceiling: requests/s of the real service
(``serving.service:Classifier``, default model) and of a trivial BentoML service with the same
endpoint that only decodes the upload and answers a constant (``benchmarks/ceiling_service.py``),
at concurrency 32, with 1 and with 2 API workers. Issue #18's goal: real / ceiling >= 0.95.

The servers run one after the other, never at once, in rounds (3 in a full run; the order of the
two sides alternates from one round and worker count to the next, so that a drift of the machine's
load does not always favour the same side). Each is driven with the same requests (one 64x64 PNG
and the default model's 64 labels, top_k 5) for the same time after the same warm-up. The ratio is
the median over rounds of each round's real / ceiling, with its range. The workers come from
BentoML's config, ``BENTOML_CONFIG_OPTIONS="services.<name>.workers=N"`` (what
``@bentoml.service(workers=N)`` sets; ``bentoml serve --api-workers`` only reaches pre-1.2
services), and the number of worker processes each server actually ran is counted from /proc.

The load generator is ``wrk`` (``benchmarks/wrk.py``) where it is installed: the Python one
(``benchmarks.http.load``) takes most of a core and capped the ceiling. ``CAPT_BENCH_CLIENT=python``
forces the Python one, ``=wrk`` refuses to run without wrk.

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
from statistics import median
from unittest import mock

import tools.launch
from benchmarks.ceiling_service import NAME as CEILING_NAME
from benchmarks.common import REPO_ROOT, bento_server, default_bundle, main, png_bytes, ratio, report, toy_images
from benchmarks import http, wrk

CONCURRENCY = 32
WORKER_COUNTS = (1, 2)
GOAL = 0.95
ROUNDS = 3  # a full run's; a quick run has 1
CLIENT_ENV = "CAPT_BENCH_CLIENT"
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


def load_generator() -> str:
    """"wrk" where it is installed (or asked for), else "python"."""
    wanted = os.environ.get(CLIENT_ENV, "auto")
    if wanted not in ("auto", "wrk", "python"):
        raise SystemExit(f"{CLIENT_ENV} must be auto, wrk or python, not {wanted!r}")
    if wanted == "wrk" and not wrk.available():
        raise SystemExit(f"{CLIENT_ENV}=wrk but wrk is not installed (apt-get install wrk)")
    return "wrk" if wanted == "wrk" or (wanted == "auto" and wrk.available()) else "python"


def drive(client: str, url: str, images: list[bytes], labels: list[str], concurrency: int, seconds: float) -> dict:
    if client == "wrk":
        return wrk.load(url, images, labels, concurrency, seconds)
    return {**asyncio.run(http.load(url, images, labels, concurrency, seconds)), "client": "python (httpx, asyncio)"}


def measure(side: str, bundle: Path, workers: int, images: list[bytes], labels: list[str], seconds: float,
            warmup: float, client: str = "python") -> dict:
    started = time.perf_counter()
    with serve(side, bundle, workers) as server:
        startup = time.perf_counter() - started
        pids = worker_processes(server.process.pid)
        asyncio.run(http.load(server.url, images, labels, 8, warmup))  # fills the label cache, warms the workers
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        measured = drive(client, server.url, images, labels, CONCURRENCY, seconds)
        # CPU per wall second of each worker during the measured window: every worker served if all are > 0.
        worker_cpu = [round((cpu_seconds(pid) - cpu_before[pid]) / measured["seconds"], 2) for pid in pids]
        if len(worker_processes(server.process.pid)) != len(pids):
            measured["note"] = "the number of worker processes changed during the run (a worker restarted?)"
        log = str(server.log.relative_to(REPO_ROOT))
    return {**measured, "side": side, "workers": workers, "worker_processes": len(pids),
            "worker_cpu": worker_cpu,
            "startup_s": round(startup, 1), "log": log}


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{round(min(values), digits)}-{round(max(values), digits)}" if len(values) > 1 else ""


def run(quick: bool) -> dict:
    seconds, warmup, rounds = (4, 1, 1) if quick else (15, 3, ROUNDS)
    client = load_generator()
    load_start = load_average()
    # CAPT_BENCH_BUNDLE: a bundle folder to serve instead of the default model's (cached) export.
    bundle = Path(os.environ["CAPT_BENCH_BUNDLE"]) if os.environ.get("CAPT_BENCH_BUNDLE") else default_bundle()
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    images = [png_bytes(image) for image in toy_images(16)]
    measured: dict[tuple[str, int], list[dict]] = {(side, w): [] for side in SERVICES for w in WORKER_COUNTS}
    for round_index in range(rounds):
        for index, workers in enumerate(WORKER_COUNTS):
            order = ("classify", "ceiling") if (round_index + index) % 2 == 0 else ("ceiling", "classify")
            for side in order:
                measured[side, workers].append(
                    {**measure(side, bundle, workers, images, labels, seconds, warmup, client), "round": round_index + 1})
    load_end = load_average()
    result = summarise(measured, rounds, seconds, warmup, len(labels), client, load_start, load_end)
    result["bundle"] = str(bundle)
    return result


def all_workers_served(run: dict) -> bool:
    """Whether every worker process of the run took part (CPU > 0.05 of a core) in the measured window."""
    return len(run["worker_cpu"]) == run["workers"] and min(run["worker_cpu"]) >= 0.05


def summarise(measured: dict[tuple[str, int], list[dict]], rounds: int, seconds: float, warmup: float, n_labels: int,
              client: str, load_start: dict, load_end: dict) -> dict:
    """The report of ``measured[side, workers]`` (one run a round). A round's real / ceiling counts
    only where every worker of both servers served: with one worker idle it is a 1-worker figure."""
    rows, summary, notes = [], {}, []
    for workers in WORKER_COUNTS:
        real, ceiling = measured["classify", workers], measured["ceiling", workers]
        paired_rounds = [i for i, (r, c) in enumerate(zip(real, ceiling)) if all_workers_served(r) and all_workers_served(c)]
        paired = [(real[i], ceiling[i]) for i in paired_rounds]
        ratios = [r["images_per_s"] / c["images_per_s"] for r, c in paired] or [float("nan")]
        if len(paired) < len(real):
            notes.append(f"{workers} worker(s): {len(real) - len(paired)} of {len(real)} round(s) left out of "
                         "'vs ceiling' because a worker of one side served (almost) nothing")
        for runs in (real, ceiling):
            balanced = [m for m in runs if all_workers_served(m)]
            # The rounds the ratio counts, so that every column compares the same rounds; else this side's
            # rounds with every worker serving (rates of N workers, not of 1 of N), else all.
            counted = [runs[i] for i in paired_rounds] or balanced or runs
            rates = [m["images_per_s"] for m in counted]
            cpu_per_request = [1000 * sum(m["worker_cpu"]) / m["images_per_s"] for m in counted]
            rows.append({"workers": workers, "service": "/classify (default model)" if runs is real else
                         "ceiling (decode + constant)", "worker processes": "/".join(str(m["worker_processes"]) for m in runs),
                         "worker CPU": ", ".join(" / ".join(map(str, m["worker_cpu"])) for m in runs),
                         "req/s": round(median(rates), 1), "req/s range": _spread(rates),
                         "server CPU ms/req": round(median(cpu_per_request), 2),
                         "vs ceiling": (round(median(ratios), 3) if paired else "n/a") if runs is real else 1,
                         "vs ceiling range": _spread(ratios, 3) if runs is real else "",
                         "rounds counted": (len(counted) if paired_rounds or balanced
                                            else f"0 (all {len(runs)} shown: one worker served)"),
                         "p50 ms": round(median([m["p50_ms"] for m in counted]), 1),
                         "p99 ms": round(median([m["p99_ms"] for m in counted]), 1),
                         "requests": sum(m["requests"] for m in runs), "errors": sum(m["errors"] for m in runs),
                         "client CPU": round(median([m["client_cpu_fraction"] for m in counted]), 3),
                         "start s": round(median([m["startup_s"] for m in counted]), 1)})
            for m in runs:
                if m["errors"]:
                    notes.append(f"{m['side']}, {workers} worker(s), round {m['round']}: {m['errors']} failed requests "
                                 f"(not counted), first: {m['first_error']} (server log: {m['log']})")
                if m["worker_processes"] != workers:
                    notes.append(f"{m['side']} was asked for {workers} worker(s) but ran {m['worker_processes']} "
                                 f"(round {m['round']}, server log: {m['log']})")
                if len(m["worker_cpu"]) > 1 and min(m["worker_cpu"]) < 0.05:
                    notes.append(f"{m['side']}, {workers} workers, round {m['round']}: a worker served (almost) nothing "
                                 f"(CPU {m['worker_cpu']}): the client's keep-alive connections were all accepted by one "
                                 "worker, so this is 1 worker's figure (BentoML's workers share one listening socket; "
                                 "whichever wakes first accepts)")
                if m.get("note"):
                    notes.append(f"{m['side']}, {workers} worker(s), round {m['round']}: {m['note']}")
        summary[f"/classify / ceiling, {workers} worker(s)"] = (
            (f"{round(median(ratios), 3)}" + (f" (rounds: {', '.join(str(round(r, 3)) for r in ratios)})" if len(ratios) > 1 else ""))
            if paired else "not measured: in no round did every worker of both servers serve")
    summary["goal (issue #18)"] = f">= {GOAL} at concurrency {CONCURRENCY}"
    client_name = measured["classify", WORKER_COUNTS[0]][0]["client"]
    summary["load generator"] = client_name
    summary["load average at start (1/5/15 min)"] = "/".join(str(v) for v in load_start.values())
    summary["load average at end (1/5/15 min)"] = "/".join(str(v) for v in load_end.values())
    notes[:0] = [
        f"concurrency {CONCURRENCY}, {rounds} round(s) of {seconds} s per server after {warmup} s of warm-up at "
        f"concurrency 8; one 64x64 PNG and {n_labels} labels per request, top_k 5; the servers ran one after the "
        "other, never together; figures are medians over rounds, ranges are min-max over rounds, and 'vs ceiling' "
        "pairs each round's two sides; with 2 workers, only rounds where every worker of both servers served count ('rounds counted', the same "
        "rounds for both sides)",
        "ceiling = benchmarks/ceiling_service.py: the same BentoML options, endpoint signature, middlewares, patches and "
        "upload decoding (serving.images, same limits, the same loop/thread split), an async endpoint like "
        "Classifier.classify, then a constant answer: no model work",
        "'worker processes' = the `bentoml serve` process's worker children counted in /proc; 'worker CPU' = each "
        "one's CPU seconds per wall second during the measured window, per round (0.0: that worker served "
        "nothing); 'server CPU ms/req' = their sum per request",
        f"load generator: {client_name}, on this machine too ('client CPU' = its CPU seconds per wall second); "
        "only meaningful on an idle machine (with the load average above the cores' count other jobs took CPU)",
    ]
    if client == "python":
        why = f"{CLIENT_ENV}=python" if wrk.available() else "wrk is not installed (apt-get install wrk)"
        notes.insert(1, f"{why}: the Python load generator takes most of a core and caps the ceiling")
    result = report("ceiling", "HTTP /classify vs the framework's ceiling (CPU)",
                    ["workers", "service", "worker processes", "worker CPU", "rounds counted", "req/s", "req/s range", "server CPU ms/req",
                     "vs ceiling", "vs ceiling range", "p50 ms", "p99 ms", "requests", "errors", "client CPU", "start s"],
                    rows, summary, notes)
    result["load_average"] = {"start": load_start, "end": load_end}
    result["runs"] = [m for runs in measured.values() for m in runs]
    return result


if __name__ == "__main__":
    raise SystemExit(main("ceiling", run, {}))
