"""One way an image becomes pixels: a file gives the same pixels through `capt eval`'s dataset (and so
training and the export's samples) as through `/classify`, including the files where a plain
`Image.open(...).convert("RGB")` sees something else than a person (and the server) does."""
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from capt.data import load_dataset
from capt.images import pixel_transform
from conftest import png_bytes, toy_image
from export.bundle import load_bundle
from serving.images import read_upload


def _files(folder):
    """An EXIF-rotated JPEG (what a phone writes), an RGBA PNG with a transparent half, a 16-bit PNG
    and a non-square image, one class folder each."""
    star = toy_image("star", "red", seed=3).resize((64, 64))
    upright = np.asarray(star)
    files = {}
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated 90 degrees; rotate 90 CW to display
    files["rotated/0.jpg"] = png_bytes(Image.fromarray(np.rot90(upright, k=-1).copy()), "JPEG", exif=exif, quality=95)
    rgba = np.dstack([upright, np.full(upright.shape[:2], 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half transparent: white on a page, black under a plain convert("RGB")
    rgba[:, :32, :3] = 0
    files["transparent/0.png"] = png_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    grey16 = (np.asarray(star.convert("L"), np.uint16) * 257)
    files["sixteen/0.png"] = png_bytes(Image.fromarray(grey16), "PNG")
    files["wide/0.png"] = png_bytes(star.resize((96, 64)), "PNG")
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-path")
    return root, _files(root)


def test_a_dataset_and_an_upload_of_the_same_file_give_identical_pixels(folder, served):
    root, files = folder
    data = load_dataset(f"imagefolder:{root}", served.transform)
    by_class = {data.classnames[label]: index for index, label in enumerate(data.labels)}
    for name in files:
        dataset_pixels = data.dataset[by_class[name.split("/")[0]]][0]
        upload = read_upload(root / name, served.limits.max_upload_bytes, served.limits.max_image_pixels)
        served_pixels = torch.from_numpy(served.pixels([upload]))[0]
        assert torch.equal(dataset_pixels, served_pixels), name
        # Control: torchvision's own loader sees another image in these files.
        plain = served.transform(Image.open(root / name).convert("RGB"))
        if name.split("/")[0] in ("rotated", "transparent"):
            assert (plain - served_pixels).abs().max() > 0.5, name


def _served_engine(server, default_bundle):
    """The server's image engine (``/info``), built here on the same graph: an image's embedding by the
    engine that served it (auto may serve another path than the exported fp32 graph, e.g. onnx-int8)."""
    from capt.hardware import detect
    from serving.engine import candidates
    report = httpx.post(f"{server.url}/info", json={}, timeout=60).json()["image_engine"]
    name = report["serving"]
    bundle = load_bundle(default_bundle, ["CPUExecutionProvider"], check=False)
    engine = next(c for c in candidates(bundle, detect()) if c.name == name).build()
    served_row = next(row for row in report["candidates"] if row["name"] == name)
    if served_row.get("fixed_batch"):  # torch-bf16: its chunk size changes its answers; take the server's
        engine.fixed_batch = served_row["fixed_batch"]
    return engine


def test_classify_sees_the_pixels_evaluation_sees(folder, server, default_bundle):
    root, files = folder
    preprocess = json.loads((default_bundle / "manifest.json").read_text())["preprocess"]
    data = load_dataset(f"imagefolder:{root}", pixel_transform(preprocess))
    engine = _served_engine(server, default_bundle)
    for index, label in enumerate(data.labels):
        name = f"{data.classnames[label]}/{'0.jpg' if data.classnames[label] == 'rotated' else '0.png'}"
        expected = engine.encode(data.dataset[index][0][None].numpy())[0]
        answer = httpx.post(f"{server.url}/embed_image", files=[("images", (name, files[name], "image/png"))], timeout=60)
        assert answer.status_code == 200, answer.text
        served = np.asarray(answer.json()["embeddings"][0])
        assert np.abs(served - expected).max() < 1e-5, (name, engine.name)
        if data.classnames[label] in ("rotated", "transparent"):  # what a plain convert("RGB") would have sent
            plain = pixel_transform(preprocess)(Image.open(root / name).convert("RGB"))
            assert np.abs(engine.encode(plain[None].numpy())[0] - served).max() > 1e-2, name


def test_longest_resize_mode_pads_instead_of_cropping():
    # open_clip's own transform: "longest" fits the whole image and pads (fill_color), "shortest" crops.
    wide = Image.new("RGB", (64, 32), (255, 255, 255))
    longest = pixel_transform({"size": 32, "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 0})(wide)
    shortest = pixel_transform({"size": 32, "resize_mode": "shortest", "interpolation": "bicubic"})(wide)
    assert longest.shape == shortest.shape == (3, 32, 32)
    assert torch.all(longest[:, :8] == 0) and torch.all(longest[:, 12:20] == 1)  # padded top, image in the middle
    assert torch.allclose(shortest, torch.ones_like(shortest))


@pytest.fixture(scope="module")
def served(default_bundle):
    from serving.model import ServingModel
    return ServingModel(default_bundle)
