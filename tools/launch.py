"""A real ``bentoml serve`` of a bundle on a free loopback port, for the tests, the benchmarks and
scripts: started in its own process group, stopped (group and all) on exit."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:Classifier"


class ServerNotReady(RuntimeError):
    """``bentoml serve`` exited or did not answer ``/readyz`` in time; the message ends with its log."""


class Server(NamedTuple):
    url: str
    log: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image, format: str = "PNG", **options) -> bytes:
    """A PIL image encoded as a client would upload it (``format`` and PIL save options)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _ready(url: str) -> bool:
    import httpx
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    return False


def bentoml_command() -> list[str]:
    """This interpreter's ``bentoml``: the console script beside it (a venv), or ``python -m bentoml`` where
    bentoml was installed without one (``pip install --target``, as on a lent GPU machine)."""
    script = Path(sys.executable).with_name("bentoml")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bentoml"]


@contextlib.contextmanager
def bentoml_serve(bundle: str | Path, log: Path, env: dict | None = None, ready_within: float = 180,
                  check: bool = True) -> Iterator[Server]:
    """Serve ``bundle`` (``CAPT_BUNDLE``) with ``env`` added to this process's environment (e.g.
    ``CAPT_MAX_PROBE_SECONDS``), writing its output to ``log``. Yields once ``/readyz`` answers 200.
    Each server gets a BentoML home of its own unless ``env`` names one: two servers sharing a home
    share its Prometheus folder, and a starting server wipes the metrics of a running one.
    With ``check`` (the default) a server that exits or is not ready within ``ready_within`` seconds
    raises ServerNotReady; without it, the Server is yielded anyway for the caller to inspect."""
    port = free_port()
    own_home = None if "BENTOML_HOME" in (env or {}) else tempfile.mkdtemp(prefix="capt-serve-home-")
    env = {**os.environ, "CAPT_BUNDLE": str(bundle), "HF_HUB_OFFLINE": "1",
           **({"BENTOML_HOME": own_home} if own_home else {}),
           **{key: str(value) for key, value in (env or {}).items()}}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen([*bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                if check:
                    state = (f"exited with {process.returncode}" if process.poll() is not None
                             else f"not ready after {ready_within} s")
                    raise ServerNotReady(f"bentoml serve {state}:\n{log.read_text()[-3000:]}")
                break
            time.sleep(0.5)
        yield Server(url, log, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if own_home:
            shutil.rmtree(own_home, ignore_errors=True)
