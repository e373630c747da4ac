"""Start-up time of the served engine choice (``serving.engine.choose_engine`` with auto) on ViT-B-32
with random weights, in two fresh processes sharing a fresh engine cache: the first start makes (or
fails to make) the derived graphs, the second finds them (or the recorded failure) in the cache.
Each start is ``benchmarks.engines``' own ``auto`` worker.

    python -m benchmarks.engine_startup        (prints one JSON line per start, then the cache's files)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import default_bundle, random_bundle, run_worker


def main() -> None:
    labels = json.loads((default_bundle() / "manifest.json").read_text())["labels"]
    bundle = random_bundle("ViT-B-32", labels)
    with tempfile.TemporaryDirectory(prefix="capt-engine-cache-") as cache:
        for start in ("first start", "second start"):
            result = run_worker("engines", "auto", {"bundle": str(bundle)}, env={"CAPT_ENGINE_CACHE": cache})
            int8 = next(row for row in result["report"]["candidates"] if row["name"] == "onnx-int8")
            print(start, json.dumps({"engine": result["engine"], "seconds": result["seconds"],
                                     "onnx-int8": int8.get("verdict", "")[:160]}))
        print("cache:", sorted(p.name for p in Path(cache).iterdir()))


if __name__ == "__main__":
    main()
