"""Training step time of CAPT against APT at the same batch size and attack budget, with the real
trainer (``capt.train.train``) on the default model's setup (the pretrained toy CLIP, toy-world
pairs), each method in its own process.

Timed from the trainer's own per-epoch record (``metrics.jsonl``: seconds of the epoch's steps,
data rendering included, checkpoint writing excluded); the first epoch is warm-up and left out.
What differs between the methods is the method: CAPT has deep multi-modal prompts, a KL attack
(its target is the training forward's clean prediction) and a consistency term against the frozen
CLIP (whose image features the trainer computes once per run, in the first epoch's time); APT a
shallow 16-token text context, a CE attack and no clean images in the graph.

Each method also runs on a 1000-label set (the 64 pairs and 936 synthetic distractor names, no
images of their own): the prompted text of every label is encoded, with grad, at every step, so
this shows what a large label set (ImageNet's 1000) costs a step.

    python -m benchmarks.training [--quick] [--output benchmarks/results/training.json]
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from benchmarks.common import DEFAULT_WEIGHTS, main, ratio, report, run_worker

METHODS = ("capt", "apt")
# The attack budget both methods get: the method page's 4/255 attack (3 steps of about eps/1.5).
ATTACK = {"eps": "4/255", "alpha": "2.67/255", "steps": 3}
BATCH = 32
TOY_LABELS = 64  # toyworld_pairs: 8 colours x 8 shapes
LABEL_SETS = (TOY_LABELS, 1000)


def _register_distractor_dataset(labels: int) -> str:
    """A toy-world pairs dataset whose label set is padded to ``labels`` names; returns its name."""
    from capt.data import register_dataset
    from capt.data.datasets import DATASETS
    pairs = DATASETS["toyworld_pairs"]

    def build(root, split, transform):
        dataset, classnames = pairs(root, split, transform)
        return dataset, list(classnames) + [f"distractor {i}" for i in range(labels - len(classnames))]
    name = f"toyworld_pairs_{labels}_labels"
    register_dataset(name, build)
    return name


def worker_train(config: dict) -> dict:
    import torch

    from capt.checkpoint import read_checkpoint
    from capt.config import TrainConfig
    from capt.train import train
    labels = config.get("labels", TOY_LABELS)
    dataset = "toyworld_pairs" if labels == TOY_LABELS else _register_distractor_dataset(labels)
    with tempfile.TemporaryDirectory(prefix="capt-bench-train-") as tmp:
        train_config = TrainConfig.from_dict({
            "model": "capt-toy-vit", "pretrained": str(DEFAULT_WEIGHTS), "method": config["method"],
            "data": {"name": dataset, "split": "train"}, "shots": config["shots"], "seed": 1,
            "epochs": config["epochs"], "batch_size": BATCH, "device": "cpu", "num_workers": 0,
            "output_dir": str(Path(tmp) / "run"), "attack": {**ATTACK}})
        run_dir = train(train_config, progress=False)
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        meta, _ = read_checkpoint(run_dir)  # the prompts as trained (depth capped at the model's layers)
    return {"epochs": epochs, "torch_threads": torch.get_num_threads(), "attack": meta["attack"],
            "prompt": meta["prompt"], "loss": meta["loss"], "labels": len(meta["classnames"])}


WORKERS = {"train": worker_train}


def _prompts(prompt: dict) -> str:
    sides = [f"{side} {prompt[f'{side}_n_ctx']}x{prompt[f'{side}_depth']}" for side in ("text", "vision")
             if prompt[f"{side}_n_ctx"]]
    return ", ".join(sides) + (f" ({prompt['coupling']})" if prompt["text_n_ctx"] and prompt["vision_n_ctx"] else "")


def run(quick: bool) -> dict:
    # shots per class x 64 classes (pairs without training images give none): quick 1 shot -> 2 steps
    # of 32 per epoch, full 4 shots -> about 8 steps.
    shots, epochs = (1, 2) if quick else (4, 3)
    results = {(m, labels): run_worker("training", "train", {"method": m, "shots": shots, "epochs": epochs, "labels": labels})
               for labels in LABEL_SETS for m in METHODS}
    rows, step_s = [], {}
    for (method, labels), result in results.items():
        measured = result["epochs"][1:]  # epoch 1 is warm-up (allocator, first-call overheads, CAPT's frozen features)
        seconds = sum(e["seconds"] for e in measured)
        images = sum(e["images"] for e in measured)
        steps = sum(math.ceil(e["images"] / BATCH) for e in measured)
        step_s[method, labels] = seconds / steps
        rows.append({"method": method.upper(), "labels": result["labels"], "step s": round(seconds / steps, 3),
                     "images/s": round(images / seconds, 1), "steps timed": steps, "attack loss": result["attack"]["loss"],
                     "prompts (tokens x layers)": _prompts(result["prompt"])})
    many = LABEL_SETS[-1]
    summary = {"CAPT / APT step time": ratio(step_s["capt", TOY_LABELS], step_s["apt", TOY_LABELS]),
               **{f"{m.upper()} step time, {many} / {TOY_LABELS} labels": ratio(step_s[m, many], step_s[m, TOY_LABELS])
                  for m in METHODS},
               "batch": BATCH, "attack": f"PGD eps {ATTACK['eps']}, step {ATTACK['alpha']}, {ATTACK['steps']} steps"}
    notes = [f"capt-toy-vit with the default model's pretrained weights, toyworld_pairs train, {shots} shot(s) per class, "
             f"{epochs} epochs of which the first is warm-up; CPU, {results['capt', TOY_LABELS]['torch_threads']} torch threads",
             f"{many} labels: the {TOY_LABELS} pairs and {many - TOY_LABELS} synthetic distractor names, the same images",
             "step time = the trainer's epoch seconds / steps (toy-world images are rendered on the fly, included; "
             "an epoch's last step may be a partial batch, so images/s is the fairer figure)"]
    result = report("training", "Training step: CAPT vs APT (default model setup, CPU)",
                    ["method", "labels", "step s", "images/s", "steps timed", "attack loss", "prompts (tokens x layers)"],
                    rows, summary, notes)
    result["raw"] = {f"{method}-{labels}": r for (method, labels), r in results.items()}
    return result


if __name__ == "__main__":
    raise SystemExit(main("training", run, WORKERS))
