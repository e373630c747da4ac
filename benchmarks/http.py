"""End to end over HTTP: `/classify` throughput and latency of a real `bentoml serve` process at
concurrency 1, 8 and 32, against the raw throughput of the same bundle's ONNX image encoder (batch
32, in its own process). Issue #7's goal: HTTP images/s >= 0.8 x raw at concurrency 32. Measured on
the default model and (full runs) on ViT-B-32 with random weights, where compute, not the cost of
each request, dominates.

Each request carries one 64x64 PNG and the default model's 64 class names (cached by the server
after the first request), as a client classifying a stream of single images would. The load
generator (asyncio + httpx) runs in this process on the same machine: on 2 cores it competes with
the server, and its CPU time is reported next to the figures.

    python -m benchmarks.http [--quick] [--output benchmarks/results/http.json]
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, bento_server, classify_form, default_bundle, main, percentile, png_bytes, \
    random_bundle, ratio, report, run_worker, time_calls, toy_images

CONCURRENCY = (1, 8, 32)
RAW_BATCH = 32
LARGE_MODEL = "ViT-B-32"


def worker_raw(config: dict) -> dict:
    """Images/s of the bundle's image graph alone: pixels in, embeddings out (no decoding, no HTTP)."""
    import numpy as np

    from export.bundle import onnx_session
    session = onnx_session(Path(config["bundle"]) / "image_encoder.onnx", ["CPUExecutionProvider"], spinning=True)
    size = json.loads((Path(config["bundle"]) / "manifest.json").read_text())["inputs"]["image"]["shape"][-1]
    pixels = np.random.default_rng(0).random((config["batch"], 3, size, size), dtype=np.float32)
    timing = time_calls(lambda: session.run(None, {"pixels": pixels}), warmup=3, repeats=config["repeats"],
                        max_seconds=config["max_seconds"])
    return {"batch": config["batch"], "images_per_s": config["batch"] / timing["median_s"], **timing}


WORKERS = {"raw": worker_raw}


async def load(url: str, images: list[bytes], labels: list[str], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending its next request as soon as the previous one answers,
    for ``seconds``; latencies of the requests that completed within the window."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def user(index: int) -> None:
            n = index
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    response = await client.post(f"{url}/classify", **classify_form([images[n % len(images)]], labels))
                except httpx.HTTPError as err:  # a dropped connection is a failed request, not the end of the run
                    errors.append(f"connection: {type(err).__name__}: {err}"[:200])
                    n += concurrency
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                n += concurrency
        cpu_before = time.process_time()
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_before
    if not latencies:
        raise RuntimeError(f"no request succeeded at concurrency {concurrency}: {errors[:3]}")
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(elapsed, 2), "images_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "client_cpu_fraction": round(client_cpu / elapsed, 3)}


def measure(bundle: Path, quick: bool) -> tuple[dict, list[dict], Path]:
    """Raw ONNX throughput of ``bundle``'s image graph, then HTTP at each concurrency."""
    seconds = 5 if quick else 20
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    raw = run_worker("http", "raw", {"bundle": str(bundle), "batch": RAW_BATCH, "repeats": 10 if quick else 50,
                                     "max_seconds": 3 if quick else 15})
    images = [png_bytes(image) for image in toy_images(16)]
    measured = []
    with bento_server(bundle) as server:
        url, log = server.url, server.log.relative_to(REPO_ROOT)
        asyncio.run(load(url, images, labels, 8, 2))  # warm-up: fills the label cache
        for concurrency in CONCURRENCY:
            measured.append(asyncio.run(load(url, images, labels, concurrency, seconds)))
    return raw, measured, log


def run(quick: bool) -> dict:
    seconds = 5 if quick else 20
    default = default_bundle()
    labels = json.loads((default / "manifest.json").read_text())["labels"]
    # The default model is tiny (about 1 ms an image): per-request overhead dominates it. ViT-B-32
    # (random weights, full runs only) shows what batching earns when compute dominates.
    models = {"default (capt-toy-vit)": default}
    if not quick:
        models[f"{LARGE_MODEL} (random weights)"] = random_bundle(LARGE_MODEL, labels)
    rows, summary, notes, raws = [], {}, [], {}
    for name, bundle in models.items():
        raw, measured, log = measure(bundle, quick)
        raws[name] = {"onnx": raw, "loads": measured}
        summary[f"{name}: raw ONNX img/s (batch {RAW_BATCH})"] = round(raw["images_per_s"], 1)
        for m in measured:
            rows.append({"model": name, "concurrency": m["concurrency"], "img/s": round(m["images_per_s"], 1),
                         "vs raw ONNX": ratio(m["images_per_s"], raw["images_per_s"]), "p50 ms": round(m["p50_ms"], 1),
                         "p99 ms": round(m["p99_ms"], 1), "requests": m["requests"], "errors": m["errors"],
                         "client CPU": m["client_cpu_fraction"]})
            if m["errors"]:
                notes.append(f"{name}, concurrency {m['concurrency']}: {m['errors']} failed requests (not counted in "
                             f"img/s), first: {m['first_error']} (server log: {log})")
        summary[f"{name}: HTTP / raw at concurrency 32"] = rows[-1]["vs raw ONNX"]
    summary["goal (issue #7)"] = ">= 0.8 at concurrency 32"
    notes[:0] = [f"one 64x64 PNG per request, {len(labels)} labels (cached after the warm-up), top_k 5; {seconds} s per "
                 "concurrency level after 2 s of warm-up; latency percentiles are nearest-rank",
                 "'client CPU' = CPU seconds of the load generator (this process) per wall second: on a 2-core machine "
                 "that much CPU is taken from the server",
                 "raw ONNX = the bundle's image_encoder.onnx on pre-made pixels in a separate process: no PNG decoding, "
                 "resizing, text side or HTTP, and with ONNX Runtime's spinning threads (its fastest setting; the server turns spinning off)"]
    result = report("http", "HTTP /classify vs raw ONNX (CPU)", ["model", "concurrency", "img/s", "vs raw ONNX",
                    "p50 ms", "p99 ms", "requests", "errors", "client CPU"], rows, summary, notes)
    result["raw"] = raws
    return result


if __name__ == "__main__":
    raise SystemExit(main("http", run, WORKERS))
