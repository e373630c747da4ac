"""Hostile and broken requests against a real `bentoml serve`: each is a 4xx with a JSON message, the
server stays up, and nothing of the request's content reaches the log."""
import base64
import json
import socket
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_LIMITS, png_bytes, post_classify, post_probe, toy_image
from test_images import bomb_png
from capt.data.toyworld import COLOURS

LABELS = list(COLOURS)


def _error(response, status=400) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    return body["error"]


@pytest.mark.parametrize("data,message", [
    (b"", "empty image"),
    (b"GIF89a but not really", "not a readable image"),
    (png_bytes(toy_image())[:200], "truncated"),
    (png_bytes(toy_image(), "JPEG")[:500], "truncated"),
    (bomb_png(30000, 30000), "decompression bomb"),
    (b"\xff" * (TEST_LIMITS["CAPT_MAX_UPLOAD_BYTES"] + 1), "over the limit"),
])
def test_bad_images_are_400(server, data, message):
    assert message in _error(post_classify(server.url, [data], LABELS))


def _strip(width: int) -> bytes:
    return png_bytes(Image.fromarray(np.full((1, width, 3), 200, np.uint8)))


@pytest.mark.parametrize("endpoint", ["classify", "classify_json", "embed_image", "probe"])
def test_a_strip_that_would_resize_to_gigapixels_is_400_before_it_is_resized(server, endpoint):
    # A 16384x1 PNG is ~100 bytes and 16,384 pixels, inside every upload limit; the 64-pixel model's
    # preprocessing (shortest side to 64) would resize it to 64 x 1,048,576 pixels (over 40M).
    data = _strip(16384)
    assert len(data) < 1000
    if endpoint == "classify":
        response = post_classify(server.url, [data], LABELS)
    elif endpoint == "probe":
        response = post_probe(server.url, data, LABELS)
    elif endpoint == "embed_image":
        response = httpx.post(f"{server.url}/embed_image", files=[("images", ("s.png", data, "image/png"))], timeout=60)
    else:
        response = httpx.post(f"{server.url}/classify_json", timeout=60,
                              json={"request": {"images": [base64.b64encode(data).decode()], "labels": LABELS}})
    message = _error(response)
    assert "would be resized to 67108864 pixels" in message and "16384x1" in message, message
    # Control: a strip whose resize fits the limit (64 x 65,536) is classified.
    assert post_classify(server.url, [_strip(1024)], LABELS).status_code == 200


def _jpeg_cmyk():
    return png_bytes(toy_image().convert("CMYK"), "JPEG")


def _gif_animated():
    import io
    buffer = io.BytesIO()
    toy_image().save(buffer, format="GIF", save_all=True, append_images=[toy_image("circle", "blue")])
    return buffer.getvalue()


@pytest.mark.parametrize("make", [
    _jpeg_cmyk,
    lambda: png_bytes(Image.fromarray((np.asarray(toy_image().convert("L")).astype(np.uint16) * 257))),
    lambda: png_bytes(toy_image().convert("P", palette=Image.Palette.ADAPTIVE), transparency=0),
    lambda: png_bytes(toy_image().convert("LA")),
    lambda: png_bytes(toy_image().convert("RGBA")),
    _gif_animated,
], ids=["cmyk-jpeg", "16-bit-grey", "palette-transparency", "LA", "RGBA", "animated-gif"])
def test_odd_modes_are_converted_and_classified(server, make):
    response = post_classify(server.url, [make()], LABELS)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["label"] in LABELS


def test_exif_rotated_jpeg_is_classified_upright(server):
    """The embedding of an EXIF-rotated JPEG is the upright image's, not the stored rotation's."""
    upright = toy_image("triangle", "blue")
    stored = upright.rotate(90, expand=True)  # orientation 6: rotate 270 (90 CW) to display
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [("images", (f"{i}.jpg", png_bytes(im, "JPEG", quality=95, **kw), "image/jpeg"))
             for i, (im, kw) in enumerate([(upright, {}), (stored, {"exif": exif}), (stored, {})])]
    response = httpx.post(f"{server.url}/embed_image", files=files, timeout=60)
    assert response.status_code == 200, response.text
    upright_e, rotated_e, unrotated_e = np.asarray(response.json()["embeddings"])
    assert upright_e @ rotated_e > 0.99 and upright_e @ rotated_e > upright_e @ unrotated_e


