"""CPU beyond fp32 on the default model: int8 dynamic quantisation of the image encoder graph
(ONNX Runtime) and bf16 autocast (PyTorch), each against fp32 in the same runtime: throughput,
top-1 agreement with fp32 on toy-world test images, and accuracy on clean and PGD images.

The adversarial images are crafted once, white-box, on the fp32 PyTorch model (the served model's
twin) and then classified by every variant: for the int8 graph that is a transfer attack, so a
higher robust accuracy there means "quantisation did not break robustness", not "int8 is more robust".

    python -m benchmarks.quantize [--quick] [--output benchmarks/results/quantize.json]
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE_DIR, default_bundle, files_digest, main, ratio, report, run_worker, time_calls

EPSILONS = {"1/255": 1 / 255, "4/255": 4 / 255}
PGD_STEPS = 10
DATA = "toyworld_pairs::test"


def _load_torch_model(bundle: Path):
    """The bundle's PyTorch twin, loaded as the server loads it (``export.bundle.load_twin``)."""
    from export.bundle import load_twin, read_manifest
    return load_twin(bundle, read_manifest(bundle)).requires_grad_(False)


# ---- workers --------------------------------------------------------------------------------------
def worker_prepare(config: dict) -> dict:
    """Test images, their PGD versions (fp32 PyTorch, white-box) and the label tokens, saved to one
    .npz for the other workers."""
    import numpy as np
    import torch

    from capt.attacks import PGD
    from capt.data import load_dataset
    from capt.models import pixel_transform
    from capt.prompts import ZeroShotClassifier
    bundle = Path(config["bundle"])
    model = _load_torch_model(bundle)
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    data = load_dataset(DATA, pixel_transform(model.preprocess_cfg))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: config["images"]].tolist()
    images = torch.stack([data.dataset[i][0] for i in order])
    targets = torch.tensor([data.labels[i] for i in order])
    if data.classnames != labels:
        raise RuntimeError("the bundle's labels are not the dataset's classes")
    tokens = model.tokenize(labels)
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, model.encode_text(tokens))
    arrays = {"clean": images.numpy(), "targets": targets.numpy(), "tokens": tokens.numpy()}
    started = time.perf_counter()
    for name, eps in EPSILONS.items():
        adversarial = []
        for chunk in range(0, len(images), 64):
            attack = PGD(classifier, eps=eps, alpha=eps / 4, steps=PGD_STEPS, loss="ce", seed=chunk)
            adversarial.append(attack(images[chunk:chunk + 64], targets[chunk:chunk + 64]))
        arrays[f"adv {name}"] = torch.cat(adversarial).numpy()
    np.savez(config["output"], **arrays)
    return {"images": len(images), "pgd_seconds": round(time.perf_counter() - started, 1)}


def _sets(arrays) -> dict:
    return {"clean": arrays["clean"], **{f"adv {name}": arrays[f"adv {name}"] for name in EPSILONS}}


def worker_quantize(config: dict) -> dict:
    """int8 dynamic quantisation of the MatMul weights (activations quantised at run time), the served
    onnx-int8's recipe (``serving.engine.make_int8_graph``)."""
    from serving.engine import make_int8_graph
    source, target = Path(config["source"]), Path(config["target"])
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.onnx")
        make_int8_graph(source, partial)
        partial.rename(target)
    return {"fp32_mb": round(source.stat().st_size / 1e6, 2), "int8_mb": round(target.stat().st_size / 1e6, 2)}


def worker_ort(config: dict) -> dict:
    """Throughput and predictions of each graph; class embeddings from the bundle's fp32 text graph."""
    import numpy as np

    from export.bundle import onnx_session
    from serving.engine import INT8_IMAGES_PER_RUN, OnnxEngine
    arrays = np.load(config["data"])
    text = onnx_session(Path(config["bundle"]) / "text_encoder.onnx", ["CPUExecutionProvider"])
    class_embeddings = text.run(None, {"tokens": arrays["tokens"]})[0]
    results = {}
    for variant, path in config["graphs"].items():
        session = onnx_session(path, ["CPUExecutionProvider"], spinning=True)
        # The served onnx-int8 engine runs one image a call; the others in parts of 64 (memory).
        served = variant in config.get("one_image_a_call", ())
        encode = OnnxEngine(variant, session, INT8_IMAGES_PER_RUN if served else 64).encode
        entry = {"throughput": {}, "predictions": {}}
        for batch in config["batches"]:
            pixels = arrays["clean"][:batch]
            if len(pixels) < batch:
                pixels = np.resize(arrays["clean"], (batch, *arrays["clean"].shape[1:]))
            timing = time_calls(lambda: encode(pixels), warmup=3, repeats=config["repeats"],
                                max_seconds=config["max_seconds"])
            entry["throughput"][str(batch)] = batch / timing["median_s"]
        for name, images in _sets(arrays).items():
            embeddings = encode(images)
            entry["predictions"][name] = (embeddings @ class_embeddings.T).argmax(-1).tolist()
        results[variant] = entry
    return results


