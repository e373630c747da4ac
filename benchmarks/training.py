"""Training step time of CAPT against APT at the same batch size and attack budget, with the real
trainer (``capt.train.train``) on the default model's setup (the pretrained toy CLIP, toy-world
pairs), each method in its own process.

Timed from the trainer's own per-epoch record (``metrics.jsonl``: seconds of the epoch's steps,
data rendering included, checkpoint writing excluded); the first epoch is warm-up and left out.
What differs between the methods is the method: CAPT has deep multi-modal prompts, a KL attack
(one extra forward for its target), a frozen-CLIP forward for the consistency term; APT a shallow
16-token text context and a CE attack.

    python -m benchmarks.training [--quick] [--output benchmarks/results/training.json]
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from benchmarks.common import DEFAULT_WEIGHTS, main, ratio, report, run_worker

METHODS = ("capt", "apt")
# The default model's training setup (models/capt-toy/capt-default.yaml): the attack budget both methods get.
ATTACK = {"eps": "4/255", "alpha": "2.67/255", "steps": 3}
BATCH = 32


def worker_train(config: dict) -> dict:
    import torch

    from capt.checkpoint import read_checkpoint
    from capt.config import TrainConfig
    from capt.train import train
    with tempfile.TemporaryDirectory(prefix="capt-bench-train-") as tmp:
        train_config = TrainConfig.from_dict({
            "model": "capt-toy-vit", "pretrained": str(DEFAULT_WEIGHTS), "method": config["method"],
            "data": {"name": "toyworld_pairs", "split": "train"}, "shots": config["shots"], "seed": 1,
            "epochs": config["epochs"], "batch_size": BATCH, "device": "cpu", "num_workers": 0,
            "output_dir": str(Path(tmp) / "run"), "attack": {**ATTACK}})
        run_dir = train(train_config, progress=False)
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        meta, _ = read_checkpoint(run_dir)  # the prompts as trained (depth capped at the model's layers)
    return {"epochs": epochs, "torch_threads": torch.get_num_threads(), "attack": meta["attack"],
            "prompt": meta["prompt"], "loss": meta["loss"]}


WORKERS = {"train": worker_train}


def _prompts(prompt: dict) -> str:
    sides = [f"{side} {prompt[f'{side}_n_ctx']}x{prompt[f'{side}_depth']}" for side in ("text", "vision")
             if prompt[f"{side}_n_ctx"]]
    return ", ".join(sides) + (f" ({prompt['coupling']})" if prompt["text_n_ctx"] and prompt["vision_n_ctx"] else "")


def run(quick: bool) -> dict:
    # shots per class x 64 classes (pairs without training images give none): quick 1 shot -> 2 steps
    # of 32 per epoch, full 4 shots -> about 8 steps.
    shots, epochs = (1, 2) if quick else (4, 3)
    results = {m: run_worker("training", "train", {"method": m, "shots": shots, "epochs": epochs}) for m in METHODS}
    rows = []
    for method, result in results.items():
        measured = result["epochs"][1:]  # epoch 1 is warm-up (allocator, first-call overheads)
        seconds = sum(e["seconds"] for e in measured)
        images = sum(e["images"] for e in measured)
        steps = sum(math.ceil(e["images"] / BATCH) for e in measured)
        rows.append({"method": method.upper(), "step s": round(seconds / steps, 3), "images/s": round(images / seconds, 1),
                     "steps timed": steps, "attack loss": result["attack"]["loss"],
                     "prompts (tokens x layers)": _prompts(result["prompt"])})
    capt, apt = rows
    summary = {"CAPT / APT step time": ratio(capt["step s"], apt["step s"]), "batch": BATCH,
               "attack": f"PGD eps {ATTACK['eps']}, step {ATTACK['alpha']}, {ATTACK['steps']} steps"}
    notes = [f"capt-toy-vit with the default model's pretrained weights, toyworld_pairs train, {shots} shot(s) per class, "
             f"{epochs} epochs of which the first is warm-up; CPU, {results['capt']['torch_threads']} torch threads",
             "step time = the trainer's epoch seconds / steps (toy-world images are rendered on the fly, included; "
             "an epoch's last step may be a partial batch, so images/s is the fairer figure)"]
    result = report("training", "Training step: CAPT vs APT (default model setup, CPU)",
                    ["method", "step s", "images/s", "steps timed", "attack loss", "prompts (tokens x layers)"], rows, summary, notes)
    result["raw"] = results
    return result


if __name__ == "__main__":
    raise SystemExit(main("training", run, WORKERS))
