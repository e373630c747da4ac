"""Against a real `bentoml serve` process on a free loopback port, serving the default model."""
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import toy_image
from capt.data.toyworld import COLOURS, SHAPES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(default_bundle, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "CAPT_BUNDLE": str(default_bundle), "HF_HUB_OFFLINE": "1"}
    bentoml = Path(sys.executable).with_name("bentoml")
    with log.open("w") as out:
        process = subprocess.Popen([str(bentoml), "serve", "serving.service:Classifier", "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server not ready after 180 s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _classify(url, images, labels, **fields):
    files = [("images", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
    data = {"labels": __import__("json").dumps(labels), **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{url}/classify", files=files, data=data, timeout=60)


def test_health_and_metrics(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    info = httpx.post(f"{server}/info", json={}).json()
    assert info["model"] == "capt-toy-vit" and info["onnx_provider"] == "CPUExecutionProvider"
    assert info["limits"]["max_probe_eps"] > 0


def test_two_label_sets_two_answers(server):
    image = toy_image("circle", "green")
    shapes = _classify(server, [image], SHAPES, top_k=8)
    colours = _classify(server, [image, toy_image("star", "red")], list(COLOURS), top_k=2)
    assert shapes.status_code == 200 and colours.status_code == 200, (shapes.text, colours.text)
    assert {p["label"] for p in shapes.json()["predictions"][0]} == set(SHAPES)
    assert len(colours.json()["predictions"]) == 2
    assert all(p["label"] in COLOURS for row in colours.json()["predictions"] for p in row)


def test_repeated_label_set_hits_the_cache(server):
    labels = ["a striped thing", "a dotted thing", "a plain thing"]
    first = _classify(server, [toy_image()], labels).json()
    second = _classify(server, [toy_image()], labels).json()
    assert first["label_cache_hit"] is False and second["label_cache_hit"] is True
    metrics = httpx.get(f"{server}/metrics").text
    assert "capt_label_cache_hits" in metrics


def test_base64_json_classify(server):
    body = {"images": [base64.b64encode(_png(toy_image("square", "blue"))).decode()], "labels": list(COLOURS), "top_k": 1}
    response = httpx.post(f"{server}/classify_json", json={"request": body}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["label"] in COLOURS


def _probe(url, image, labels, **fields):
    data = {"labels": __import__("json").dumps(labels), **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                                          for k, v in fields.items()}}
    return httpx.post(f"{url}/probe", files=[("image", ("x.png", _png(image), "image/png"))], data=data, timeout=120)


def test_probe_with_zero_eps_never_flips(server):
    response = _probe(server, toy_image("star", "red"), list(COLOURS), eps=0.0, steps=5)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["flipped"] is False and result["served_onnx"]["flipped"] is False
    assert result["served_onnx"]["clean"]["label"] == result["clean"]["label"]


def test_probe_with_a_large_eps_flips_the_default_model(server):
    result = _probe(server, toy_image("star", "red"), list(COLOURS), eps=32 / 255, steps=20, restarts=2).json()
    assert result["flipped"] is True and result["margin_adversarial"] < 0
    assert result["served_onnx"]["clean"]["label"] == result["clean"]["label"]
    assert "capt_probes" in httpx.get(f"{server}/metrics").text


@pytest.mark.parametrize("labels,fields,message", [
    (["only"], {}, "at least 2"),
    (["a", "b"], {"eps": 1.0}, "over the limit"),
])
def test_bad_probe_is_a_400_with_a_message(server, labels, fields, message):
    response = _probe(server, toy_image(), labels, **fields)
    assert response.status_code == 400 and message in response.text


def test_bad_classify_is_a_400(server):
    response = _classify(server, [toy_image()], [])
    assert response.status_code == 400 and "at least 1" in response.text
