"""``--precision``: the training step (CAPT on the default model's setup, its PGD inside the step) and
the pretraining step (``capt pretrain``'s defaults, a few steps), each in fp32, bf16 and ``auto`` (where
the CPU has native bf16, a timing of one step each way at the start; fp32 elsewhere),
each side in its own process, with the loss each reached as a sanity check.

    python -m benchmarks.precision [--quick] [--output benchmarks/results/precision.json]
    CAPT_BENCH_DEVICE=cuda python -m benchmarks.precision    # the training rows on the GPU (pretraining is CPU-only)
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from benchmarks.common import DEFAULT_WEIGHTS, main, ratio, report, run_worker
from benchmarks.training import ATTACK, BATCH

# bf16 forced too: what auto weighed (auto times both and takes bf16 only where it is 1.1x faster)
PRECISIONS = ("fp32", "bf16", "auto")
DEVICE = os.environ.get("CAPT_BENCH_DEVICE", "cpu")


def worker_train(config: dict) -> dict:
    import logging

    import torch

    from capt.config import TrainConfig
    from capt.train import train
    with tempfile.TemporaryDirectory(prefix="capt-bench-precision-") as tmp:
        train_config = TrainConfig.from_dict({
            "model": "capt-toy-vit", "pretrained": str(DEFAULT_WEIGHTS), "method": "capt",
            "data": {"name": "toyworld_pairs", "split": "train"}, "shots": config["shots"], "seed": 1,
            "epochs": config["epochs"], "batch_size": BATCH, "device": config["device"], "num_workers": 0,
            "precision": config["precision"], "output_dir": str(Path(tmp) / "run"), "attack": {**ATTACK}})
        said = []  # what auto's timing said ("precision auto: ..."), from the trainer's log

        class Keep(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("precision auto:"):
                    said.append(record.getMessage().removeprefix("precision auto: "))
        log = logging.getLogger("capt.train")
        log.setLevel(logging.INFO)
        log.addHandler(Keep())
        run_dir = train(train_config, progress=False)
        import yaml
        used = yaml.safe_load((run_dir / "config.yaml").read_text())["precision"]
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"epochs": epochs, "precision_used": used, "torch_threads": torch.get_num_threads(),
            "auto_why": said[0] if said else None}


def worker_pretrain(config: dict) -> dict:
    from capt.pretrain import PretrainConfig, pretrain
    with tempfile.TemporaryDirectory(prefix="capt-bench-pretrain-") as tmp:
        pretrain(PretrainConfig(steps=config["steps"], checkpoint_every=config["every"], precision=config["precision"]),
                 tmp, progress=False)
        lines = [json.loads(line) for line in (Path(tmp) / "pretrain_metrics.jsonl").read_text().splitlines()]
        used = json.loads((Path(tmp) / "pretrain_config.json").read_text())["precision_used"]
        timed = Path(tmp) / "pretrain_precision.json"  # where auto timed the step: what it measured
        why = json.loads(timed.read_text())["why"] if timed.is_file() else None
    return {"log": lines, "precision_used": used, "auto_why": why}


WORKERS = {"train": worker_train, "pretrain": worker_pretrain}


def run(quick: bool) -> dict:
    shots, epochs = (1, 2) if quick else (2, 3)
    steps, every = (6, 3) if quick else (30, 10)
    rows, step_s, auto_why, train_why = [], {}, None, None
    for precision in PRECISIONS:
        result = run_worker("precision", "train", {"precision": precision, "shots": shots, "epochs": epochs,
                                                   "device": DEVICE})
        measured = result["epochs"][1:]  # epoch 1: warm-up and the frozen features
        train_why = result.get("auto_why") or train_why
        seconds = sum(e["seconds"] for e in measured)
        n_steps = sum(math.ceil(e["images"] / BATCH) for e in measured)
        step_s["train", precision] = seconds / n_steps
        rows.append({"step": "CAPT training (batch 32, PGD-3 at 4/255)", "precision": precision,
                     "ran as": result["precision_used"], "step s": round(seconds / n_steps, 3),
                     "steps timed": n_steps, "last loss": round(result["epochs"][-1]["loss"], 4),
                     "last adv acc": round(result["epochs"][-1]["adv_acc"], 3)})
    for precision in PRECISIONS if DEVICE == "cpu" else ():  # capt pretrain runs on the CPU only
        result = run_worker("precision", "pretrain", {"precision": precision, "steps": steps, "every": every})
        log = result["log"]
        seconds = log[-1]["seconds"] - log[0]["seconds"]  # the first `every` steps are warm-up
        n_steps = log[-1]["step"] - log[0]["step"]
        step_s["pretrain", precision] = seconds / n_steps
        if result.get("auto_why"):
            auto_why = result["auto_why"]
        rows.append({"step": "pretraining (batch 128, capt-toy-vit)", "precision": precision,
                     "ran as": result["precision_used"], "step s": round(seconds / n_steps, 3),
                     "steps timed": n_steps, "last loss": round(log[-1]["loss"], 4)})
    summary = {"training step fp32 / auto (speed-up of auto)": ratio(step_s["train", "fp32"], step_s["train", "auto"]),
               "training step fp32 / bf16 (speed-up of bf16)": ratio(step_s["train", "fp32"], step_s["train", "bf16"])}
    if ("pretrain", "fp32") in step_s:
        summary |= {"pretraining step fp32 / auto (speed-up of auto)": ratio(step_s["pretrain", "fp32"],
                                                                             step_s["pretrain", "auto"]),
                    "pretraining step fp32 / bf16 (speed-up of bf16)": ratio(step_s["pretrain", "fp32"],
                                                                             step_s["pretrain", "bf16"])}
    summary["auto ran as (training, pretraining)"] = f"{rows[2]['ran as']}, {rows[5]['ran as'] if len(rows) > 5 else '-'}"
    notes = [f"device: {DEVICE}" + ("" if DEVICE == "cpu" else " (the pretraining rows need the CPU: capt pretrain has no device option)"),
             f"training: capt-toy-vit with the default model's weights, toyworld_pairs, {shots} shot(s) per class, "
             f"{epochs} epochs, the first left out (warm-up, frozen features); the training PGD runs inside the "
             "autocast region (evaluation attacks never do)",
             f"pretraining: PretrainConfig defaults (batch 128, data rendered by 1 worker process) for {steps} steps, "
             f"timed between the step-{every} and step-{steps} log lines",
             "the losses are a sanity check that both precisions train, not a comparison of results"]
    if train_why:
        notes.append(f"training, auto's timing at the start: {train_why}")
    if auto_why:
        notes.append(f"pretraining, auto's timing at the start: {auto_why}")
    return report("precision", f"--precision: training and pretraining steps, fp32, bf16 and auto ({DEVICE})",
                  ["step", "precision", "ran as", "step s", "steps timed", "last loss", "last adv acc"], rows, summary, notes)


if __name__ == "__main__":
    raise SystemExit(main("precision", run, WORKERS))
