"""The online PGD probe against its floor: a 10-step probe (``ServingModel.probe``, eps 4/255)
against 10 forward+backward passes of the same PyTorch model on the same image, each in its own
process, plus the probe over HTTP. Issue #7's goal: probe / (10 x forward+backward) <= 1.25.

The probe does a little more than 10 gradient steps by design (a clean forward, one gradient for
the sanity check, the margin of the result, and the clean and adversarial images through the
served ONNX graph), so the ratio is that overhead.

    python -m benchmarks.probe [--quick] [--output benchmarks/results/probe.json]
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.common import bento_server, default_bundle, main, png_bytes, ratio, report, run_worker, time_calls, \
    toy_images

EPS, STEPS = 4 / 255, 10


def _labels(bundle: Path) -> list[str]:
    return json.loads((bundle / "manifest.json").read_text())["labels"]


def worker_probe(config: dict) -> dict:
    """``ServingModel.probe`` in process, as the service runs it (minus HTTP)."""
    import torch

    from serving.model import ServingModel
    model = ServingModel(config["bundle"])
    image, labels = toy_images(1)[0], _labels(Path(config["bundle"]))
    timing = time_calls(lambda: model.probe(image, labels, eps=EPS, steps=STEPS, attack="pgd"), warmup=2,
                        repeats=config["repeats"], max_seconds=config["max_seconds"])
    return {"torch_threads": torch.get_num_threads(), **timing}


def worker_forward_backward(config: dict) -> dict:
    """The floor: STEPS x (forward, CE loss, gradient w.r.t. the pixels) of the same prompted model,
    as ``ZeroShotClassifier`` (what PGD differentiates) on the same image."""
    import torch

    from capt.checkpoint import load_prompted_model
    from capt.models import pixel_transform
    from capt.prompts import ZeroShotClassifier
    bundle = Path(config["bundle"])
    model, _ = load_prompted_model(bundle, pretrained=str(bundle / "base_weights.safetensors"))
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, model.encode_text(model.tokenize(_labels(bundle))))
    pixels = pixel_transform(model.preprocess_cfg)(toy_images(1)[0]).unsqueeze(0)
    target = torch.tensor([0])

    def steps() -> None:
        for _ in range(STEPS):
            x = pixels.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(classifier(x), target)
            torch.autograd.grad(loss, x)
    timing = time_calls(steps, warmup=2, repeats=config["repeats"], max_seconds=config["max_seconds"])
    return {"torch_threads": torch.get_num_threads(), **timing}


WORKERS = {"probe": worker_probe, "forward_backward": worker_forward_backward}


def probe_over_http(bundle: Path, repeats: int, env: dict | None = None) -> dict:
    import httpx
    image = png_bytes(toy_images(1)[0])
    data = {"labels": json.dumps(_labels(bundle)), "eps": str(EPS), "steps": str(STEPS), "attack": "pgd"}
    times = []
    with bento_server(bundle, env) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        for i in range(repeats + 2):  # the first two are warm-up
            started = time.perf_counter()
            response = client.post("/probe", files=[("image", ("x.png", image, "image/png"))], data=data)
            if response.status_code != 200:
                raise RuntimeError(f"probe: {response.status_code} {response.text[:300]}")
            if i >= 2:
                times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "calls": len(times)}


def run(quick: bool) -> dict:
    timing = {"repeats": 5 if quick else 30, "max_seconds": 5 if quick else 30}
    bundle = default_bundle()
    floor = run_worker("probe", "forward_backward", {"bundle": str(bundle), **timing})
    probe = run_worker("probe", "probe", {"bundle": str(bundle), **timing})
    over_http = probe_over_http(bundle, 5 if quick else 20)
    one_thread = probe_over_http(bundle, 5 if quick else 20, {"CAPT_PROBE_THREADS": "1"})
    rows = [{"what": f"{STEPS} x forward+backward (torch)", "median ms": round(1000 * floor["median_s"], 1),
             "vs floor": 1.0, "calls": floor["calls"]},
            {"what": f"ServingModel.probe, {STEPS} steps, in process", "median ms": round(1000 * probe["median_s"], 1),
             "vs floor": ratio(probe["median_s"], floor["median_s"]), "calls": probe["calls"]},
            {"what": f"POST /probe, {STEPS} steps", "median ms": round(1000 * over_http["median_s"], 1),
             "vs floor": ratio(over_http["median_s"], floor["median_s"]), "calls": over_http["calls"]},
            {"what": f"POST /probe, {STEPS} steps, CAPT_PROBE_THREADS=1", "median ms": round(1000 * one_thread["median_s"], 1),
             "vs floor": ratio(one_thread["median_s"], floor["median_s"]), "calls": one_thread["calls"]}]
    in_process = rows[1]["vs floor"]
    summary = {"probe / 10 x fwd+bwd": in_process, "goal (issue #7)": "<= 1.25",
               "goal met": None if in_process is None else in_process <= 1.25, "HTTP probe / 10 x fwd+bwd": rows[2]["vs floor"],
               "HTTP probe, 1 thread / 10 x fwd+bwd": rows[3]["vs floor"]}
    notes = [f"default model, one 64x64 toy image, the model's {len(_labels(bundle))} class names, eps 4/255, step eps/4, "
             "one restart; each side in its own process, the HTTP probe against a separate `bentoml serve`",
             "the server runs probes on its worker threads, where PyTorch's OpenMP threads measured slower than on a "
             "process's main thread; CAPT_PROBE_THREADS=1 is the server with one PyTorch thread per probe"]
    result = report("probe", "PGD probe vs 10 x forward+backward (default model, CPU)", ["what", "median ms", "vs floor", "calls"],
                    rows, summary, notes)
    result["raw"] = {"floor": floor, "probe": probe, "http": over_http, "http_one_thread": one_thread}
    return result


if __name__ == "__main__":
    raise SystemExit(main("probe", run, WORKERS))
