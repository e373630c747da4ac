"""Two API workers of a real `bentoml serve` starting together on a fresh engine cache: they take
turns (serving/engine.py's flock), so the first measures the engine choice and the ONNX Runtime
threads and the second recalls what the first kept, and both serve the same engine."""
import re
import time

import httpx

from conftest import TEST_LIMITS, bentoml_serve


def _engine_lines(log):
    return re.findall(r"image encoder: (\S+) \((.*)\)$", log.read_text(), flags=re.MULTILINE)


def test_two_workers_measure_once_and_the_second_recalls(default_bundle, tmp_path):
    cache = tmp_path / "engines"
    env = {**TEST_LIMITS, "CAPT_ENGINE_CACHE": cache, "CAPT_ENGINE": "auto", "CAPT_ENGINE_RETUNE": "0",
           "CAPT_ORT_THREADS": "0", "BENTOML_CONFIG_OPTIONS": "services.capt.workers=2"}
    with bentoml_serve(default_bundle, tmp_path / "serve.log", env) as server:
        deadline = time.monotonic() + 120  # /readyz answers once one worker is up; wait for the other
        while len(_engine_lines(server.log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        lines = _engine_lines(server.log)
        assert len(lines) == 2, server.log.read_text()[-3000:]
        assert lines[0][0] == lines[1][0], lines
        # One measured, one recalled (in either order in the log: each logs after the lock is released).
        assert sorted("measured by an earlier start" in reason for _, reason in lines) == [False, True], lines
        engines = {httpx.post(f"{server.url}/info", json={}).json()["image_engine"]["engine"] for _ in range(8)}
        assert engines == {lines[0][0]}
