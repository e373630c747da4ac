import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call would otherwise hang ~46 s before failing
# The tests' own BentoML model store, set before bentoml is first imported (it reads this once).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="capt-tests-bentoml-")
# The tests' own engine cache (derived graphs, measured choices: serving/engine.py): choices measured
# under a test run's load are not recalled by a user's server, nor by the next test run.
os.environ["CAPT_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="capt-tests-engines-")
# Choices are kept even when measured under load (steal time on a shared CI host, a server of the
# previous test still exiting): tests of keeping and recalling must not depend on the machine's
# neighbours. tests/test_contention.py unsets it.
os.environ["CAPT_ENGINE_KEEP_CONTENDED"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from capt import create_clip
from tools.launch import bentoml_serve, png_bytes  # noqa: F401 - png_bytes is the tests' helper too

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(0)
    return create_clip("capt-tiny-vit")


@pytest.fixture(scope="session")
def vitb32_clip():
    torch.manual_seed(0)
    return create_clip("ViT-B-32")


@pytest.fixture
def machine_offers_bf16(monkeypatch):
    """This machine, made to look like a Zen 5: native bf16 (AVX512_BF16), but an untimed rule of fp32.
    The timed ``auto`` paths (training, pretraining, the probe) then time bf16 against fp32 whatever CPU
    runs the test, and only code that asks ``offered_precision`` (not the untimed rule) does so."""
    import capt.hardware
    monkeypatch.setattr(capt.hardware.Hardware, "native_bf16_cpu", property(lambda self: True))
    monkeypatch.setattr(capt.hardware, "recommended_precision", lambda device, hardware=None: "fp32")


def write_colour_folder(root, per_class=6, size=40, seed=0):
    """One folder per colour name of noisy solid-colour images, split into train/ and test/."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype("uint8")).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory):
    """The embedded default model, exported as `make serve` does (without the model store)."""
    from capt import default_model
    from export import export_bundle
    bundle = tmp_path_factory.mktemp("default") / "bundle"
    export_bundle(default_model.PROMPTS, bundle, pretrained=str(default_model.BASE_WEIGHTS), sample_data=default_model.SAMPLE_DATA)
    return bundle


def write_idx_gz(path, array):
    """A gzipped idx file, the format Fashion-MNIST ships in."""
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def toy_image(shape="star", colour="red", seed=0):
    from capt.data.toyworld import Scene, render
    return render(Scene(shape, colour, "large", "plain", 1, "middle"), seed)


# Limits lowered from their defaults so that the tests reach them quickly (and through the environment,
# as an operator would set them).
TEST_LIMITS = {"CAPT_MAX_PROBE_SECONDS": 4, "CAPT_MAX_UPLOAD_BYTES": 2_000_000, "CAPT_MAX_REQUEST_BYTES": 8_000_000,
               "CAPT_MAX_LABELS": 50}


@pytest.fixture(scope="session")
def server(default_bundle, tmp_path_factory):
    """One server for every HTTP test, serving the embedded default model."""
    with bentoml_serve(default_bundle, tmp_path_factory.mktemp("server") / "serve.log", TEST_LIMITS) as running:
        yield running


def post_classify(url, images, labels, **fields):
    """``images``: PIL images or raw bytes."""
    import json
    import httpx
    files = [("images", (f"{i}.png", im if isinstance(im, bytes) else png_bytes(im), "image/png"))
             for i, im in enumerate(images)]
    data = {"labels": json.dumps(labels), **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{url}/classify", files=files, data=data, timeout=60)


def post_probe(url, image, labels, **fields):
    import json
    import httpx
    data = {"labels": json.dumps(labels),
            **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}}
    body = image if isinstance(image, bytes) else png_bytes(image)
    return httpx.post(f"{url}/probe", files=[("image", ("x.png", body, "image/png"))], data=data, timeout=120)


def alter_twin_weights(bundle, into, tensor="visual.proj", scale=0.5, seed=0):
    """A copy of ``bundle`` whose base weights (the probe twin's) differ from the ONNX graphs in
    ``tensor`` by a random perturbation, with the manifest's checksum updated: consistent files, two
    different models (what an export bug or a hand-edited bundle would give)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from export.bundle import MANIFEST, sha256_of
    shutil.copytree(bundle, into)
    weights = into / "open_clip_model.safetensors"
    state = load_file(weights)
    noise = torch.randn(state[tensor].shape, generator=torch.Generator().manual_seed(seed))
    state[tensor] = state[tensor] + scale * state[tensor].abs().mean() * noise
    save_file(state, weights)
    manifest = json.loads((into / MANIFEST).read_text())
    manifest["files"][weights.name] = sha256_of(weights)
    (into / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return into
