"""Against a real `bentoml serve` process on a free loopback port, serving the default model."""
import base64
import io
import json
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes, post_classify, post_probe, toy_image
from capt.data.toyworld import COLOURS, SHAPES


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    info = httpx.post(f"{server.url}/info", json={}).json()
    assert info["model"] == "capt-toy-vit" and info["onnx_provider"] == "CPUExecutionProvider"
    assert info["quick_gelu"] is False and info["tokenizer"]["dropped_template_tokens"] == 2
    # No GPU here: the fallback is said in `info` and in the log.
    assert "no CUDA device" in info["onnx_provider_note"]
    assert "running on CPUExecutionProvider" in server.log.read_text()
    # Every limit is listed, with the values set through the environment.
    assert info["limits"]["max_probe_seconds"] == 4 and info["limits"]["max_request_bytes"] == 8_000_000
    assert {"max_image_pixels", "max_upload_bytes", "max_labels", "max_probe_eps", "max_probe_steps",
            "max_concurrent_probes"} <= set(info["limits"])
    # The C event loop and HTTP parser (requirements.txt), not asyncio's and h11's pure Python.
    assert info["server"] == {"event_loop": "uvloop" if sys.platform != "win32" else "asyncio", "http_parser": "httptools",
                              "listening_socket_per_worker": sys.platform.startswith("linux")}


def test_two_label_sets_two_answers(server):
    image = toy_image("circle", "green")
    shapes = post_classify(server.url, [image], SHAPES, top_k=8)
    colours = post_classify(server.url, [image, toy_image("star", "red")], list(COLOURS), top_k=2)
    assert shapes.status_code == 200 and colours.status_code == 200, (shapes.text, colours.text)
    assert {p["label"] for p in shapes.json()["predictions"][0]} == set(SHAPES)
    assert len(colours.json()["predictions"]) == 2
    assert all(p["label"] in COLOURS for row in colours.json()["predictions"] for p in row)


def test_repeated_label_set_hits_the_cache(server):
    labels = ["a striped thing", "a dotted thing", "a plain thing"]
    first = post_classify(server.url, [toy_image()], labels).json()
    second = post_classify(server.url, [toy_image()], labels).json()
    assert first["label_cache_hit"] is False and second["label_cache_hit"] is True
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "capt_label_cache_hits" in metrics


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    """150 requests from 24 threads: more than the 100 after which BentoML 1.4.30+ used to drop the
    inter-service connection under requests in flight (500s, before the in-process batcher)."""
    from concurrent.futures import ThreadPoolExecutor
    pairs = [(shape, colour) for shape in SHAPES for colour in list(COLOURS)[:3]]
    images = {pair: toy_image(*pair) for pair in pairs}
    expected = {pair: post_classify(server.url, [images[pair]], SHAPES).json()["predictions"][0] for pair in pairs}
    before = _histogram(server, "capt_image_batch_size")
    jobs = [pairs[i % len(pairs)] for i in range(150)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda pair: post_classify(server.url, [images[pair]], SHAPES), jobs))
    assert [a.status_code for a in answers] == [200] * len(jobs), [a.text for a in answers if a.status_code != 200][:3]
    for pair, answer in zip(jobs, answers):
        got = answer.json()["predictions"][0]
        assert [p["label"] for p in got] == [p["label"] for p in expected[pair]]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in expected[pair]], abs=1e-4)
    after = _histogram(server, "capt_image_batch_size")
    batches, images_encoded = after[0] - before[0], after[1] - before[1]
    assert images_encoded == len(jobs)
    assert batches < len(jobs)  # some requests shared a batch


