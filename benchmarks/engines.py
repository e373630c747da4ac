"""The served image encoder's paths (serving/engine.py) against ONNX Runtime fp32, for the default
model and ViT-B-32 (random weights), at batch 1 and 32: images/s, top-1 agreement with the fp32
graph (export's ``top1_agreement``, near ties aside) and whether the path the server picks at start
(``choose_engine``, auto) is within 10% of the fastest safe path measured here, in the same run.

Each path runs in its own process (``--worker engine``), the start-up choice in another (``--worker
auto``). Agreement images: the bundle's sample images as the self-test remakes them (the toy world's
test images for the default model, seeded smooth random images for the random-weight ViT-B-32).
GPU paths appear only on a machine with CUDA (not run on the development machine).

    python -m benchmarks.engines [--quick] [--output benchmarks/results/engines.json]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import default_bundle, error_text, main, random_bundle, ratio, report, run_worker, time_calls

BATCHES = (1, 32)
SAFE_AGREEMENT = 0.99
WITHIN = 0.10
LARGE_MODEL = "ViT-B-32"


def _bundle(path: str, ort_threads: int = 0):
    from export.bundle import load_bundle
    return load_bundle(path, ["CPUExecutionProvider"], check=False, ort_threads=ort_threads)


def worker_engine(config: dict) -> dict:
    """One path: throughput at each batch and the sample images' similarities (or agreement with the
    reference's, saved by the fp32 worker)."""
    import numpy as np

    from capt.hardware import detect
    from export.onnx_export import top1_agreement
    from serving.engine import batch_dependence, candidates, sample_set
    bundle = _bundle(config["bundle"], config.get("ort_threads", 0))
    candidate = {c.name: c for c in candidates(bundle, detect())}[config["engine"]]
    engine = candidate.build()
    samples, text, source = sample_set(bundle, config["samples"])
    embeddings = np.concatenate([engine.encode(samples[i:i + 32]) for i in range(0, len(samples), 32)])
    similarity = embeddings @ text.T
    result = {"engine": engine.name, "applies": candidate.applies, "why": candidate.why, "samples": len(samples),
              "sample_source": source, "throughput": {},
              # torch-bf16's fixed chunks, onnx-int8's one image a call, TensorRT's largest part
              "fixed_batch": getattr(engine, "fixed_batch", None) or getattr(engine, "max_batch", None),
              # the server's batch-invariance test (serving/engine.py): alone vs inside mixed batches
              "batch_max_abs_diff": batch_dependence(engine, samples[:32], embeddings[:32])}
    for batch in config["batches"]:
        pixels = np.resize(samples, (batch, *samples.shape[1:]))
        timing = time_calls(lambda: engine.encode(pixels), warmup=1 if batch > 1 else 3, repeats=config["repeats"],
                            max_seconds=config["max_seconds"])
        result["throughput"][str(batch)] = batch / timing["median_s"]
    reference = config.get("reference")
    if reference:
        result.update(top1_agreement(np.load(reference), similarity))
    else:
        np.save(config["save_similarity"], similarity)
        result["top1_agreement"] = 1.0
    return result


def worker_auto(config: dict) -> dict:
    """What the server picks at start-up (``ServingModel``'s steps: ``choose_ort_threads``, then
    ``choose_engine`` with auto on sessions with those threads), and how long that took. Measured
    afresh, unless ``config["remember"]``: then as the server does, recalling what an earlier start kept
    in the engine cache (``remembered_ort_threads``, ``remembered_engine``)."""
    import time

    from capt.hardware import detect
    from export.bundle import IMAGE_ONNX
    from serving.engine import choose_engine, choose_ort_threads, remembered_engine, remembered_ort_threads
    hardware = detect()
    started = time.perf_counter()
    manifest = json.loads((Path(config["bundle"]) / "manifest.json").read_text())
    graph, image_size = Path(config["bundle"]) / IMAGE_ONNX, manifest["inputs"]["image"]["shape"][-1]
    if config.get("remember"):
        threads_report = remembered_ort_threads(graph, manifest["files"][IMAGE_ONNX], image_size, hardware)
        threads = threads_report["used"]
    else:
        threads, threads_report = choose_ort_threads(graph, image_size, hardware.compute_cores)
    bundle = _bundle(config["bundle"], threads)
    engine, chosen = (remembered_engine if config.get("remember") else choose_engine)(bundle, hardware, "auto")
    return {"engine": engine.name, "ort_threads": threads, "ort_threads_report": threads_report, "report": chosen,
            "seconds": round(time.perf_counter() - started, 2)}


WORKERS = {"engine": worker_engine, "auto": worker_auto}


# serving.engine.ENGINES (not imported: the parent stays free of torch); every one is tried.
PATHS = ("onnx-fp32", "onnx-int8", "torch-bf16", "onnx-cuda-fp32", "onnx-cuda-fp16", "tensorrt")
MAX_BATCH_DIFF = 1e-4  # serving.engine.MAX_BATCH_DIFF (not imported, as above)


