"""Start-up time of the served engine choice (``serving.engine.choose_engine`` with auto) on ViT-B-32
with random weights, in two fresh processes sharing a fresh engine cache: the first start makes (or
fails to make) the derived graphs, the second finds them (or the recorded failure) in the cache.

    python -m benchmarks.engine_startup        (prints one JSON line per start, then the cache's files)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO_ROOT, default_bundle, random_bundle

CHILD = """
import json, sys, time
from capt.hardware import detect
from export.bundle import load_bundle
from serving.engine import choose_engine
bundle = load_bundle(sys.argv[1], ["CPUExecutionProvider"], check=False)
started = time.perf_counter()
engine, report = choose_engine(bundle, detect(), "auto")
int8 = next(r for r in report["candidates"] if r["name"] == "onnx-int8")
print(json.dumps({"engine": engine.name, "seconds": round(time.perf_counter() - started, 2),
                  "onnx-int8": int8.get("verdict", "")[:160]}))
"""


def main() -> None:
    labels = json.loads((default_bundle() / "manifest.json").read_text())["labels"]
    bundle = random_bundle("ViT-B-32", labels)
    with tempfile.TemporaryDirectory(prefix="capt-engine-cache-") as cache:
        env = {**os.environ, "CAPT_ENGINE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        for start in ("first start", "second start"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, check=True)
            print(start, done.stdout.strip().splitlines()[-1])
        print("cache:", sorted(p.name for p in Path(cache).iterdir()))


if __name__ == "__main__":
    main()