def _histogram(server, name) -> tuple[float, float]:
    """(count, sum) of a Prometheus histogram from /metrics."""
    values = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{name}_{part}"):
                values[part] = values.get(part, 0.0) + float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_base64_json_classify(server):
    body = {"images": [base64.b64encode(png_bytes(toy_image("square", "blue"))).decode()], "labels": list(COLOURS), "top_k": 1}
    response = httpx.post(f"{server.url}/classify_json", json={"request": body}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["label"] in COLOURS


def test_probe_with_zero_eps_never_flips(server):
    response = post_probe(server.url, toy_image("star", "red"), list(COLOURS), eps=0.0, steps=5)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["flipped"] is False and result["served_onnx"]["flipped"] is False
    assert result["served_onnx"]["clean"]["label"] == result["clean"]["label"]


def test_probe_with_a_large_eps_flips_the_default_model(server):
    result = post_probe(server.url, toy_image("star", "red"), list(COLOURS), eps=32 / 255, steps=20, restarts=2).json()
    assert result["flipped"] is True and result["margin_adversarial"] < 0
    assert result["served_onnx"]["clean"]["label"] == result["clean"]["label"]
    assert "capt_probes" in httpx.get(f"{server.url}/metrics").text


@pytest.mark.parametrize("space,size", [("input", (64, 64)), ("upload", (100, 80))])
def test_a_probe_s_adversarial_png_sent_to_classify_gets_the_label_the_probe_says(server, space, size):
    """The probe judges the 8-bit image it returns: uploaded as it is, that image gets the same label
    from /classify (the served graph through the real preprocessing), and the prediction has flipped."""
    image = toy_image("star", "red").resize(size, Image.BICUBIC)
    response = post_probe(server.url, image, list(COLOURS), eps=16 / 255, steps=10, space=space, return_images=True)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["flipped"] and result["served_onnx"]["flipped"] and result["adversarial_quantised"] is True
    assert result["space"] == space and result["upload_size"] == list(size) and result["eps_space"]
    assert result["margin_adversarial"] < -0.1  # far from a tie: the label below does not hang on float noise
    png = base64.b64decode(result["adversarial_png"])
    assert Image.open(io.BytesIO(png)).size == (size if space == "upload" else (64, 64))
    answer = post_classify(server.url, [png], list(COLOURS), top_k=1)
    assert answer.status_code == 200, answer.text
    label = answer.json()["predictions"][0][0]["label"]
    assert label == result["served_onnx"]["adversarial"]["label"] == result["adversarial"]["label"] != result["target"]


@pytest.mark.parametrize("fields,message", [
    ({"attack": "fgsm"}, "attack"),
    ({"space": "pixels"}, "space"),
    ({"attack": "apgd", "step_size": 0.01}, "step_size is for attack 'pgd' only"),
    ({"seed": -1}, "seed must be"),
])
def test_bad_values_of_the_probe_s_attack_fields_are_400(server, fields, message):
    response = post_probe(server.url, toy_image(), list(COLOURS), **fields)
    assert response.status_code == 400, response.text
    body = response.json()
    assert isinstance(body["error"], str) and message in json.dumps(body)


@pytest.mark.parametrize("damage", ["tamper", "truncate", "twin"])
def test_a_damaged_bundle_stops_the_server_naming_the_file(default_bundle, tmp_path, damage):
    import shutil
    from conftest import alter_twin_weights
    from tools.launch import bentoml_serve
    bundle = tmp_path / "bundle"
    named = "text_encoder.onnx"
    if damage == "twin":  # checksums all right, but the probe's twin is another model than the graphs
        alter_twin_weights(default_bundle, bundle, "visual.proj")
        named = "twin disagrees with image_encoder.onnx"
    else:
        shutil.copytree(default_bundle, bundle)
        graph = bundle / named
        data = graph.read_bytes()
        if damage == "tamper":
            graph.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
        else:
            graph.write_bytes(data[: len(data) // 2])
    with bentoml_serve(bundle, tmp_path / "serve.log", ready_within=120, check=False) as running:
        assert running.process.wait(timeout=120) != 0
    log = running.log.read_text()
    assert "refusing to serve" in log and named in log


def test_model_names_never_become_paths_outside_the_store():
    import bentoml
    from export.bundle import bundle_path_from_store
    for tag in ("../../etc/passwd", "..:latest", "/etc:latest", "capt/../../x:1"):
        with pytest.raises((ValueError, bentoml.exceptions.BentoMLException)):
            bundle_path_from_store(tag)


@pytest.fixture(scope="module")
def in_process(default_bundle):
    from serving.model import ServingModel
    return ServingModel(default_bundle, check_twin=False)


def test_uploads_decoded_on_a_thread_get_the_answers_of_those_decoded_on_the_event_loop(server, in_process):
    """/classify decodes small uploads on its event loop and large ones (bytes or pixels) on a thread
    (serving.images). Its answers must be those of the model on the same images decoded by plain PIL."""
    from serving.images import decodes_inline, reads_inline
    generator = np.random.default_rng(0)
    small = toy_image("star", "blue")
    many_pixels = small.resize((600, 600), Image.NEAREST)  # over INLINE_DECODE_PIXELS, a small file (13 KB)
    noisy = Image.fromarray(generator.integers(0, 256, (400, 400, 3), dtype=np.uint8))  # over INLINE_UPLOAD_BYTES
    strip = small.resize((2048, 8))  # few pixels, but resized to 64 x 16,384 for the 64-pixel model
    uploads = [png_bytes(image) for image in (small, many_pixels, noisy, strip)]
    routes = []
    for index, data in enumerate(uploads):
        path = server.log.parent / f"route-{index}.png"
        path.write_bytes(data)
        opened = Image.open(path)
        routes.append((reads_inline(path), reads_inline(path) and decodes_inline(opened, in_process.resized_pixels(opened))))
    # loop, thread after the header (pixels), thread (bytes), thread after the header (resized pixels)
    assert routes == [(True, True), (True, False), (False, False), (True, False)]
    labels = list(SHAPES)
    answer = post_classify(server.url, uploads, labels, top_k=len(labels))
    assert answer.status_code == 200, answer.text
    expected = in_process.classify_answer([Image.open(io.BytesIO(data)).convert("RGB") for data in uploads], labels,
                                      top_k=len(labels))
    for got, reference in zip(answer.json()["predictions"], expected["predictions"]):
        assert [p["label"] for p in got] == [p["label"] for p in reference]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in reference], abs=1e-5)