@pytest.mark.parametrize("labels,fields,message", [
    ([], {}, "at least 1"),
    (["cat", "cat"], {}, "duplicate"),
    (["cat", "  "], {}, "must not be empty"),
    (["cat", "word " * 40], {}, "longer than the text context"),
    (["cat", "dog"], {"templates": json.dumps(["a photo"])}, "exactly once"),
    (["cat", "dog"], {"templates": json.dumps(["{0.__class__} a photo of {}"])}, "exactly once"),
    (["cat", "dog"], {"templates": json.dumps(["a photo of {!r}"])}, "plain '{}'"),
    ([f"label {i}" for i in range(TEST_LIMITS["CAPT_MAX_LABELS"] + 1)], {}, "too many labels"),
    (["cat", "dog"], {"top_k": 0}, "top_k"),
])
def test_bad_label_sets_are_400(server, labels, fields, message):
    assert message in _error(post_classify(server.url, [toy_image()], labels, **fields))


def test_templates_a_text_prompted_model_does_not_use_are_accepted_and_said_so(server):
    """The default model's learned text context replaces a template: the answer says it was not used."""
    image = base64.b64encode(png_bytes(toy_image())).decode()
    body = {"request": {"images": [image], "labels": LABELS, "templates": ["a {{toy}} photo of a {}."]}}
    answer = httpx.post(f"{server.url}/classify_json", json=body, timeout=60).json()
    assert answer["templates_applied"] is False and "learned" in answer["templates_note"]
    without = httpx.post(f"{server.url}/classify_json", json={"request": {"images": [image], "labels": LABELS}},
                         timeout=60).json()
    assert without["templates_applied"] is False and "templates_note" not in without


@pytest.mark.parametrize("labels,fields,message", [
    (["only one"], {}, "at least 2"),
    (LABELS, {"eps": -0.01}, "finite number >= 0"),
    (LABELS, {"eps": "nan"}, "finite number >= 0"),
    (LABELS, {"eps": "inf"}, "finite number >= 0"),
    (LABELS, {"eps": 0.5}, "over the limit"),
    (LABELS, {"steps": 100000}, "steps must be in"),
    (LABELS, {"restarts": 0}, "restarts must be in"),
    (LABELS, {"true_label": "not a colour"}, "not one of the labels"),
])
def test_bad_probes_are_400(server, labels, fields, message):
    assert message in _error(post_probe(server.url, toy_image(), labels, **fields))


@pytest.mark.parametrize("fields,where", [
    ({"top_k": "three"}, "top_k"),
    ({"labels": "red"}, "labels"),           # not a JSON list
    ({"labels": json.dumps([1, 2])}, "labels"),
    ({"colour_hint": "red"}, "colour_hint"),  # unknown field
])
def test_wrong_types_and_unknown_fields_are_400(server, fields, where):
    data = {"labels": json.dumps(LABELS), **fields}
    response = httpx.post(f"{server.url}/classify", files=[("images", ("x.png", png_bytes(toy_image()), "image/png"))],
                          data=data, timeout=60)
    _error(response)
    assert where in json.dumps(response.json()["detail"])


@pytest.mark.parametrize("body", [
    {"request": {"images": "abc", "labels": LABELS}},
    {"request": {"images": ["abc"], "labels": LABELS, "extra": 1}},
    {"request": {"images": ["%%%"], "labels": LABELS}},
    {"wrong": 1},
])
def test_bad_json_bodies_are_400(server, body):
    _error(httpx.post(f"{server.url}/classify_json", json=body, timeout=60))


