"""A native load generator for the HTTP benchmarks: ``wrk`` (Debian's ``wrk`` package), driven with
the same multipart ``/classify`` requests as ``benchmarks.http.load``.

Why: ``http.load`` is one asyncio process (httpx). Against the framework's ceiling it used 0.8-0.9
of a core of the 2 it shares with the server, so it capped the ceiling, not BentoML: the ceiling
measured 359-389 requests/s with it and 568 and 596 (two single runs) with wrk, which used 0.02 of
a core (2 cores of an AMD EPYC, 2026-12-01). A ratio against a capped ceiling says too little about the server.

``load(url, images, labels, concurrency, seconds)`` returns the same keys as ``http.load``. The
bodies are built by httpx exactly as ``http.load`` sends them (one per image, taken in turn) and
written for a Lua script that wrk runs; any answer but 200 is an error, not throughput.

    apt-get install wrk
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import classify_form

WRK = "wrk"
_SCRIPT = r"""
local bodies, types = {}, {}
local listing = io.open("%(folder)s/bodies.txt", "r")
for line in listing:lines() do
  local name, content_type = line:match("^(%%S+) (.+)$")
  local file = io.open("%(folder)s/" .. name, "rb")
  bodies[#bodies + 1] = file:read("*all")
  file:close()
  types[#types + 1] = content_type
end
listing:close()

local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

sent, errors, first_error = 0, 0, nil  -- globals: done() reads them from each thread
function request()
  sent = sent + 1
  local i = ((sent + (id or 0)) %% #bodies) + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = types[i]}, bodies[i])
end

function response(status, headers, body)
  if status ~= 200 then
    errors = errors + 1
    if first_error == nil then first_error = (status .. ": " .. string.sub(body, 1, 200)):gsub('[%%c"\\]', " ") end
  end
end

function done(summary, latency, requests)
  local errors_total, first = 0, nil
  for _, thread in ipairs(threads) do
    errors_total = errors_total + thread:get("errors")
    first = first or thread:get("first_error")
  end
  local socket = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('WRK_RESULT {"responses": %%d, "seconds": %%.4f, "errors": %%d, "socket_errors": %%d, ' ..
    '"p50_ms": %%.3f, "p99_ms": %%.3f, "first_error": "%%s"}\n', summary.requests, summary.duration / 1e6,
    errors_total, socket, latency:percentile(50) / 1000, latency:percentile(99) / 1000, first or ""))
end
"""


def available() -> bool:
    return shutil.which(WRK) is not None


def write_requests(folder: Path, images: list[bytes], labels: list[str], path: str = "/classify") -> Path:
    """The multipart bodies (one per image) and the Lua script that sends them in turn; the script's path."""
    import httpx

    listing = []
    for index, image in enumerate(images):
        request = httpx.Request("POST", f"http://localhost{path}", **classify_form([image], labels))
        (folder / f"{index}.body").write_bytes(request.read())
        listing.append(f"{index}.body {request.headers['content-type']}")
    (folder / "bodies.txt").write_text("\n".join(listing) + "\n")
    script = folder / "classify.lua"
    script.write_text(_SCRIPT % {"folder": folder, "path": path})
    return script


def load(url: str, images: list[bytes], labels: list[str], concurrency: int, seconds: float, threads: int = 1,
         path: str = "/classify") -> dict:
    """``concurrency`` keep-alive connections for ``seconds`` from ``threads`` wrk threads."""
    if not available():
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="capt-wrk-") as folder:
        script = write_requests(Path(folder), images, labels, path)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([WRK, "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s",
                               "--timeout", "120s", "-s", str(script), url], capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    ok = result["responses"] - result["errors"]
    if ok <= 0:
        raise RuntimeError(f"no request succeeded at concurrency {concurrency}: {result['first_error']}")
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"concurrency": concurrency, "requests": ok, "errors": result["errors"] + result["socket_errors"],
            "first_error": result["first_error"] or (f"{result['socket_errors']} socket errors" if result["socket_errors"] else None),
            "seconds": round(result["seconds"], 2), "images_per_s": ok / result["seconds"],
            "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "client_cpu_fraction": round(client_cpu / elapsed, 3), "client": f"wrk, {threads} thread(s)"}
