"""Request-schema fuzzing with hypothesis against a real `bentoml serve`: whatever the body, the answer
is never a 5xx (a probe stopped by its time limit, 503, is excluded by keeping fuzzed probes short)."""
import base64
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import png_bytes, toy_image

SMALL_PNG = base64.b64encode(png_bytes(toy_image().resize((16, 16)))).decode()
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=10)
labels = st.lists(st.text(max_size=30), max_size=6) | json_values
images = st.lists(st.sampled_from([SMALL_PNG, f"data:image/png;base64,{SMALL_PNG}"]) | st.text(max_size=40),
                  max_size=3) | json_values
classify_bodies = st.fixed_dictionaries(
    {"images": images, "labels": labels},
    optional={"templates": st.lists(st.text(max_size=20), max_size=3) | json_values,
              "top_k": st.integers() | json_values, "unexpected": json_values})


@FUZZ
@given(body=classify_bodies, wrap=st.booleans())
def test_classify_json_never_5xx(server, body, wrap):
    response = httpx.post(f"{server.url}/classify_json", json={"request": body} if wrap else body, timeout=60)
    assert response.status_code < 500, response.text


@FUZZ
@given(labels=labels, templates=st.none() | labels)
def test_embed_text_never_5xx(server, labels, templates):
    body = {"labels": labels} if templates is None else {"labels": labels, "templates": templates}
    response = httpx.post(f"{server.url}/embed_text", json=body, timeout=60)
    assert response.status_code < 500, response.text


form_values = st.text(max_size=20) | st.integers().map(str) | st.floats().map(str) | json_values.map(json.dumps)
probe_fields = st.fixed_dictionaries(
    {"labels": (st.lists(st.text(max_size=15), max_size=4) | json_values).map(json.dumps)},
    optional={"eps": st.floats(-1, 0.2).map(str) | form_values,
              "steps": st.integers(-5, 5).map(str) | st.integers(201, 10**12).map(str) | form_values,
              "restarts": st.integers(-2, 2).map(str) | form_values,
              "true_label": form_values, "seed": form_values, "search_eps": form_values,
              "return_images": form_values, "step_size": form_values, "surprise": form_values,
              "attack": st.sampled_from(["apgd", "pgd"]) | form_values,
              "space": st.sampled_from(["input", "upload"]) | form_values})


@FUZZ
@given(fields=probe_fields, image=st.sampled_from([png_bytes(toy_image().resize((16, 16))), b"", b"\x89PNG junk"]))
def test_probe_form_never_5xx(server, fields, image):
    if fields.get("search_eps", "").lower() in ("true", "1", "yes", "on"):
        fields["search_eps"] = "false"  # an eps search with fuzzed steps may legitimately run into the time limit
    response = httpx.post(f"{server.url}/probe", files=[("image", ("x.png", image, "image/png"))], data=fields,
                          timeout=60)
    assert response.status_code < 500, response.text
