"""benchmarks/wrk.py, the native load generator of the HTTP benchmarks, against a server that counts
what it receives: every request is one of the multipart bodies httpx builds for ``/classify``, with
its own boundary; answers other than 200 are errors, not throughput; and the counts add up. Skips
without Debian's ``wrk`` (``make browser`` installs it with the browser)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from python_multipart.multipart import parse_options_header
from python_multipart.multipart import MultipartParser

from benchmarks import wrk

pytestmark = pytest.mark.skipif(not wrk.available(), reason="needs Debian's wrk on PATH (`make browser` installs it)")
IMAGES = [b"\x89PNG first image", b"\x89PNG second image"]
LABELS = ["a cat", "a dog"]


def _form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart body, parsed by python-multipart (what Starlette and BentoML use)."""
    _, options = parse_options_header(content_type)
    fields, name, chunks = {}, None, []

    def on_header_value(data, start, end):
        nonlocal name
        value = data[start:end].decode()
        if "name=" in value:
            name = value.split('name="')[1].split('"')[0]

    def on_part_data(data, start, end):
        chunks.append(data[start:end])

    def on_part_end():
        nonlocal chunks
        fields[name] = b"".join(chunks)
        chunks = []

    parser = MultipartParser(options[b"boundary"], {"on_header_value": on_header_value, "on_part_data": on_part_data,
                                                    "on_part_end": on_part_end})
    parser.write(body)
    parser.finalize()
    return fields


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk's connections expect
    received: list[dict] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        fields = _form_fields(self.headers["Content-Type"], body)
        with self.lock:
            self.received.append({"path": self.path, "fields": fields})
        status = 200 if fields.get("images") == IMAGES[0] else 503  # every second request fails
        answer = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_wrk_sends_the_classify_form_and_counts_failures_as_errors():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = wrk.load(f"http://127.0.0.1:{server.server_port}", IMAGES, LABELS, concurrency=2, seconds=1)
    finally:
        server.shutdown()
        server.server_close()
    received = _Counting.received
    assert len(received) >= 20
    assert {r["path"] for r in received} == {"/classify"}
    assert {r["fields"]["images"] for r in received} == set(IMAGES)  # both bodies, taken in turn
    assert all(json.loads(r["fields"]["labels"]) == LABELS and r["fields"]["top_k"] == b"5" for r in received)
    ok = sum(r["fields"]["images"] == IMAGES[0] for r in received)
    # wrk counts the answers it got within its window; the server may have taken a last request per connection.
    answered = result["requests"] + result["errors"]
    assert 0 <= len(received) - answered <= 2
    assert 0 <= ok - result["requests"] <= 2 and result["requests"] > 0
    assert result["errors"] >= len(received) - ok - 2 and result["first_error"].startswith("503")
    assert result["images_per_s"] == pytest.approx(result["requests"] / result["seconds"], rel=0.01)  # seconds are rounded
