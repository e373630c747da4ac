"""Clean and PGD robust accuracy of a (prompted) CLIP on one or several datasets.

Protocol (``shared/reference/capt-method.md``): PGD-``steps`` under L∞ with step ``eps/4``, a uniform
random start and cross-entropy on the true labels; robust accuracy is the accuracy on the attacked
images. The same prompts are evaluated on every dataset, each with its own label set
(cross-dataset evaluation).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .attacks import PGD
from .data import LabeledDataset
from .prompts import PromptedCLIP, ZeroShotClassifier


def eps_label(eps: float) -> str:
    """``4/255`` for whole multiples of 1/255 (how the literature writes them), else the number."""
    steps_of_255 = eps * 255
    if abs(steps_of_255 - round(steps_of_255)) < 1e-6:
        return f"{round(steps_of_255)}/255"
    return f"{eps:g}"


@torch.no_grad()
def _class_embeddings(model: PromptedCLIP, data: LabeledDataset) -> torch.Tensor:
    return model.encode_labels(data.classnames, data.templates)


def evaluate(model: PromptedCLIP, data: LabeledDataset, eps_list: Sequence[float], steps: int = 100,
             batch_size: int = 64, max_samples: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    device = model.pixel_mean.device
    model.eval()
    classifier = ZeroShotClassifier(model, _class_embeddings(model, data))
    indices = list(range(len(data)))
    if max_samples is not None and max_samples < len(indices):
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
        indices = sorted(order[:max_samples].tolist())
    loader = DataLoader(Subset(data.dataset, indices), batch_size=batch_size, shuffle=False)
    correct = {"clean": 0, **{eps_label(e): 0 for e in eps_list}}
    total = 0
    for batch_index, (images, labels) in enumerate(tqdm(loader, desc=f"eval {data.name}", disable=not progress,
                                                        dynamic_ncols=True)):
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            correct["clean"] += (classifier(images).argmax(-1) == labels).sum().item()
        for eps in eps_list:
            attack = PGD(classifier, eps=eps, alpha=eps / 4, steps=steps, random_start=True, loss="ce",
                         seed=seed * 1_000_003 + batch_index)
            adversarial = attack(images, labels)
            with torch.no_grad():
                correct[eps_label(eps)] += (classifier(adversarial).argmax(-1) == labels).sum().item()
        total += labels.numel()
    return {"dataset": data.name, "n": total, "classes": len(data.classnames), "clean_acc": correct["clean"] / total,
            "robust_acc": {eps_label(e): correct[eps_label(e)] / total for e in eps_list}, "pgd_steps": steps}


def markdown_table(results: list[dict]) -> str:
    eps_keys = list(results[0]["robust_acc"]) if results else []
    steps = results[0]["pgd_steps"] if results else 0
    header = ["dataset", "n", "clean"] + [f"PGD-{steps} {k}" for k in eps_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["dataset"], str(r["n"]), f"{100 * r['clean_acc']:.2f}"] + [f"{100 * r['robust_acc'][k]:.2f}" for k in eps_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], output_dir: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    json_path.write_text(json.dumps({**(extra or {}), "results": results}, indent=2))
    md_path.write_text(markdown_table(results))
    return json_path, md_path