def test_a_body_over_the_request_limit_is_413_before_it_is_read(server):
    too_big = b"\0" * (TEST_LIMITS["CAPT_MAX_REQUEST_BYTES"] + 1)
    response = httpx.post(f"{server.url}/classify", content=too_big,
                          headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert "CAPT_MAX_REQUEST_BYTES" in _error(response, 413)

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(9):
            yield b"\0" * 1_000_000
    response = httpx.post(f"{server.url}/classify", content=chunked(),
                          headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert "more than" in _error(response, 413)


def test_pickle_is_refused_on_the_public_port(server):
    response = httpx.post(f"{server.url}/classify", content=b"\x80\x04K\x01.",
                          headers={"content-type": "application/vnd.bentoml+pickle"}, timeout=30)
    assert response.status_code == 415


def test_a_probe_past_its_time_limit_is_stopped_with_503(server):
    response = post_probe(server.url, toy_image(), LABELS, eps=8 / 255, steps=200, restarts=5, search_eps=True)
    assert "limit of 4 s" in _error(response, 503)


def test_probes_beyond_the_concurrency_limit_are_429_at_once(server):
    results = []

    def long_probe():
        results.append(post_probe(server.url, toy_image(), LABELS, eps=1 / 255, steps=200, restarts=5).status_code)
    threads = [threading.Thread(target=long_probe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(429) >= 1 and set(results) <= {200, 429, 503}


def test_a_long_probe_or_a_slow_client_does_not_stall_classify(server):
    slow = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    slow.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")  # and then nothing more
    probe_done = threading.Event()

    def long_probe():
        post_probe(server.url, toy_image(), LABELS, eps=1 / 255, steps=200, restarts=5)
        probe_done.set()
    thread = threading.Thread(target=long_probe)
    thread.start()
    try:
        for _ in range(3):
            assert post_classify(server.url, [toy_image()], LABELS).status_code == 200
        assert not probe_done.is_set(), "classify should have finished while the probe was still running"
    finally:
        thread.join()
        slow.close()


def test_the_log_never_holds_request_content(server):
    marker = base64.b64encode(b"MARKER-IMAGE-BYTES" * 8).decode()
    httpx.post(f"{server.url}/classify_json", json={"request": {"images": marker, "labels": LABELS}}, timeout=30)
    httpx.post(f"{server.url}/classify", files=[("images", ("x.png", marker.encode(), "image/png"))],
               data={"labels": json.dumps(LABELS), "top_k": marker}, timeout=30)
    log = server.log.read_text()
    assert "refused (" in log  # the refusals are logged...
    assert marker[:16] not in log and "MARKER" not in log  # ...without what was sent


def test_the_server_is_still_up(server):
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert post_classify(server.url, [toy_image()], LABELS).status_code == 200


def _multipart(fields: dict, boundary: str = "capt-test-boundary") -> tuple[bytes, dict]:
    """A multipart body of text parts only (httpx sends multipart only when files are given)."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("endpoint,field", [("classify", "images"), ("embed_image", "images"), ("probe", "image")])
def test_a_url_in_a_file_field_is_never_fetched(server, endpoint, field):
    """BentoML would download a text value given for a file field (a server-side request wherever a
    client points it, found by schemathesis as a 500); here it is only the upload's content, refused
    as not an image."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.0)
    fields = {field: f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"}
    if endpoint != "embed_image":
        fields["labels"] = json.dumps(LABELS)
    body, headers = _multipart(fields)
    try:
        response = httpx.post(f"{server.url}/{endpoint}", content=body, headers=headers, timeout=60)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert _error(response) == "not a readable image: no image format recognised"


@pytest.mark.parametrize("endpoint", ["classify", "classify_json", "info", "probe"])
def test_multipart_without_a_boundary_is_400(server, endpoint):
    response = httpx.post(f"{server.url}/{endpoint}", content=b"{}", headers={"Content-Type": "multipart/form-data"},
                          timeout=60)
    assert "boundary" in _error(response)


@pytest.mark.parametrize("body", [b"--b\r\nTrue--b--\r\n", b"--b\r\nContent-Disposition: form-data; name=\"images\"\r\n", b"garbage"])
def test_a_malformed_multipart_body_is_400(server, body):
    response = httpx.post(f"{server.url}/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["error"], str)