def run(quick: bool) -> dict:
    samples = 16 if quick else 64
    timing = {"repeats": 3 if quick else 10, "max_seconds": 2 if quick else 6}
    default = default_bundle()
    labels = json.loads((default / "manifest.json").read_text())["labels"]
    models = {"default model (capt-toy)": default}
    if not quick:
        models[f"{LARGE_MODEL} (random weights)"] = random_bundle(LARGE_MODEL, labels)
    rows, summary, choices = [], {}, {}
    for model_name, bundle in models.items():
        model_samples = samples if "default" in model_name else min(samples, 32)
        with tempfile.TemporaryDirectory(prefix="capt-bench-engines-") as tmp:
            reference_path = str(Path(tmp) / "reference.npy")
            base = {"bundle": str(bundle), "batches": list(BATCHES), "samples": model_samples, **timing}
            measured = {"onnx-fp32": run_worker("engines", "engine", {**base, "engine": "onnx-fp32",
                                                                      "save_similarity": reference_path})}
            for name in PATHS[1:]:
                try:
                    measured[name] = run_worker("engines", "engine", {**base, "engine": name, "reference": reference_path})
                except Exception as err:  # noqa: BLE001 - a path that cannot run here is a row that says why
                    measured[name] = {"error": error_text(err)}
            auto = run_worker("engines", "auto", {"bundle": str(bundle)})
            # The served path as it is served: with the threads auto chose (the rows above: ONNX Runtime's default).
            served_name = f"{auto['engine']} served ({auto['ort_threads']} threads)"
            measured[served_name] = run_worker("engines", "engine", {
                **base, "engine": auto["engine"], "ort_threads": auto["ort_threads"], "reference": reference_path})
        reference = measured["onnx-fp32"]["throughput"]
        safe = {n: m for n, m in measured.items() if "throughput" in m and m["top1_agreement"] >= SAFE_AGREEMENT
                and m["batch_max_abs_diff"] <= MAX_BATCH_DIFF}
        for name, entry in measured.items():
            row = {"model": model_name, "path": name}
            if "throughput" not in entry:
                row["note"] = "not run: " + entry["error"].splitlines()[-1][:120]
                rows.append(row)
                continue
            for batch in BATCHES:
                row[f"img/s b{batch}"] = round(entry["throughput"][str(batch)], 1)
                row[f"vs fp32 b{batch}"] = ratio(entry["throughput"][str(batch)], reference[str(batch)])
            row["chunk"] = entry.get("fixed_batch") or "-"
            row["top-1 agree"] = round(entry["top1_agreement"], 4)
            row["near ties"] = entry.get("top1_near_ties", 0)
            row["batch diff"] = float(f"{entry['batch_max_abs_diff']:.2g}")
            row["safe"] = "yes" if name in safe else "no"
            row["capability says"] = "applies" if entry["applies"] else "not offered by auto"
            row["served (auto)"] = "**served**" if name == served_name else ""
            rows.append(row)
        for batch in BATCHES:
            fastest = max(safe, key=lambda n: safe[n]["throughput"][str(batch)])
            served = measured[served_name].get("throughput", {}).get(str(batch))
            share = ratio(served, safe[fastest]["throughput"][str(batch)])
            summary[f"{model_name} b{batch}: {served_name} / fastest safe {fastest}"] = share
            summary[f"{model_name} b{batch}: served within 10% of fastest safe"] = (
                "yes" if share is not None and share >= 1 - WITHIN else "no")
        summary[f"{model_name}: start-up choice seconds"] = auto["seconds"]
        summary[f"{model_name}: ONNX Runtime threads"] = f"{auto['ort_threads']}: {auto['ort_threads_report']['reason']}"
        choices[model_name] = {"engine": auto["report"], "ort_threads": auto["ort_threads_report"]}
    columns = ["model", "path", *[f"{k} b{b}" for b in BATCHES for k in ("img/s", "vs fp32")], "chunk", "top-1 agree",
               "near ties", "batch diff", "safe", "capability says", "served (auto)", "note"]
    notes = [f"safe: top-1 agreement with the fp32 graph >= {SAFE_AGREEMENT:.0%} on the bundle's sample images "
             f"({samples} for the default model, {min(samples, 32)} for {LARGE_MODEL}), near ties aside, and batch "
             f"invariance (`batch diff`: max |alone - in batch| of normalised embeddings <= {MAX_BATCH_DIFF:g}, "
             "as the server's self-test: a micro-batched server must not answer by other requests)",
             "served (auto): what the server runs: the intra-op threads `choose_ort_threads` picked (one core "
             "left to the event loop unless the encoder runs 1.3x faster on all; the torch engine computes on "
             "the same count), and the path `choose_engine` "
             "picked in its own short self-test at start-up (a few seconds, geometric mean of batch 1 and its "
             "sample batch, a reduced path must gain 10% over fp32); the figures of the row are this benchmark's "
             "longer timing; the other rows run with the libraries' default threads (one per core), as an "
             "encoder alone would",
             "chunk: torch-bf16 runs every batch as chunks of one size (chosen by timing when it loads), the "
             "last padded, because bf16 kernels change with the batch size; `img/s b1` then includes the padding; "
             "onnx-int8 runs one image a call, because dynamic quantisation computes its activation scales over "
             "the whole input (batched, an image's embedding moves with its neighbours); tensorrt runs larger "
             "batches in parts of this size (its optimisation profile's end), unpadded",
             "every path is timed here whatever auto would offer (`capability says`), so that a path that "
             "capability rules out is seen to be slower, not assumed so",
             "GPU paths (onnx-cuda-fp32, onnx-cuda-fp16, tensorrt) are coded in serving/engine.py; they are "
             "not run on a machine without CUDA"]
    result = report("engines", "Served image-encoder paths against ONNX Runtime fp32", columns, rows, summary, notes)
    result["raw"] = {"start_up_choice": choices}
    return result


if __name__ == "__main__":
    raise SystemExit(main("engines", run, WORKERS))
