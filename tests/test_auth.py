"""API keys (serving/auth.py): a real ``bentoml serve`` with a key file, driven by the real
huggingface_hub and openai clients with their own token= / api_key= arguments; the key settings that
must stop the server at start; and the log lines that say whether keys are on (never the keys)."""
import base64

import httpx
import openai
import pytest

from conftest import TEST_LIMITS, png_bytes, toy_image
from capt.data.toyworld import SHAPES
from serving import auth
from tools.launch import bentoml_serve

KEYS = ["capt-test-key-one-7f3a9c", "capt-test-key-two-0b21de"]
MODEL = "capt-toy-vit"
HF_ROUTE = "/hf/zero-shot-image-classification"


@pytest.fixture(scope="module")
def keyed(default_bundle, tmp_path_factory):
    """One server for this module, requiring one of two keys from a file with a comment and a blank line."""
    folder = tmp_path_factory.mktemp("keyed")
    keys_file = folder / "keys"
    keys_file.write_text(f"# keys for the tests\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    with bentoml_serve(default_bundle, folder / "serve.log", {**TEST_LIMITS, "CAPT_API_KEYS_FILE": keys_file}) as running:
        yield running


@pytest.fixture
def hf_client(monkeypatch):
    """See tests/test_huggingface_client.py: HF_HUB_OFFLINE lifted for loopback calls, no HF login token."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.inference._providers import hf_inference
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_inference, "get_token", lambda: None)
    return lambda url, token=None: InferenceClient(model=f"{url}{HF_ROUTE}", token=token, timeout=60)


def test_the_hf_client_s_token_is_the_key(keyed, hf_client):
    from huggingface_hub.errors import HfHubHTTPError
    image = png_bytes(toy_image("circle", "green"))
    for key in KEYS:
        answer = hf_client(keyed.url, token=key).zero_shot_image_classification(image, candidate_labels=list(SHAPES))
        assert sorted(e.label for e in answer) == sorted(SHAPES) and answer[0].label == "circle"
    for token in (None, "hf_a_hub_token_is_not_a_key", KEYS[0][:-1]):
        with pytest.raises(HfHubHTTPError) as raised:
            hf_client(keyed.url, token=token).zero_shot_image_classification(image, candidate_labels=["a", "b"])
        assert raised.value.response.status_code == 401
        assert raised.value.response.headers["www-authenticate"].startswith("Bearer")
        assert set(raised.value.response.json()) == {"error"}


def test_the_openai_client_s_api_key_is_the_key(keyed):
    answer = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEYS[1]).embeddings.create(model=MODEL, input=["red"])
    assert len(answer.data[0].embedding) == 128
    assert [m.id for m in openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEYS[0]).models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0).embeddings.create(model=MODEL, input="x")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    assert raised.value.body["type"] == "invalid_request_error"


def test_every_endpoint_but_health_metrics_and_ui_needs_the_key(keyed):
    image = base64.b64encode(png_bytes(toy_image())).decode()
    calls = [("POST", "/classify_json", {"json": {"request": {"images": [image], "labels": ["a", "b"]}}}),
             ("POST", "/embed_text", {"json": {"labels": ["a"]}}), ("POST", "/info", {"json": {}}),
             ("POST", "/probe", {"json": {}}), ("GET", "/docs.json", {}), ("GET", "/", {}),
             ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": "x"}}), ("GET", "/v1/models", {}),
             ("POST", HF_ROUTE, {"json": {"inputs": image, "parameters": {"candidate_labels": ["a", "b"]}}})]
    for method, path, options in calls:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEYS[0]}"},
                        {"Authorization": KEYS[0]}):
            response = httpx.request(method, f"{keyed.url}{path}", headers=headers, timeout=60, **options)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            error = response.json()["error"]
            if path.startswith("/v1/"):
                assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            else:
                assert isinstance(error, str) and "API key" in error
    with_key = {"Authorization": f"bearer {KEYS[0]}"}  # the scheme's case does not matter
    assert httpx.post(f"{keyed.url}/info", json={}, headers=with_key).json()["model"] == MODEL
    for path in ("/readyz", "/livez", "/healthz", "/metrics"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200, path
    for path in ("/ui", "/ui/", "/ui/index.html"):  # another engineer's page: public, whatever it answers
        assert httpx.get(f"{keyed.url}{path}").status_code != 401, path
    assert httpx.get(f"{keyed.url}/uix").status_code == 401  # a prefix of a path is not the /ui folder


def test_the_log_says_how_many_keys_and_never_a_key(keyed, server):
    log = keyed.log.read_text()
    assert "API keys: on, 2 keys from CAPT_API_KEYS_FILE" in log
    assert not any(key in log for key in KEYS)
    assert "API keys: off" in server.log.read_text()  # the shared server, started without keys


@pytest.mark.parametrize("environ,message", [
    ({"CAPT_API_KEY": ""}, "CAPT_API_KEY is empty"),
    ({"CAPT_API_KEY": "   "}, "CAPT_API_KEY is empty"),
    ({"CAPT_API_KEY": "two words"}, "spaces"),
    ({"CAPT_API_KEY": "clé"}, "non-ASCII"),
    ({"CAPT_API_KEYS_FILE": ""}, "CAPT_API_KEYS_FILE is empty"),
    ({"CAPT_API_KEYS_FILE": "/nonexistent/keys"}, "cannot read"),
    ({"CAPT_API_KEYS_FILE": "EMPTY_FILE"}, "holds no key"),
    ({"CAPT_API_KEY": "k", "CAPT_API_KEYS_FILE": "EMPTY_FILE"}, "not both"),
])
def test_unusable_key_settings_are_errors_not_auth_off(tmp_path, environ, message):
    empty = tmp_path / "keys"
    empty.write_text("# only a comment\n\n")
    environ = {k: str(empty) if v == "EMPTY_FILE" else v for k, v in environ.items()}
    with pytest.raises(auth.ApiKeyConfigError, match=message):
        auth.load_api_keys(environ)


def test_keys_load_from_either_variable_and_compare_in_full():
    assert auth.load_api_keys({}) is None
    assert auth.load_api_keys({"CAPT_API_KEY": " k1 "}) == (b"k1",)
    keys = (b"first-key", b"second-key")
    assert auth.key_matches(b"second-key", keys) and not auth.key_matches(b"second-ke", keys)
    assert not auth.key_matches(b"", keys) and not auth.key_matches(b"second-key\x00", keys)
    assert auth.bearer_token([(b"authorization", b"Bearer  abc ")]) == b"abc"
    assert auth.bearer_token([(b"authorization", b"Bearer")]) is None


def test_an_empty_key_file_stops_the_server_at_start(default_bundle, tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("\n# no keys yet\n")
    with bentoml_serve(default_bundle, tmp_path / "serve.log", {"CAPT_API_KEYS_FILE": empty}, ready_within=60,
                       check=False) as running:
        assert running.process.wait(timeout=60) != 0
    assert "holds no key" in running.log.read_text()
