"""Image encoder throughput: ONNX Runtime vs PyTorch eager (and torch.compile), per model and batch,
with the fraction of the machine's measured fp32 matmul peak each reaches.

Both sides run the same prompted model (MaPLe-style prompts as in tests/test_export.py, random CLIP
weights from one seed, so every process builds identical weights); the parent checks that by
comparing the embeddings each side returns for one fixed input. ONNX graphs are exported once and
cached under benchmarks/.cache/encoder.

    python -m benchmarks.encoder [--quick] [--output benchmarks/results/encoder.json]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import CACHE_DIR, REPO_ROOT, error_text, files_digest, main, ratio, report, \
    run_worker, time_calls

SEED = 0
# The multi-modal prompts of tests/test_export.py; PromptedCLIP caps the depth at the model's layers (tiny: 3).
PROMPT = {"text_n_ctx": 2, "text_depth": 9, "vision_n_ctx": 2, "vision_depth": 9, "coupling": "maple"}
MATMUL_SIZE = 2048
PARITY_BATCH = 1  # a batch every plan times, so torch.compile needs no extra graph


def build_model(name: str):
    """The prompted model of ``name`` with random CLIP weights: the same weights in every process."""
    import torch

    from capt.models import create_clip
    from capt.prompts import PromptConfig, PromptedCLIP
    torch.manual_seed(SEED)
    model = PromptedCLIP(create_clip(name, None), PromptConfig(**PROMPT))
    # Nothing is trained here; frozen prompts also keep FlopCounterMode's module tracker working.
    return model.eval().requires_grad_(False)


def image_size(name: str) -> int:
    """Input size from the model config, without building the model."""
    import open_clip

    from capt.models import register_model_configs
    register_model_configs()
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def parity_input(size: int):
    """One fixed input, generated identically by numpy in every process."""
    import numpy as np
    return np.random.default_rng(123).random((PARITY_BATCH, 3, size, size), dtype=np.float32)


def graph_path(name: str, precision: str = "fp32") -> Path:
    """Where the exported graph of ``name`` lives: keyed by everything that changes its weights or ops."""
    from importlib import metadata
    sources = [REPO_ROOT / "capt" / "prompts.py", REPO_ROOT / "capt" / "models.py", REPO_ROOT / "export" / "onnx_export.py"]
    config = REPO_ROOT / "models" / f"{name}.json"
    extra = json.dumps([PROMPT, SEED, precision, metadata.version("torch"), metadata.version("open_clip_torch")])
    key = files_digest(*sources, *([config] if config.is_file() else []), extra=extra)
    return CACHE_DIR / "encoder" / f"{name}-{precision}-{key}.onnx"


# ---- workers (each in its own process) ------------------------------------------------------------
def worker_export(config: dict) -> dict:
    """Export the image encoder graph of ``config["model"]`` (fp32 or fp16) unless cached."""
    import copy

    import torch

    from export.onnx_export import DEFAULT_OPSET, EncoderGraph, _export
    path = graph_path(config["model"], config.get("precision", "fp32"))
    size = image_size(config["model"])
    if path.is_file():
        return {"path": str(path), "size": size, "cached": True}
    started = time.perf_counter()
    model = build_model(config["model"])
    if config.get("precision") == "fp16":  # as export_bundle(precision="fp16") does
        model = copy.deepcopy(model).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    _export(EncoderGraph(model, "encode_image"), torch.rand(2, 3, size, size), "pixels", partial, DEFAULT_OPSET)
    partial.rename(path)
    return {"path": str(path), "size": size, "cached": False, "export_s": round(time.perf_counter() - started, 1)}


def worker_peak(config: dict) -> dict:
    """The machine's practical fp32 peak: a large square matmul in torch (MKL/oneDNN GEMM)."""
    import torch
    n = config.get("size", MATMUL_SIZE)
    a, b = torch.rand(n, n), torch.rand(n, n)
    timing = time_calls(lambda: a @ b, warmup=2, repeats=config.get("repeats", 10), max_seconds=10)
    # The fastest call, not the median: a peak is the best the machine can do.
    return {"size": n, "flops_per_s": 2 * n ** 3 / timing["min_s"], "torch_threads": torch.get_num_threads(), **timing}


