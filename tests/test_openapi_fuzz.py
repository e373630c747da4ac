"""Schemathesis against the running service's own OpenAPI schema (`/docs.json`): requests generated
from the schema, valid and invalid, never get a 5xx. Complements tests/test_fuzz.py, which fuzzes
the request fields with hypothesis directly."""
import re
import subprocess
import sys
from pathlib import Path

from tools.launch import bentoml_serve

# Probes are capped at a few steps with a generous time limit, so that the only 5xx the service
# gives by design (503: a probe past CAPT_MAX_PROBE_SECONDS) cannot be generated.
FUZZ_LIMITS = {"CAPT_MAX_PROBE_STEPS": 2, "CAPT_MAX_PROBE_RESTARTS": 1, "CAPT_MAX_PROBE_SECONDS": 300,
               "CAPT_MAX_UPLOAD_BYTES": 2_000_000, "CAPT_MAX_REQUEST_BYTES": 8_000_000}


def test_schemathesis_finds_no_server_error(default_bundle, tmp_path):
    schemathesis = Path(sys.executable).with_name("st")
    with bentoml_serve(default_bundle, tmp_path / "serve.log", FUZZ_LIMITS) as server:
        run = subprocess.run(
            [str(schemathesis), "run", f"{server.url}/docs.json", "--checks", "not_a_server_error",
             "--max-examples", "50", "--seed", "0", "--workers", "1", "--phases", "examples,coverage,fuzzing",
             "--request-timeout", "120", "--no-shrink", "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found failures:\n{output[-6000:]}\nserver log:\n{server.log.read_text()[-3000:]}"
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and int(cases.group(2)) == int(cases.group(1)) >= 200, output[-2000:]  # the cases really ran
