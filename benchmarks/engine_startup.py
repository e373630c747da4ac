"""Start-up time of the served engine choice (the ONNX Runtime threads and the engine, auto, as the
server makes it) on ViT-B-32 with random weights, in three fresh processes sharing a fresh engine
cache: the first start makes (or fails to make) the derived graphs and measures every path; the second
recalls what the first measured and rechecks the kept engine's safety; the third measures again
(``CAPT_ENGINE_RETUNE=1``) with the derived graphs already made. Each start is ``benchmarks.engines``'
own ``auto`` worker, remembering as the server does.

    python -m benchmarks.engine_startup        (prints one JSON line per start, then the cache's files)

A start measured while other processes used a quarter of the CPUs is served but not kept, and the next
start then measures again rather than recalling: each line's ``cpu_contention`` and ``not_kept`` say so.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import default_bundle, random_bundle, run_worker
from serving.engine import RETUNE_ENV


def main() -> None:
    labels = json.loads((default_bundle() / "manifest.json").read_text())["labels"]
    bundle = random_bundle("ViT-B-32", labels)
    with tempfile.TemporaryDirectory(prefix="capt-engine-cache-") as cache:
        for start, retune in (("first start", "0"), ("second start (recalled)", "0"), ("third start (retuned)", "1")):
            result = run_worker("engines", "auto", {"bundle": str(bundle), "remember": True},
                                env={"CAPT_ENGINE_CACHE": cache, RETUNE_ENV: retune})
            int8 = next(row for row in result["report"]["candidates"] if row["name"] == "onnx-int8")
            report = result["report"]
            # Where the engine's time went: a measuring start's phases and each candidate's load and
            # self-test, or a recalling start's recheck.
            phases = ({key: value for key, value in report["recalled"]["recheck"].items() if key.endswith("seconds")}
                      if "recalled" in report else
                      {**report.get("phases_seconds", {}),
                       **{row["name"]: {"load": row.get("load_seconds"), "test": row.get("test_seconds")}
                          for row in report["candidates"] if row.get("loaded")}})
            print(start, json.dumps({"engine": result["engine"], "seconds": result["seconds"],
                                     "threads_seconds": result["ort_threads_report"]["seconds"],
                                     "engine_seconds": report["seconds"], "engine_phases_seconds": phases,
                                     "recalled": "recalled" in report,
                                     # a measurement beside other load is served but not kept (not recalled);
                                     # a recalled start carries the contention of the start that measured
                                     "cpu_contention_when_measured": (report.get("cpu_contention") or {}).get("summary"),
                                     "not_kept": report.get("not_kept"),
                                     "onnx-int8": int8.get("verdict", "")[:160]}))
        print("cache:", sorted(p.name for p in Path(cache).iterdir()))


if __name__ == "__main__":
    main()
