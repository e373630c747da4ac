"""Two API workers of a real `bentoml serve`: starting together on a fresh engine cache they take
turns (serving/engine.py's flock), so the first measures the engine choice and the ONNX Runtime
threads and the second recalls what the first kept, and both serve the same engine; and connections
opened at once are spread over both (serving/sockets.py)."""
import re
import socket
import sys
import time

import httpx
import pytest

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


def _workers(server):
    import psutil
    return [p for p in psutil.Process(server.process.pid).children(recursive=True)
            if any("_bentoml_impl.worker.service" in arg for arg in p.cmdline())]


def _listening_sockets(worker, port) -> set[int]:
    """The inodes of ``worker``'s listening sockets on ``port``: one shared socket has one inode."""
    import os

    import psutil
    return {os.stat(f"/proc/{worker.pid}/fd/{c.fd}").st_ino for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances connections on Linux only")
def test_connections_opened_at_once_are_spread_over_both_workers(default_bundle, tmp_path):
    """With BentoML's one shared socket, 32 connections opened at once all went to one worker (32 / 0,
    measured); with a listening socket of each worker's own beside it (serving/sockets.py), the kernel
    spreads them (a third land on the shared socket, which both workers drain)."""
    import psutil
    env = {**TEST_LIMITS, "BENTOML_CONFIG_OPTIONS": "services.capt.workers=2"}
    with bentoml_serve(default_bundle, tmp_path / "serve.log", env) as server:
        port = int(server.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 120
        while (len(_engine_lines(server.log)) < 2 or len(_workers(server)) < 2) and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = _workers(server)
        assert len(workers) == 2, server.log.read_text()[-3000:]
        # A worker listens on its own socket once its app has started, a moment after its engine line.
        while time.monotonic() < deadline and not all(len(_listening_sockets(w, port)) == 2 for w in workers):
            time.sleep(0.2)
        first, second = (_listening_sockets(worker, port) for worker in workers)
        assert len(first) == len(second) == 2 and len(first & second) == 1  # the shared socket and each its own
        connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(32)]
        try:
            for connection in connections:  # one request on each: every connection was accepted and served
                connection.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert all(connection.recv(64).startswith(b"HTTP/1.1 200") for connection in connections)
            served = [sum(1 for c in worker.net_connections(kind="tcp")
                          if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port) for worker in workers]
        finally:
            for connection in connections:
                connection.close()
        # Hashed onto 3 sockets, each worker's own gets a third: none of 32 there has probability 2 * (2/3)**32 = 5e-6
        # (even if the shared socket's share all went to the other worker).
        assert sum(served) == 32 and min(served) >= 1, served
        # A worker that dies leaves no socket that nobody drains: the other answers every new connection
        # while circus restarts it (whose own socket is bound but not listened on until its app has started).
        # 5 s: a connection left on a socket only the dead worker drained would wait for the restart (~10 s here).
        workers[0].kill()
        workers[0].wait(timeout=10)
        connections = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        try:
            for connection in connections:
                connection.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert all(connection.recv(64).startswith(b"HTTP/1.1 200") for connection in connections)
        finally:
            for connection in connections:
                connection.close()
