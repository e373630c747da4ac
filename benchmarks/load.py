"""Load and back-pressure (issue #6): mixed `/classify` and `/probe` traffic against a real
`bentoml serve` at concurrency 32 for 60 s. Reports requests, answers by status, p50/p99 latency per
endpoint and the server's memory (RSS of all its processes) before and after.

Goals: no 5xx at all; memory growth under 10%. A 429 is the server refusing a probe because
``CAPT_MAX_CONCURRENT_PROBES`` are already running: back-pressure working, counted apart from errors.

Each virtual client sends, one after another, classify requests (1-4 toy images, one of several
label sets, so the label cache both hits and misses) and, one time in ten, a PGD-10 probe.

    python -m benchmarks.load [--quick] [--output benchmarks/results/load.json]
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter

from benchmarks.common import bento_server, classify_form, default_bundle, main, percentile, png_bytes, report, \
    toy_images

CONCURRENCY = 32
PROBE_SHARE = 0.1
LABEL_SETS = [
    ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"],
    ["circle", "square", "triangle", "star", "heart", "cross"],
    ["a red star", "a blue circle", "a green square", "a yellow triangle"],
    [f"a shape of kind {i}" for i in range(40)],
]


def server_rss_mb(url: str) -> float:
    """Resident memory of the `bentoml serve` process listening on ``url``'s port and all its children."""
    import psutil

    port = url.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serving.service:Classifier" in cmdline and port in cmdline:
            tree = [process, *process.children(recursive=True)]
            return round(sum(p.memory_info().rss for p in tree if p.is_running()) / 2 ** 20, 1)
    raise RuntimeError(f"no bentoml serve process on port {port}")


@contextlib.contextmanager
def rss_sampler(url: str, every: float):
    """Samples the server's RSS every ``every`` seconds, in a thread, while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            samples.append(server_rss_mb(url))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


async def mixed_load(url: str, images: list[bytes], concurrency: int, seconds: float, seed: int = 0) -> dict:
    import httpx

    latencies: dict[str, list[float]] = {"classify": [], "probe": []}
    statuses: dict[str, Counter] = {"classify": Counter(), "probe": Counter()}
    failures: Counter = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=180) as client:
        deadline = time.perf_counter() + seconds

        async def user(index: int) -> None:
            rng = random.Random(seed + index)
            while time.perf_counter() < deadline:
                if rng.random() < PROBE_SHARE:
                    kind = "probe"
                    request = {"files": [("image", ("x.png", rng.choice(images), "image/png"))],
                               "data": {"labels": json.dumps(LABEL_SETS[0]), "eps": str(4 / 255), "steps": "10"}}
                else:
                    kind = "classify"
                    request = classify_form(rng.sample(images, rng.randint(1, 4)), rng.choice(LABEL_SETS))
                t0 = time.perf_counter()
                try:
                    response = await client.post(f"{url}/{kind}", **request)
                except httpx.HTTPError as err:  # a dropped connection is a failure too, not a crash of the script
                    failures[type(err).__name__] += 1
                    continue
                statuses[kind][response.status_code] += 1
                if response.status_code == 200:
                    latencies[kind].append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    rows = []
    for kind in ("classify", "probe"):
        done = latencies[kind]
        rows.append({"endpoint": kind, "requests": sum(statuses[kind].values()), "ok": statuses[kind][200],
                     "429": statuses[kind][429],
                     "4xx other": sum(n for s, n in statuses[kind].items() if 400 <= s < 500 and s != 429),
                     "5xx": sum(n for s, n in statuses[kind].items() if s >= 500),
                     "ok per s": round(len(done) / elapsed, 2),
                     "p50 ms": round(1000 * percentile(done, 50), 1) if done else None,
                     "p99 ms": round(1000 * percentile(done, 99), 1) if done else None})
    return {"rows": rows, "elapsed_s": round(elapsed, 1), "connection_failures": dict(failures),
            "statuses": {k: dict(v) for k, v in statuses.items()}}


def run(quick: bool) -> dict:
    seconds = 10 if quick else 60
    bundle = default_bundle()
    images = [png_bytes(image) for image in toy_images(16)]
    with bento_server(bundle) as server:
        url = server.url
        asyncio.run(mixed_load(url, images, 4, 3, seed=99))  # warm-up: first-use costs are not growth
        rss_before = server_rss_mb(url)
        with rss_sampler(url, every=seconds / 6) as samples:
            result = asyncio.run(mixed_load(url, images, CONCURRENCY, seconds))
        rss_after = server_rss_mb(url)
    server_errors = sum(row["5xx"] for row in result["rows"]) + sum(result["connection_failures"].values())
    growth = (rss_after - rss_before) / rss_before
    summary = {"concurrency": CONCURRENCY, "seconds": result["elapsed_s"],
               "requests": sum(row["requests"] for row in result["rows"]),
               "5xx or dropped": server_errors,
               "server RSS before (MB)": rss_before, "server RSS after (MB)": rss_after,
               "memory growth": f"{growth:+.1%}",
               # A leak keeps climbing; allocator arenas and caches filling up level off.
               f"server RSS every {seconds / 6:g} s (MB)": ", ".join(f"{mb:,.0f}" for mb in samples),
               "goal met": server_errors == 0 and growth < 0.10}
    return report("load", f"Mixed load: classify + {PROBE_SHARE:.0%} probes at concurrency {CONCURRENCY}",
                  ["endpoint", "requests", "ok", "429", "4xx other", "5xx", "ok per s", "p50 ms", "p99 ms"],
                  result["rows"], summary,
                  notes=["429 = probe refused because CAPT_MAX_CONCURRENT_PROBES probes were running (back-pressure).",
                         "The load generator shares the machine's cores with the server."])


if __name__ == "__main__":
    raise SystemExit(main("load", run, {}))