def worker_torch(config: dict) -> dict:
    """fp32 eager vs bf16 autocast of the same PyTorch model (inference)."""
    import contextlib

    import numpy as np
    import torch
    model = _load_torch_model(Path(config["bundle"]))
    arrays = np.load(config["data"])
    with torch.no_grad():
        class_embeddings = model.encode_text(torch.from_numpy(arrays["tokens"]))
    contexts = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    results = {}
    for variant, context in contexts.items():
        entry = {"throughput": {}, "predictions": {}}

        def encode(pixels):
            with torch.inference_mode(), context():
                return model.encode_image(pixels).float()
        for batch in config["batches"]:
            pixels = torch.from_numpy(np.resize(arrays["clean"], (batch, *arrays["clean"].shape[1:])))
            timing = time_calls(lambda: encode(pixels), warmup=2, repeats=config["repeats"], max_seconds=config["max_seconds"])
            entry["throughput"][str(batch)] = batch / timing["median_s"]
        for name, images in _sets(arrays).items():
            embeddings = torch.cat([encode(torch.from_numpy(images[i:i + 64])) for i in range(0, len(images), 64)])
            entry["predictions"][name] = (embeddings @ class_embeddings.T).argmax(-1).tolist()
        results[variant] = entry
    results["torch_threads"] = torch.get_num_threads()
    results["bf16_cpu_support"] = {"mkldnn_bf16": bool(torch.backends.mkldnn.is_available()),
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    return results


WORKERS = {"prepare": worker_prepare, "quantize": worker_quantize, "ort": worker_ort, "torch": worker_torch}


# ---- the comparison -----------------------------------------------------------------------------
def run(quick: bool) -> dict:
    import numpy as np
    images = 64 if quick else 500
    batches = [1, 32]
    timing = {"repeats": 5 if quick else 30, "max_seconds": 2 if quick else 10}
    bundle = default_bundle()
    source = bundle / "image_encoder.onnx"
    from serving.engine import INT8_RECIPE
    int8 = CACHE_DIR / "quantized" / f"image_encoder-{INT8_RECIPE}-{files_digest(source)}.onnx"
    with tempfile.TemporaryDirectory(prefix="capt-bench-quant-") as tmp:
        data = Path(tmp) / "data.npz"
        prepared = run_worker("quantize", "prepare", {"bundle": str(bundle), "images": images, "output": str(data)})
        sizes = run_worker("quantize", "quantize", {"source": str(source), "target": str(int8)})
        ort = run_worker("quantize", "ort", {"bundle": str(bundle), "data": str(data), "batches": batches, **timing,
                                             "graphs": {"fp32": str(source), "int8": str(int8), "int8 served": str(int8)},
                                             "one_image_a_call": ["int8 served"]})
        eager = run_worker("quantize", "torch", {"bundle": str(bundle), "data": str(data), "batches": batches, **timing})
        targets = np.load(data)["targets"]

    variants = {"ORT fp32": (ort["fp32"], ort["fp32"]), "ORT int8 (dynamic, MatMul)": (ort["int8"], ort["fp32"]),
                "ORT int8, one image a call (served: onnx-int8)": (ort["int8 served"], ort["fp32"]),
                "torch fp32": (eager["fp32"], eager["fp32"]), "torch bf16 autocast": (eager["bf16"], eager["fp32"])}
    rows = []
    for name, (entry, reference) in variants.items():
        row = {"variant": name}
        for batch in batches:
            row[f"img/s b{batch}"] = round(entry["throughput"][str(batch)], 1)
            row[f"vs fp32 b{batch}"] = ratio(entry["throughput"][str(batch)], reference["throughput"][str(batch)])
        row["top-1 agree fp32 (clean)"] = round(float(np.mean(np.array(entry["predictions"]["clean"]) ==
                                                            np.array(reference["predictions"]["clean"]))), 4)
        for set_name, predictions in entry["predictions"].items():
            row[f"acc {set_name}"] = round(float(np.mean(np.array(predictions) == targets)), 4)
        rows.append(row)
    columns = ["variant", *[f"{k} b{b}" for b in batches for k in ("img/s", "vs fp32")], "top-1 agree fp32 (clean)",
               "acc clean", *[f"acc adv {e}" for e in EPSILONS]]
    fp32_row, int8_row, served_row = rows[0], rows[1], rows[2]
    summary = {"int8 / fp32 ORT throughput b32": int8_row["vs fp32 b32"],
               "int8 one image a call (served) / fp32 ORT throughput b1 / b32":
                   f"{served_row['vs fp32 b1']} / {served_row['vs fp32 b32']}",
               "int8 top-1 agreement with fp32": int8_row["top-1 agree fp32 (clean)"],
               "int8 one image a call (served) top-1 agreement with fp32": served_row["top-1 agree fp32 (clean)"],
               **{f"robust acc change int8 served - fp32 @ {e}": round(served_row[f"acc adv {e}"] - fp32_row[f"acc adv {e}"], 4)
                  for e in EPSILONS},
               "bf16 / fp32 torch throughput b32": rows[4]["vs fp32 b32"],
               "graph MB fp32 / int8": f"{sizes['fp32_mb']} / {sizes['int8_mb']}"}
    notes = [f"default model (models/capt-toy), {prepared['images']} images of {DATA}; PGD L-inf, {PGD_STEPS} steps, "
             "step eps/4, random start, CE on the true class, crafted on torch fp32 (white-box for the torch rows, "
             "transfer for the ORT rows)",
             "ONNX Runtime runs on its default threads (one per core), spinning; the server may run fewer "
             "(benchmarks.engines' served row gives its own speed): one image a call, int8 gains where one image "
             "fills the threads, and loses where batching is what fills them",
             f"torch CPU capability {eager['bf16_cpu_support']['cpu_capability']}: bf16 matmul is native only with "
             "AVX512-BF16 or AMX, elsewhere it is emulated (converted to fp32 and back)"]
    result = report("quantize", "CPU beyond fp32: int8 ONNX and bf16 autocast (default model)", columns, rows, summary, notes)
    result["raw"] = {"prepare": prepared, "sizes": sizes, "torch_threads": eager["torch_threads"]}
    return result


if __name__ == "__main__":
    raise SystemExit(main("quantize", run, WORKERS))
