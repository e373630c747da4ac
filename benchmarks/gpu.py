"""GPU: the ViT-B-32 image encoder (random weights, the prompts of benchmarks/encoder.py) at batch
64 through ONNX Runtime's CUDA provider, fp32 and fp16 graphs (fp16 made as
``export_bundle(precision="fp16")`` makes it), against PyTorch CUDA eager fp32 and fp16 autocast.
Prints a skip record where ``torch.cuda.is_available()`` is false.

Every side takes pixels from host memory and returns embeddings to host memory (as a server does),
so host-device copies are inside every figure.

    python -m benchmarks.gpu [--quick] [--output benchmarks/results/gpu.json]
"""
from __future__ import annotations

from benchmarks.common import main, ratio, report, run_worker, time_calls
from benchmarks.encoder import build_model, parity_input

MODEL = "ViT-B-32"
BATCH = 64
DEVICE = "cuda"
PROVIDERS = ["CUDAExecutionProvider"]
TITLE = f"GPU: {MODEL} image encoder, ONNX Runtime CUDA vs PyTorch CUDA (batch {BATCH})"


def worker_cuda(config: dict) -> dict:
    import torch
    available = torch.cuda.is_available()
    return {"available": available, "device": torch.cuda.get_device_name(0) if available else None,
            "torch_cuda": torch.version.cuda}


def worker_torch(config: dict) -> dict:
    """PyTorch eager fp32 and fp16 autocast on the device."""
    import contextlib

    import torch
    device, batch = config["device"], config["batch"]
    model = build_model(config["model"]).to(device)
    size = config["size"]
    host = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    contexts = {"fp32": contextlib.nullcontext,
                "fp16 autocast": lambda: torch.autocast(torch.device(device).type, dtype=torch.float16)}
    results = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
               "variants": {}}
    for variant, context in contexts.items():
        def encode(pixels):
            with torch.inference_mode(), context():
                return model.encode_image(pixels.to(device)).float().cpu()  # .cpu() waits for the device
        try:
            timing = time_calls(lambda: encode(host), warmup=config["warmup"], repeats=config["repeats"],
                                max_seconds=config["max_seconds"])
        except Exception as err:  # noqa: BLE001 - e.g. fp16 autocast unsupported on this device: record it
            results["variants"][variant] = {"error": f"failed: {type(err).__name__}: {err}"[:300]}
            continue
        results["variants"][variant] = {"images_per_s": batch / timing["median_s"], **timing,
                                        "parity_output": encode(torch.from_numpy(parity_input(size))).tolist()}
    return results


WORKERS = {"cuda": worker_cuda, "torch": worker_torch}


def _max_abs_diff(a, b) -> float | None:
    import numpy as np
    return None if a is None or b is None else float(np.abs(np.asarray(a) - np.asarray(b)).max())


def run(quick: bool) -> dict:
    cuda = run_worker("gpu", "cuda") if DEVICE == "cuda" else {"available": True, "device": DEVICE}
    if not cuda["available"]:
        result = report("gpu", TITLE, [], [], {}, [])
        result["skipped"] = "no CUDA device (torch.cuda.is_available() is False)"
        return result
    timing = {"warmup": 3, "repeats": 10 if quick else 100, "max_seconds": 5 if quick else 20}
    exports = {p: run_worker("encoder", "export", {"model": MODEL, "precision": p}) for p in ("fp32", "fp16")}
    size = exports["fp32"]["size"]
    ort = run_worker("encoder", "ort", {**timing, "providers": PROVIDERS, "models": {
        p: {"path": e["path"], "size": size, "batches": [BATCH]} for p, e in exports.items()}})
    eager = run_worker("gpu", "torch", {**timing, "device": DEVICE, "model": MODEL, "size": size, "batch": BATCH})

    reference = eager["variants"]["fp32"]
    rows = []
    for precision, entry in ort["models"].items():
        ips = entry["batches"][str(BATCH)]["images_per_s"]
        rows.append({"side": f"ORT {entry['provider']} {precision}", "img/s": round(ips, 1),
                     "vs torch fp32": ratio(ips, reference.get("images_per_s")),
                     "max |diff| vs torch fp32": _max_abs_diff(entry["parity_output"], reference.get("parity_output"))})
    for variant, entry in eager["variants"].items():
        ips = entry.get("images_per_s")
        rows.append({"side": f"torch {DEVICE} {variant}", "img/s": round(ips, 1) if ips else entry.get("error"),
                     "vs torch fp32": ratio(ips, reference.get("images_per_s")),
                     "max |diff| vs torch fp32": _max_abs_diff(entry.get("parity_output"), reference.get("parity_output"))})
    notes = [f"device: {cuda.get('device')}; random {MODEL} weights with the prompts of benchmarks/encoder.py; "
             "pixels from host memory, embeddings back to host memory on every side",
             f"torch TF32 matmul: {eager['tf32_matmul']} (ONNX Runtime's CUDA provider options are in raw.ort)"]
    if any(entry["provider"] != "CUDAExecutionProvider" for entry in ort["models"].values()):
        notes.append("ONNX Runtime did not run on CUDA (fell back to CPU): check onnxruntime-gpu and the CUDA libraries")
    result = report("gpu", TITLE, ["side", "img/s", "vs torch fp32", "max |diff| vs torch fp32"], rows,
                    {"ORT fp16 / torch fp32": rows[1]["vs torch fp32"], "ORT fp32 / torch fp32": rows[0]["vs torch fp32"]},
                    notes)
    result["raw"] = {"cuda": cuda, "exports": exports,
                     "ort": {p: {k: v for k, v in e.items() if k != "parity_output"} for p, e in ort["models"].items()}}
    return result


if __name__ == "__main__":
    raise SystemExit(main("gpu", run, WORKERS))