def count_flops(model, size: int) -> int:
    """FLOPs of one image through the encoder: matmuls and the patch convolution, counted by
    FlopCounterMode on a forward with gradients on (otherwise nn.MultiheadAttention takes its fused
    inference path, which the counter does not see), plus the attention products QK^T and AV, which
    it does not count for CPU scaled_dot_product_attention (4 * tokens^2 * width per layer)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    pixels = torch.rand(1, 3, size, size, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(pixels)
    counted = counter.get_total_flops()
    visual = model.clip.visual
    tokens = visual.grid_size[0] * visual.grid_size[1] + 1 + model.config.vision_n_ctx
    counted_ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    if not any("attention" in op for op in counted_ops):
        counted += 4 * tokens ** 2 * visual.transformer.width * len(visual.transformer.resblocks)
    return int(counted)


def _torch_side(config: dict, compiled: bool) -> dict:
    import torch
    results = {"torch_threads": torch.get_num_threads(), "models": {}}
    for name, batches in config["models"].items():
        model = build_model(name)
        size = model.preprocess_cfg["size"]
        size = size if isinstance(size, int) else size[0]
        entry = {"flops_per_image": count_flops(model, size), "batches": {}}
        encode = model.encode_image
        if compiled:
            # One static graph per batch size (dynamic=False): what a server with fixed batches would run.
            encode = torch.compile(model.encode_image, dynamic=False)
        for batch in batches:
            pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            try:
                with torch.inference_mode():
                    started = time.perf_counter()
                    encode(pixels)  # compiles (compiled side) or warms up (eager)
                    first_call_s = time.perf_counter() - started
                    timing = time_calls(lambda: encode(pixels), warmup=config["warmup"], repeats=config["repeats"],
                                        max_seconds=config["max_seconds"])
            except Exception as err:  # noqa: BLE001 - torch.compile can fail on some setups: record why
                entry["batches"][str(batch)] = {"error": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                continue
            entry["batches"][str(batch)] = {"images_per_s": batch / timing["median_s"], "first_call_s": round(first_call_s, 2),
                                            **timing}
        if not compiled or all("error" not in b for b in entry["batches"].values()):
            with torch.inference_mode():
                entry["parity_output"] = encode(torch.from_numpy(parity_input(size))).tolist()
        results["models"][name] = entry
    return results


def worker_eager(config: dict) -> dict:
    return _torch_side(config, compiled=False)


def worker_compile(config: dict) -> dict:
    return _torch_side(config, compiled=True)


def worker_ort(config: dict) -> dict:
    import numpy as np

    from export.bundle import onnx_session
    results = {"models": {}}
    for name, spec in config["models"].items():
        # A model may name its own providers and their options (gpu.py: TensorRT with fp16 beside CUDA).
        session = onnx_session(spec["path"], spec.get("providers") or config.get("providers", ["CPUExecutionProvider"]),
                               spinning=True, provider_options=spec.get("provider_options"))
        size = spec["size"]
        provider = session.get_providers()[0]
        entry = {"provider": provider, "provider_options": session.get_provider_options().get(provider, {}), "batches": {}}
        for batch in spec["batches"]:
            pixels = np.random.default_rng(batch).random((batch, 3, size, size), dtype=np.float32)
            run = lambda: session.run(None, {"pixels": pixels})  # noqa: E731
            timing = time_calls(run, warmup=config["warmup"] + 1, repeats=config["repeats"], max_seconds=config["max_seconds"])
            entry["batches"][str(batch)] = {"images_per_s": batch / timing["median_s"], **timing}
        entry["parity_output"] = session.run(None, {"pixels": parity_input(size)})[0].tolist()
        results["models"][name] = entry
    return results


WORKERS = {"export": worker_export, "peak": worker_peak, "eager": worker_eager, "compile": worker_compile,
           "ort": worker_ort}


# ---- the comparison -----------------------------------------------------------------------------
def _max_abs_diff(a, b) -> float | None:
    import numpy as np
    if a is None or b is None:
        return None
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def run(quick: bool) -> dict:
    if quick:  # ViT-B-32 at batch 32 takes seconds per call on 2 cores, and compiling ~15-60 s per model and batch
        plan = {"capt-tiny-vit": [1, 8, 32], "ViT-B-32": [1, 8]}
        compile_plan = {"capt-tiny-vit": [1]}
        timing = {"warmup": 1, "repeats": 5, "max_seconds": 2}
    else:
        plan = {"capt-tiny-vit": [1, 8, 32], "ViT-B-32": [1, 8, 32]}
        compile_plan = plan
        timing = {"warmup": 2, "repeats": 20, "max_seconds": 10}
    notes = []
    peaks = [run_worker("encoder", "peak", {"repeats": 5 if quick else 10})]
    exports = {name: run_worker("encoder", "export", {"model": name}) for name in plan}
    ort = run_worker("encoder", "ort", {**timing, "models": {
        name: {"path": exports[name]["path"], "size": exports[name]["size"], "batches": batches} for name, batches in plan.items()}})
    eager = run_worker("encoder", "eager", {**timing, "models": plan})
    try:
        compiled = run_worker("encoder", "compile", {**timing, "models": compile_plan}, timeout=3600)
    except Exception as err:  # noqa: BLE001 - the whole compile worker died (e.g. no C++ compiler)
        compiled = {"models": {}, "error": f"failed: {error_text(err)}"}
        notes.append(f"torch.compile {compiled['error']}")
    if compile_plan != plan:
        notes.append(f"--quick: torch.compile only for {compile_plan} (compiling takes ~15-60 s per model and batch on 2 cores)")
    # Peak again at the end: the machine's best of both (a busy neighbour at one moment lowers one of them).
    peaks.append(run_worker("encoder", "peak", {"repeats": 5 if quick else 10}))
    peak = max(peaks, key=lambda p: p["flops_per_s"])

    rows, parity = [], {}
    for name, batches in plan.items():
        flops = eager["models"][name]["flops_per_image"]
        compiled_model = compiled["models"].get(name, {})
        parity[name] = {"ort_vs_eager": _max_abs_diff(ort["models"][name]["parity_output"], eager["models"][name]["parity_output"]),
                        "compile_vs_eager": _max_abs_diff(compiled_model.get("parity_output"), eager["models"][name]["parity_output"])}
        for batch in batches:
            e = eager["models"][name]["batches"][str(batch)]["images_per_s"]
            o = ort["models"][name]["batches"][str(batch)]["images_per_s"]
            c_entry = compiled_model.get("batches", {}).get(str(batch))
            c = c_entry.get("images_per_s") if c_entry else None
            compile_cell = c_entry.get("error") if c_entry else (compiled.get("error") or "not run")
            percent = lambda ips: None if ips is None else round(100 * ips * flops / peak["flops_per_s"], 1)  # noqa: E731
            rows.append({"model": name, "batch": batch, "GFLOP/image": round(flops / 1e9, 4),
                         "eager img/s": round(e, 1), "compile img/s": round(c, 1) if c is not None else compile_cell,
                         "ORT img/s": round(o, 1), "ORT/eager": ratio(o, e), "compile/eager": ratio(c, e),
                         "eager % peak": percent(e), "compile % peak": percent(c), "ORT % peak": percent(o),
                         "compile first call s": c_entry.get("first_call_s") if c_entry else None})
    for name, diffs in parity.items():
        if diffs["ort_vs_eager"] is not None and diffs["ort_vs_eager"] > 1e-3:
            notes.append(f"{name}: ORT and eager embeddings differ by {diffs['ort_vs_eager']:.2e}: not the same model?")
    notes.append(f"peak = {MATMUL_SIZE}x{MATMUL_SIZE} fp32 matmul in torch, measured in this run; '% peak' = "
                 "images/s x FLOPs/image / peak (FLOPs counted with torch's FlopCounterMode, attention products added)")
    notes.append(f"random CLIP weights (seed {SEED}) with prompts {PROMPT} (depth capped at the model's layers); "
                 "inputs in [0, 1], normalisation inside the model/graph")
    summary = {"matmul peak GFLOP/s": round(peak["flops_per_s"] / 1e9, 1), "torch threads": eager["torch_threads"],
               "ORT provider": next(iter(ort["models"].values()))["provider"],
               **{f"max |ORT - eager| {n}": d["ort_vs_eager"] for n, d in parity.items()},
               **{f"max |compile - eager| {n}": d["compile_vs_eager"] for n, d in parity.items() if d["compile_vs_eager"] is not None}}
    columns = ["model", "batch", "GFLOP/image", "eager img/s", "compile img/s", "ORT img/s", "ORT/eager", "compile/eager",
               "eager % peak", "compile % peak", "ORT % peak", "compile first call s"]
    result = report("encoder", "Image encoder: ONNX Runtime vs PyTorch (CPU)", columns, rows, summary, notes)
    result["raw"] = {"peaks": peaks, "exports": exports, "parity": parity,
                     "worker_seconds": {side: r.get("worker_seconds") for side, r in
                                        (("ort", ort), ("eager", eager), ("compile", compiled))}}
    return result


if __name__ == "__main__":
    raise SystemExit(main("encoder", run, WORKERS))
