"""Hugging Face's zero-shot image classification wire format (serving/huggingface.py), through the real
``huggingface_hub.InferenceClient`` (the pin in requirements-test.txt) against a real ``bentoml serve``,
and the payloads older client versions sent, as raw HTTP."""
import base64
import contextlib
import json
import socket

import httpx
import pytest

from conftest import png_bytes, post_classify, toy_image
from capt.data.toyworld import COLOURS, SHAPES
from serving import huggingface
from serving.errors import RequestError

ROUTE = huggingface.MOUNT + huggingface.ROUTE
LABELS = list(SHAPES)


@pytest.fixture
def hf_client(monkeypatch):
    """An InferenceClient factory. HF_HUB_OFFLINE=1 (set for every test run) makes huggingface_hub
    refuse every request, to our loopback server too, so it is lifted for these calls only: with a
    URL as ``model`` the client posts to that URL and asks the Hub nothing. A logged-in user's HF
    token is not picked up either (the client would send it to any URL when given no token)."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.inference._providers import hf_inference
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_inference, "get_token", lambda: None)

    def make(url, token=None):
        return InferenceClient(model=f"{url}{ROUTE}", token=token, timeout=60)
    return make


def b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def post(url, body):
    return httpx.post(f"{url}{ROUTE}", json=body, timeout=60)


def test_the_client_gets_every_label_ranked_with_our_probabilities(server, hf_client):
    image = toy_image("circle", "green")
    answer = hf_client(server.url).zero_shot_image_classification(png_bytes(image), candidate_labels=LABELS)
    labels, scores = [e.label for e in answer], [e.score for e in answer]
    assert sorted(labels) == sorted(LABELS)
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
    ours = post_classify(server.url, [image], LABELS, top_k=len(LABELS)).json()["predictions"][0]
    assert labels == [p["label"] for p in ours]
    assert scores == pytest.approx([p["probability"] for p in ours], abs=1e-5)
    assert labels[0] == "circle"


def test_the_client_s_hypothesis_template_is_accepted_and_said_to_be_unused_on_a_prompted_model(server, hf_client):
    client = hf_client(server.url)
    image = png_bytes(toy_image("star", "blue"))
    with_template = client.zero_shot_image_classification(image, candidate_labels=list(COLOURS),
                                                          hypothesis_template="This is a photo of {}.")
    without = client.zero_shot_image_classification(image, candidate_labels=list(COLOURS))
    assert [(e.label, round(e.score, 5)) for e in with_template] == [(e.label, round(e.score, 5)) for e in without]
    # The client hides headers: what the body cannot say is in ours.
    response = post(server.url, {"inputs": b64(toy_image()), "parameters": {
        "candidate_labels": list(COLOURS), "hypothesis_template": "This is a photo of {}."}})
    assert response.status_code == 200 and isinstance(response.json(), list)
    assert response.headers["x-capt-templates-applied"] == "false"
    assert "learned text prompts" in response.headers["x-capt-templates-note"]
    plain = post(server.url, {"inputs": b64(toy_image()), "parameters": {"candidate_labels": list(COLOURS)}})
    assert plain.headers["x-capt-templates-applied"] == "false" and "x-capt-templates-note" not in plain.headers


def test_a_refusal_reaches_the_client_as_hf_s_error(server, hf_client):
    from huggingface_hub.errors import HfHubHTTPError
    with pytest.raises(HfHubHTTPError) as raised:
        hf_client(server.url).zero_shot_image_classification(png_bytes(toy_image()), candidate_labels=["cat", "cat"])
    assert raised.value.response.status_code == 400
    assert "duplicate labels" in raised.value.response.json()["error"]


# What huggingface_hub has sent over the years (read from its source at each tag; see serving/huggingface.py).
PAYLOADS = {
    "0.27 and later": lambda image: {"inputs": image, "parameters": {"candidate_labels": LABELS}},
    "0.26": lambda image: {"inputs": {"image": image, "candidateLabels": ",".join(LABELS)},
                           "parameters": {"hypothesis_template": "This is a photo of {}."}},
    "0.16 to 0.25": lambda image: {"image": image, "parameters": {"candidate_labels": ",".join(LABELS)}},
    "inputs object, list of labels": lambda image: {"inputs": {"image": image, "candidate_labels": LABELS}},
    "data URL": lambda image: {"inputs": f"data:image/png;base64,{image}", "parameters": {"candidate_labels": LABELS}},
}


def test_older_clients_payloads_get_the_same_answer(server):
    image = b64(toy_image("square", "red"))
    answers = {}
    for version, payload in PAYLOADS.items():
        response = post(server.url, payload(image))
        assert response.status_code == 200, (version, response.text)
        answers[version] = [(e["label"], round(e["score"], 5)) for e in response.json()]
    first = next(iter(answers.values()))
    assert sorted(label for label, _ in first) == sorted(LABELS)
    assert all(answer == first for answer in answers.values()), answers


@pytest.mark.parametrize("body,message", [
    ({"parameters": {"candidate_labels": LABELS}}, "give the image once"),
    ({"inputs": "x", "image": "x", "parameters": {"candidate_labels": LABELS}}, "give the image once"),
    ({"inputs": "@@notbase64@@", "parameters": {"candidate_labels": LABELS}}, "not valid base64"),
    ({"inputs": base64.b64encode(b"not an image").decode(), "parameters": {"candidate_labels": LABELS}}, "not a readable image"),
    ({"inputs": "IMAGE"}, "candidate_labels are required"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": ["cat"]}}, "at least 2"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": ["cat", ""]}}, "must not be empty"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": "cat,,dog"}}, "must not be empty"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": [1, 2]}}, "list of strings"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": LABELS, "top_k": 2}}, "unknown field"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": LABELS, "hypothesis_template": "{0!r}"}}, "placeholder"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": LABELS, "hypothesis_template": "no placeholder"}}, "exactly once"),
    ({"inputs": "IMAGE", "parameters": {"candidate_labels": ["x" * 300, "y"]}}, "longer than"),
    ({"inputs": ["IMAGE", "IMAGE"], "parameters": {"candidate_labels": LABELS}}, "one image per request"),
    ({"inputs": "IMAGE", "parameters": "cat,dog"}, "parameters must be a JSON object"),
    (["IMAGE"], "the body must be a JSON object"),
    ({"inputs": {"image": "IMAGE", "candidateLabels": "a,b"}, "parameters": {"candidate_labels": ["a", "b"]}}, "twice"),
])
def test_bad_requests_are_400_in_hf_s_shape(server, body, message):
    text = json.dumps(body).replace('"IMAGE"', json.dumps(b64(toy_image())))
    response = httpx.post(f"{server.url}{ROUTE}", content=text, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def test_a_body_that_is_not_json_is_400(server):
    for content in (b"{not json", png_bytes(toy_image()), b""):
        response = httpx.post(f"{server.url}{ROUTE}", content=content, headers={"content-type": "image/png"})
        assert response.status_code == 400 and response.json() == {"error": "the body is not JSON"}


@pytest.mark.parametrize("where", ["inputs", "image", "inputs.image"])
def test_an_image_url_is_refused_and_never_fetched(server, where):
    with contextlib.closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(1.0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        body = {"inputs": {"image": url}} if where == "inputs.image" else {where: url}
        response = post(server.url, {**body, "parameters": {"candidate_labels": LABELS}})
        with pytest.raises(socket.timeout):
            listener.accept()
    assert response.status_code == 400 and "not fetched" in response.json()["error"]


def test_parse_takes_each_known_shape_and_says_what_is_wrong():
    """The parser alone (no server): labels from a list or a comma-joined string, the template kept."""
    parsed = huggingface.parse_zero_shot({"inputs": "aGk=", "parameters": {"candidate_labels": "a, b ,c",
                                                                           "hypothesis_template": "A {}."}})
    assert parsed == huggingface.ZeroShotRequest("aGk=", ["a", " b ", "c"], "A {}.")
    old = huggingface.parse_zero_shot({"image": "aGk=", "parameters": {"candidate_labels": "a,b"}, "options": {}})
    assert old.labels == ["a", "b"] and old.template is None
    for url in ("https://example.com/x.png", " HTTP://example.com/x.png"):
        with pytest.raises(RequestError, match="not fetched"):
            huggingface.parse_zero_shot({"inputs": url, "parameters": {"candidate_labels": ["a", "b"]}})
