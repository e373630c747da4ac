"""Real-photo-sized JPEG uploads: where a ``/classify`` of a photo spends its time (issue #18).

For JPEGs of 1, 4 and 12 megapixels (4:3, quality 90; scikit-learn's sample photo china.jpg (640x427) upscaled, with
Gaussian sensor noise of sigma 4 so that the entropy decoder has a photo's texture to decode):

- **decode + pixels on the CPU**, one thread, exactly as the server turns an upload into the model's
  input (``capt.images``: ``open_image``, ``load_opened_image`` sized for the model, ``pixel_transform``);
- **decode + resize on the GPU** where CUDA is visible (and the same code on the CPU, one thread): ``torchvision.io.decode_jpeg(device="cuda")``
  and an antialiased resize (the model's interpolation, shortest side) and centre crop on the device, with the max |difference| of its
  pixels from the CPU path's (a skip record without CUDA);
- **the image encoder alone** on the model's input size (the server's engine, batch 1 and 8);
- **``POST /classify`` end to end** against ``bentoml serve`` of the default model, one photo a
  request, concurrency 8 (``wrk`` where installed), for each size: requests/s, p50/p99, and the
  server's CPU per request.

    python -m benchmarks.photos [--quick] [--output benchmarks/results/photos.json]

``CAPT_BENCH_BUNDLE=/path/to/bundle`` serves that bundle instead of the default model's export.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks import ceiling
from benchmarks.common import bento_server, default_bundle, main, ratio, report, run_worker, time_calls

MEGAPIXELS = (1, 4, 12)
QUALITY = 90
NOISE_SIGMA = 4.0
CONCURRENCY = 8
CACHE = Path(__file__).resolve().parent / ".cache" / "photos"


def photo_path(megapixels: float, seed: int = 0) -> Path:
    return CACHE / f"photo-{megapixels:g}mp-q{QUALITY}-s{seed}.jpg"


def photo_jpeg(megapixels: float, seed: int = 0) -> bytes:
    """A 4:3 JPEG of about ``megapixels`` (see the module docstring), made once and cached."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = photo_path(megapixels, seed)
    if path.is_file():
        return path.read_bytes()
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = width * 3 // 4
    upscaled = Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(upscaled, dtype=np.float32) + np.random.default_rng(seed).normal(0, NOISE_SIGMA, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def worker_cpu_decode(config: dict) -> dict:
    """The server's own upload path on one thread, per photo size: decode + pixels."""
    import numpy as np
    import torch

    from serving.images import decode_image
    from serving.model import Limits, ServingModel
    torch.set_num_threads(1)
    model = ServingModel(config["bundle"], Limits(), check_twin=False)
    limits = model.limits

    def upload_pixels(data: bytes):  # the server's upload path: decode within the limits, then the model's pixels
        return model.pixels([decode_image(data, limits.max_upload_bytes, limits.max_image_pixels)])
    results = {}
    for name, path in config["photos"].items():
        data = Path(path).read_bytes()
        timing = time_calls(lambda: upload_pixels(data), warmup=1, repeats=config["repeats"],
                            max_seconds=config["max_seconds"])
        results[name] = {"images_per_s": 1 / timing["median_s"], **timing}
        np.save(config["pixels_out"][name], upload_pixels(data)[0])
    return {"decode": results, "engine": model.engine.name, "encoder": _time_encoder(model, config),
            "preprocess": dict(model.torch_model.preprocess_cfg)}


def _time_encoder(model, config: dict) -> dict:
    import numpy as np
    size = int(model.bundle.manifest["inputs"]["image"]["shape"][-1])
    out = {}
    for batch in (1, 8):
        pixels = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        timing = time_calls(lambda: model.engine.encode(pixels), warmup=3, repeats=config["repeats"] * 5,
                            max_seconds=config["max_seconds"])
        out[str(batch)] = batch / timing["median_s"]
    return out


def worker_gpu_decode(config: dict) -> dict:
    """torchvision's nvJPEG decode and a resize + centre crop on the GPU, per photo size (pixels from
    host bytes to a device tensor in [0, 1] of the model's size, synchronised). ``device`` "cpu" runs the
    same code on torchvision's CPU decoder (a dry run of this side without a GPU)."""
    import numpy as np
    import torch
    device = config.get("device", "cuda")
    if device == "cpu":
        torch.set_num_threads(1)  # as the CPU side's figure
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    size, preprocess = config["size"], config["preprocess"]
    sides = preprocess["size"] if isinstance(preprocess["size"], (list, tuple)) else [preprocess["size"]] * 2
    if preprocess.get("resize_mode", "shortest") != "shortest" or len(set(sides)) != 1:
        return {"skipped": "the GPU side does the shortest-side resize of square models only, not "
                           f"{preprocess.get('resize_mode')} to {preprocess['size']}"}
    interpolation = F.InterpolationMode(preprocess.get("interpolation", "bicubic"))
    results = {}
    for name, path in config["photos"].items():
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

        def pixels() -> torch.Tensor:
            image = decode_jpeg(data, device=device)
            image = F.resize(image, size, interpolation=interpolation, antialias=True)
            image = F.center_crop(image, [size, size])
            out = (image.float() / 255).clamp_(0, 1)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        timing = time_calls(pixels, warmup=3, repeats=config["repeats"], max_seconds=config["max_seconds"])
        difference = np.abs(pixels().cpu().numpy() - np.load(config["pixels_in"][name]))
        results[name] = {"images_per_s": 1 / timing["median_s"], **timing,
                         "max_abs_diff_vs_cpu": float(difference.max()), "mean_abs_diff_vs_cpu": float(difference.mean())}
    return {"decode": results, "device": torch.cuda.get_device_name(0) if device == "cuda" else device}


def run(quick: bool) -> dict:
    import tempfile
    seconds, warmup = (4, 1) if quick else (12, 2)
    timing = {"repeats": 5 if quick else 20, "max_seconds": 3 if quick else 10}
    sizes = MEGAPIXELS[:2] if quick else MEGAPIXELS
    bundle = Path(os.environ["CAPT_BENCH_BUNDLE"]) if os.environ.get("CAPT_BENCH_BUNDLE") else default_bundle()
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    photos = {f"{mp} MP": photo_jpeg(mp) for mp in sizes}
    paths = {name: str(photo_path(mp)) for name, mp in zip(photos, sizes)}
    with tempfile.TemporaryDirectory(prefix="capt-bench-photos-") as tmp:
        pixel_files = {name: str(Path(tmp) / f"{i}.npy") for i, name in enumerate(photos)}
        cpu = run_worker("photos", "cpu_decode", {"bundle": str(bundle), "photos": paths, "pixels_out": pixel_files,
                                                  **timing})
        size = int(json.loads((bundle / "manifest.json").read_text())["inputs"]["image"]["shape"][-1])
        torchvision_side = {"photos": paths, "pixels_in": pixel_files, "size": size, "preprocess": cpu["preprocess"],
                            **timing}
        gpu = run_worker("photos", "gpu_decode", torchvision_side)
        # The same torchvision code on the CPU, one thread: is it a faster CPU path with the same pixels?
        tv_cpu = run_worker("photos", "gpu_decode", {**torchvision_side, "device": "cpu"})
    client = ceiling.load_generator()
    http = {}
    with bento_server(bundle) as server:
        for name, data in photos.items():
            ceiling.drive(client, server.url, [data], labels, CONCURRENCY, warmup)
            pids = ceiling.worker_processes(server.process.pid)
            before = {pid: ceiling.cpu_seconds(pid) for pid in pids}
            started = time.perf_counter()
            measured = ceiling.drive(client, server.url, [data], labels, CONCURRENCY, seconds)
            busy = sum(ceiling.cpu_seconds(pid) - before[pid] for pid in pids) / (time.perf_counter() - started)
            http[name] = {**measured, "server_cpu_cores": round(busy, 2)}
    rows = []
    for name, data in photos.items():
        decode = cpu["decode"][name]["images_per_s"]
        served = http[name]["images_per_s"]
        gpu_row = gpu.get("decode", {}).get(name, {})
        tv_row = tv_cpu.get("decode", {}).get(name, {})
        rows.append({"photo": name, "JPEG KiB": len(data) // 1024,
                     "CPU decode+pixels img/s (1 thread)": round(decode, 1),
                     "torchvision on CPU img/s (1 thread)": round(tv_row["images_per_s"], 1) if tv_row else "-",
                     "its |diff|, max / mean": (f"{tv_row['max_abs_diff_vs_cpu']:.4f} / "
                                                f"{tv_row['mean_abs_diff_vs_cpu']:.5f}") if tv_row else "-",
                     "GPU decode+resize img/s": round(gpu_row["images_per_s"], 1) if gpu_row else "-",
                     "GPU |diff| vs CPU pixels, max / mean": (f"{gpu_row['max_abs_diff_vs_cpu']:.4f} / "
                                                              f"{gpu_row['mean_abs_diff_vs_cpu']:.4f}") if gpu_row else "-",
                     "/classify req/s": round(served, 1),
                     "/classify p50 ms": round(http[name]["p50_ms"], 1),
                     "server CPU ms/req": round(1000 * http[name]["server_cpu_cores"] / served, 2) if served else "-",
                     "errors": http[name]["errors"]})
    encoder = cpu["encoder"]
    summary = {f"{name}: /classify req/s / CPU decode img/s": ratio(http[name]["images_per_s"], cpu["decode"][name]["images_per_s"])
               for name in photos}
    summary[f"image encoder alone ({cpu['engine']}), img/s at batch 1 / 8"] = (
        f"{encoder['1']:.1f} / {encoder['8']:.1f}")
    notes = [f"photos: scikit-learn's china.jpg upscaled to 4:3 with Gaussian noise (sigma {NOISE_SIGMA:g}), JPEG "
             f"quality {QUALITY}, one photo per request, the default model's {len(labels)} labels, top_k 5",
             f"/classify: bentoml serve, 1 API worker, concurrency {CONCURRENCY} for {seconds} s after {warmup} s of "
             f"warm-up, load from {client}; server CPU: cores of the worker processes over the window",
             "CPU decode+pixels: serving.images.decode_image and ServingModel.pixels on one thread (what a request costs the server's CPU "
             "before the encoder)",
             "torchvision on CPU: the GPU side's code (decode_jpeg, uint8 antialiased resize, centre crop) on "
             "the CPU, one thread; |diff| against the server's pixels",
             gpu.get("skipped") or f"GPU decode: torchvision.io.decode_jpeg on {gpu.get('device')}, then an antialiased "
             "resize (the model's interpolation) and centre crop on the device; the CPU path's pixels are the reference"]
    columns = ["photo", "JPEG KiB", "CPU decode+pixels img/s (1 thread)", "torchvision on CPU img/s (1 thread)",
               "its |diff|, max / mean", "GPU decode+resize img/s",
               "GPU |diff| vs CPU pixels, max / mean", "/classify req/s", "/classify p50 ms", "server CPU ms/req", "errors"]
    result = report("photos", "Photo-sized JPEG uploads: decoding against the model, and /classify end to end",
                    columns, rows, summary, notes)
    result["raw"] = {"cpu": cpu, "gpu": gpu, "torchvision_cpu": tv_cpu, "http": http}
    return result


WORKERS = {"cpu_decode": worker_cpu_decode, "gpu_decode": worker_gpu_decode}


if __name__ == "__main__":
    raise SystemExit(main("photos", run, WORKERS))
