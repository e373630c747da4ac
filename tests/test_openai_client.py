"""OpenAI's embeddings wire format (serving/openai_api.py), through the real ``openai`` client (the pin in
requirements-test.txt) against a real ``bentoml serve``: the same numbers as /embed_text and /embed_image."""
import base64
import contextlib
import socket
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

from conftest import png_bytes, toy_image
from serving import openai_api
from serving.model import Limits

MODEL = "capt-toy-vit"  # the default bundle's manifest name: what GET /v1/models lists
TEXTS = ["a red star", "a green circle", "blue"]


def client(server, **options):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused: this server has no keys", max_retries=0,
                         **options)


def b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def embed_text(server, labels):
    response = httpx.post(f"{server.url}/embed_text", json={"labels": labels}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"])


def embed_image(server, images):
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    response = httpx.post(f"{server.url}/embed_image", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"])


def test_text_embeddings_are_embed_text_s_numbers_in_both_encodings(server):
    ours = embed_text(server, TEXTS)
    for encoding in ("default (base64, decoded by the client)", "float", "base64"):
        options = {} if encoding.startswith("default") else {"encoding_format": encoding}
        answer = client(server).embeddings.create(model=MODEL, input=TEXTS, **options)
        assert answer.model == MODEL and [d.index for d in answer.data] == [0, 1, 2]
        if encoding == "base64":  # asked for explicitly: the client hands over the string as it came
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in answer.data])
        else:
            got = np.array([d.embedding for d in answer.data])
        assert got.shape == (3, 128)
        np.testing.assert_allclose(got, ours, atol=1e-6, err_msg=encoding)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)


def test_usage_counts_the_text_encoder_s_tokens_and_one_string_is_one_input(server):
    import open_clip
    tokenizer = open_clip.SimpleTokenizer()
    answer = client(server).embeddings.create(model=MODEL, input="blue", encoding_format="float")
    assert len(answer.data) == 1
    # "a photo of a {}." with the learned prompt in place of "a photo": start, "of a blue .", end.
    expected = 2 + len(tokenizer.encode("of a blue ."))
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == expected
    twice = client(server).embeddings.create(model=MODEL, input=["blue", "blue"], encoding_format="float")
    assert twice.usage.prompt_tokens == 2 * expected and twice.data[0].embedding == twice.data[1].embedding


def test_image_embeddings_with_the_infinity_modality_are_embed_image_s_numbers(server):
    images = [toy_image("star", "red"), toy_image("circle", "blue")]
    ours = embed_image(server, images)
    inputs = [f"data:image/png;base64,{b64(images[0])}", b64(images[1])]  # a data URL and raw base64
    answer = client(server).embeddings.create(model=MODEL, input=inputs, extra_body={"modality": "image"})
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, ours, atol=1e-5)
    assert answer.usage.prompt_tokens == 0
    # Images and texts share the space: each image is nearest its own colour's text.
    colours = np.array([d.embedding for d in client(server).embeddings.create(model=MODEL, input=["red", "blue"]).data])
    assert list((got @ colours.T).argmax(1)) == [0, 1]


def test_models_lists_the_served_model_and_an_unknown_name_is_404_model_not_found(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "capt"
    assert client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as raised:
        client(server).embeddings.create(model="text-embedding-3-small", input="x")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4o")


def test_dimensions_is_accepted_only_at_the_embedding_size(server):
    assert len(client(server).embeddings.create(model=MODEL, input="x", dimensions=128).data[0].embedding) == 128
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).embeddings.create(model=MODEL, input="x", dimensions=64)
    assert raised.value.param == "dimensions" and "128" in raised.value.message


@pytest.mark.parametrize("fields,param,message", [
    ({"input": [[1, 2, 3]]}, "input", "token-id arrays"),
    ({"input": [1, 2, 3]}, "input", "token-id arrays"),
    ({"input": []}, "input", "non-empty list"),
    ({"input": ["ok", ""]}, "input", "input[1] is empty"),
    ({"input": ["ok", 3.5]}, "input", "list of strings"),
    ({"input": "x" * 300}, "input", "longer than"),
    ({"input": ["x"] * 51}, "input", "too many inputs"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "modality": "audio"}, "modality", "modality must be"),
    ({"input": "x", "dimensions": True}, "dimensions", "dimensions must be"),
    ({"input": "x", "truncate": True}, "truncate", "unknown field"),
    ({"input": "not base64 !", "modality": "image"}, "input", "not valid base64"),
    ({"input": base64.b64encode(b"text").decode(), "modality": "image"}, "input", "not a readable image"),
    ({"input": ["x"] * 40, "modality": "image"}, "input", "too many inputs"),
])
def test_bad_requests_are_400_in_openai_s_envelope(server, fields, param, message):
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"], error


def test_the_client_raises_bad_request_and_other_errors_keep_the_envelope(server):
    with pytest.raises(openai.BadRequestError, match="token-id arrays"):
        client(server).embeddings.create(model=MODEL, input=[[49406, 49407]])
    for method, path, status in (("POST", "/v1/embeddings", 400), ("GET", "/v1/chat/completions", 404)):
        response = httpx.request(method, f"{server.url}{path}", content=b"{nope", timeout=60)
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(f"{server.url}/v1/embeddings", content=b"{nope").json()["error"]["param"] is None
    missing = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}).json()["error"]
    assert missing["param"] == "model"


def test_an_image_url_is_refused_and_never_fetched(server):
    with contextlib.closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(1.0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        with pytest.raises(openai.BadRequestError, match="not fetched"):
            client(server).embeddings.create(model=MODEL, input=[b64(toy_image()), url], extra_body={"modality": "image"})
        with pytest.raises(socket.timeout):
            listener.accept()


def test_more_embeddings_at_once_than_the_limit_are_429_with_retry_after():
    """In process, on the mounted app itself: with every slot taken, a request is refused at once."""
    from starlette.testclient import TestClient
    slots = threading.BoundedSemaphore(1)
    service = SimpleNamespace(model=SimpleNamespace(limits=Limits(max_concurrent_embeddings=1), embedding_dim=128),
                              served_model_name=MODEL, embedding_slots=slots)
    app = openai_api.create_app(lambda: service)
    with TestClient(app) as http:
        assert slots.acquire(blocking=False)
        try:
            response = http.post("/embeddings", json={"model": MODEL, "input": "x"})
        finally:
            slots.release()
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded" and "CAPT_MAX_CONCURRENT_EMBEDDINGS" in response.text
    assert slots.acquire(blocking=False)  # a refusal takes no slot with it


def test_embeddings_answer_encodes_little_endian_float32():
    vectors = np.array([[1.0, -2.5, 3.25]], dtype=np.float32)
    as_base64 = openai_api.embeddings_answer(vectors, [3], MODEL, "base64")
    assert base64.b64decode(as_base64["data"][0]["embedding"]) == vectors[0].astype("<f4").tobytes()
    as_float = openai_api.embeddings_answer(vectors, [3], MODEL, "float")
    assert as_float["data"][0] == {"object": "embedding", "index": 0, "embedding": [1.0, -2.5, 3.25]}
    assert as_float["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and as_float["object"] == "list"
