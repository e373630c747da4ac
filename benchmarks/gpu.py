"""GPU: the ViT-B-32 image encoder (random weights, the prompts of benchmarks/encoder.py) at batch 1,
64 and 256 through every GPU path the server can serve and PyTorch: ONNX Runtime's CUDA provider on
the fp32 graph and on the fp16 graph (made as ``export_bundle(precision="fp16")`` makes it), ONNX
Runtime's TensorRT provider with fp16 kernels allowed (the served ``tensorrt`` engine's options,
``serving.engine.tensorrt_options``; its engine build is timed apart), and PyTorch CUDA eager fp32 and
fp16 autocast. Prints a skip record where ``torch.cuda.is_available()`` is false; a path that cannot
run (TensorRT's libraries missing, say) is a row that says why.

Every side takes pixels from host memory and returns embeddings to host memory (as a server does),
so host-device copies are inside every figure. The photo-decoding row of a GPU deployment
(``torchvision.io.decode_jpeg`` on the device against the CPU) is ``benchmarks/photos.py``.

    python -m benchmarks.gpu [--quick] [--output benchmarks/results/gpu.json]
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import error_text, main, ratio, report, run_worker, time_calls
from benchmarks.encoder import _max_abs_diff, build_model, parity_input

MODEL = "ViT-B-32"
BATCHES = (1, 64, 256)
DEVICE = "cuda"
TITLE = f"GPU: {MODEL} image encoder, ONNX Runtime CUDA and TensorRT vs PyTorch CUDA (batch {', '.join(map(str, BATCHES))})"


def worker_cuda(config: dict) -> dict:
    import torch
    available = torch.cuda.is_available()
    return {"available": available, "device": torch.cuda.get_device_name(0) if available else None,
            "torch_cuda": torch.version.cuda}


def worker_torch(config: dict) -> dict:
    """PyTorch eager fp32 and fp16 autocast on the device, at each batch."""
    import contextlib

    import torch
    device = config["device"]
    model = build_model(config["model"]).to(device)
    size = config["size"]
    contexts = {"fp32": contextlib.nullcontext,
                "fp16 autocast": lambda: torch.autocast(torch.device(device).type, dtype=torch.float16)}
    results = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
               "variants": {}}
    for variant, context in contexts.items():
        def encode(pixels):
            with torch.inference_mode(), context():
                return model.encode_image(pixels.to(device)).float().cpu()  # .cpu() waits for the device
        entry = {"batches": {}}
        try:
            for batch in config["batches"]:
                host = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                timing = time_calls(lambda: encode(host), warmup=config["warmup"], repeats=config["repeats"],
                                    max_seconds=config["max_seconds"])
                entry["batches"][str(batch)] = {"images_per_s": batch / timing["median_s"], **timing}
            entry["parity_output"] = encode(torch.from_numpy(parity_input(size))).tolist()
        except Exception as err:  # noqa: BLE001 - e.g. fp16 autocast unsupported on this device: record it
            entry = {"error": error_text(err)}
        results["variants"][variant] = entry
    return results


WORKERS = {"cuda": worker_cuda, "torch": worker_torch}


def ort_sides(exports: dict, size: int) -> dict:
    """The ONNX Runtime sides: name -> the model spec of ``benchmarks.encoder.worker_ort``."""
    from export.bundle import sha256_of
    from serving.engine import tensorrt_options
    options = tensorrt_options(size, sha256_of(Path(exports["fp32"]["path"])))
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return {"ORT CUDA fp32": {"path": exports["fp32"]["path"], "providers": cuda},
            "ORT CUDA fp16": {"path": exports["fp16"]["path"], "providers": cuda},
            "ORT TensorRT fp16": {"path": exports["fp32"]["path"], "provider_options": {"TensorrtExecutionProvider": options},
                                  "providers": ["TensorrtExecutionProvider", *cuda]}}


def run(quick: bool) -> dict:
    cuda = run_worker("gpu", "cuda") if DEVICE == "cuda" else {"available": True, "device": DEVICE}
    if not cuda["available"]:
        result = report("gpu", TITLE, [], [], {}, [])
        result["skipped"] = "no CUDA device (torch.cuda.is_available() is False)"
        return result
    timing = {"warmup": 3, "repeats": 10 if quick else 50, "max_seconds": 5 if quick else 15}
    exports = {p: run_worker("encoder", "export", {"model": MODEL, "precision": p}) for p in ("fp32", "fp16")}
    size = exports["fp32"]["size"]
    ort = {}
    for side, spec in ort_sides(exports, size).items():
        for options in (spec.get("provider_options") or {}).values():
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:  # one process a side: a TensorRT build that fails takes nothing else down
            ort[side] = run_worker("encoder", "ort", {**timing, "models": {
                side: {**spec, "size": size, "batches": list(BATCHES)}}}, timeout=1800)["models"][side]
        except Exception as err:  # noqa: BLE001 - a path that cannot run here is a row that says why
            ort[side] = {"error": error_text(err)}
        ort[side]["worker_s"] = round(time.perf_counter() - started, 1)  # TensorRT: its engine build is most of it
    eager = run_worker("gpu", "torch", {**timing, "device": DEVICE, "model": MODEL, "size": size, "batches": list(BATCHES)})

    reference = eager["variants"]["fp32"]
    sides = {**ort, **{f"torch {DEVICE} {v}": e for v, e in eager["variants"].items()}}
    rows = []
    for side, entry in sides.items():
        row = {"side": side, "provider": entry.get("provider", "torch")}
        if "batches" not in entry:
            rows.append({**row, "note": "not run: " + entry.get("error", "?").splitlines()[-1][:160]})
            continue
        for batch in BATCHES:
            ips = entry["batches"][str(batch)]["images_per_s"]
            row[f"img/s b{batch}"] = round(ips, 1)
            row[f"vs torch fp32 b{batch}"] = ratio(ips, reference.get("batches", {}).get(str(batch), {}).get("images_per_s"))
        row["max |diff| vs torch fp32"] = _max_abs_diff(entry.get("parity_output"), reference.get("parity_output"))
        row["process s"] = entry.get("worker_s", "")
        rows.append(row)
    columns = ["side", "provider", *[c for b in BATCHES for c in (f"img/s b{b}", f"vs torch fp32 b{b}")],
               "max |diff| vs torch fp32", "process s", "note"]
    fastest = {b: max((r for r in rows if f"img/s b{b}" in r), key=lambda r: r[f"img/s b{b}"])["side"] for b in BATCHES}
    summary = {f"fastest at batch {b}": side for b, side in fastest.items()}
    notes = [f"device: {cuda.get('device')}; random {MODEL} weights with the prompts of benchmarks/encoder.py; "
             "pixels from host memory, embeddings back to host memory on every side",
             f"torch TF32 matmul: {eager['tf32_matmul']}",
             "provider: what ONNX Runtime ran the graph on (a GPU side on CPUExecutionProvider fell back: check "
             "onnxruntime-gpu, the CUDA and TensorRT libraries); process s: the side's whole process, session "
             "creation included: TensorRT's engine build where its cache (CAPT_ENGINE_CACHE) was cold"]
    result = report("gpu", TITLE, columns, rows, summary, notes)
    result["raw"] = {"cuda": cuda, "exports": exports,
                     "ort": {s: {k: v for k, v in e.items() if k != "parity_output"} for s, e in ort.items()}}
    return result


if __name__ == "__main__":
    raise SystemExit(main("gpu", run, WORKERS))
