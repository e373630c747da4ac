"""Clean and robust accuracy of a (prompted) CLIP on one or several datasets, under one or several
attacks, with a gradient-masking check.

Protocol (``shared/reference/capt-method.md``): the attacks run on the tuned model (the prompted model
with its prompts on, never the frozen branch), in float32 (:mod:`capt.attacks.precision`), under L∞
with ``eps`` in pixel units. ``pgd`` (the default) is PGD-``steps`` with step ``eps/4``, a uniform
random start and cross-entropy on the true labels; ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square`` and
``autoattack`` are the stronger attacks of :mod:`capt.attacks.autoattack`. The same prompts are
evaluated on every dataset, each with its own label set (cross-dataset evaluation).

Per eps and attack, an image counts as robust under that attack if the model classifies the attack's
output correctly (as the PGD figures always have). The **worst case** over the attacks run counts an
image as robust only if it is classified correctly clean (the clean image is in the ball) and under
every attack; ``robust_acc`` is that worst case (with ``pgd`` alone, PGD's figure up to the rare
image PGD turns from wrong to right).

**Gradient masking** (Athalye et al., "Obfuscated Gradients Give a False Sense of Security", ICML 2018,
arXiv:1802.00420; the check AutoAttack's authors recommend): where the black-box Square attack fools
images that every white-box attack run (PGD, APGD-CE, APGD-T, FAB-T) left correct, the gradients
mislead and the white-box figures overstate robustness. More than 1% of the images so fooled flags
the row "masking suspected". Inside ``autoattack`` Square runs only on the images its white-box
stages missed, so its hits are exactly such images. The check needs Square (``square`` or
``autoattack``) and one white-box attack; otherwise the row says "not checked". It also fires when the
white-box attacks are merely too weak (e.g. PGD with too few steps of eps/4 to cross the ball): either
way their figure overstates robustness.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .attacks.autoattack import (BLACK_BOX, EVAL_ATTACKS, WHITE_BOX, AttackBudget, AutoAttack, attack_title,
                                 check_attack_names)
from .attacks._torchattacks import AttackNotApplicable
from .attacks.precision import PrecisionError, require_fp32
from .data import LabeledDataset
from .hardware import Hardware, autocast_factory, check_precision, resolve_precision
from .prompts import PromptedCLIP, ZeroShotClassifier

MASKING_THRESHOLD = 0.01  # fraction of the evaluated images Square alone may fool before the row is flagged


def eps_label(eps: float) -> str:
    """``4/255`` for whole multiples of 1/255 (how the literature writes them), else the number."""
    steps_of_255 = eps * 255
    if abs(steps_of_255 - round(steps_of_255)) < 1e-6:
        return f"{round(steps_of_255)}/255"
    return f"{eps:g}"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score 95% interval of a binomial proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def masking_check(fooled: dict[str, torch.Tensor], n: int, threshold: float = MASKING_THRESHOLD) -> dict:
    """``fooled``: per attack component (``pgd``, ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``), which of
    the ``n`` images it fooled (each clean-correct). Flags ``suspected`` when the black-box attack fooled
    more than ``threshold`` of the images that no white-box attack fooled."""
    white = [k for k in fooled if k in WHITE_BOX]
    black = [k for k in fooled if k in BLACK_BOX]
    if not white or not black:
        missing = "no black-box attack (add --attack square or autoattack)" if not black else "no white-box attack"
        return {"checked": False, "reason": missing, "suspected": False}
    white_fooled = torch.stack([fooled[k] for k in white]).any(0)
    black_fooled = torch.stack([fooled[k] for k in black]).any(0)
    only_black = int((black_fooled & ~white_fooled).sum())
    fraction = only_black / n if n else 0.0
    return {"checked": True, "white_box": white, "black_box": black, "black_box_only": only_black,
            "fraction": fraction, "threshold": threshold, "suspected": fraction > threshold}


def _fraction(mask: torch.Tensor) -> float:
    """Exact count / n (a float32 mean would print 0.31 as 0.3100000023841858)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


@torch.no_grad()
def _class_embeddings(model: PromptedCLIP, data: LabeledDataset) -> torch.Tensor:
    return model.encode_labels(data.classnames, data.templates)


@torch.no_grad()
def _predict(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    logits = classifier(images)
    if logits.dtype != torch.float32:  # a model that casts inside its forward: its attack gradients would too
        raise PrecisionError(f"an evaluation attack must run in float32, but the model returns {logits.dtype} logits")
    return logits.argmax(-1)


def check_eval_precision(requested: str, eps_list: Sequence[float]) -> None:
    """An explicit reduced precision is for clean-only evaluation: with an attack, every figure is fp32."""
    check_precision(requested)
    if requested in ("bf16", "fp16") and list(eps_list):
        raise ValueError(f"--precision {requested} applies to clean-only evaluation (--eps with no value): attacks, and "
                         "the clean pass their robust accuracy builds on, always run in float32 (a reduced-precision "
                         "attack is weaker and overstates robustness); use --precision auto or fp32")


def eval_precision(requested: str, eps_list: Sequence[float], device, hardware: Hardware | None = None) -> dict:
    """What an evaluation runs in: attacks always fp32; the clean pass in ``requested`` (auto: the
    machine's recommended precision) only when no attack runs, fp32 otherwise."""
    check_eval_precision(requested, eps_list)
    clean = "fp32" if list(eps_list) else resolve_precision(requested, device, hardware)
    return {"requested": requested, "clean": clean, "attacks": "fp32"}


def _clean_predict(classifier: nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "fp32":
        return _predict(classifier, images)
    with torch.no_grad(), autocast_factory(precision, images.device)():
        return classifier(images).float().argmax(-1)


def attack_robustness(classifier: nn.Module, batches: Iterable, n_classes: int, eps_list: Sequence[float],
                      attacks: Sequence[str] = ("pgd",), budget: AttackBudget = AttackBudget(), seed: int = 0,
                      progress: bool = True, name: str = "eval", device: torch.device | str = "cpu",
                      clean_precision: str = "fp32") -> dict:
    """Clean accuracy, robust accuracy per attack, the worst case and the masking check of ``classifier``
    (pixels in [0, 1] -> logits) on ``batches`` (re-iterable, in the same order every time: a
    DataLoader without shuffling, or a list of ``(images, labels)``). ``clean_precision`` other than
    fp32 (autocast of the clean pass) is only allowed without attacks (empty ``eps_list``)."""
    attacks = check_attack_names(attacks)
    # Checked once here, and again by every torchattacks wrapper: a figure only ever comes from fp32.
    require_fp32(classifier, what="the evaluated model")
    if clean_precision != "fp32" and list(eps_list):
        raise PrecisionError(f"the clean pass of an evaluation with attacks must run in float32, got {clean_precision}: "
                             "robust accuracy counts an image only if it is also right clean")
    clean = torch.cat([(_clean_predict(classifier, images.to(device), clean_precision) == labels.to(device)).cpu()
                       for images, labels in batches])
    n = clean.numel()
    by_attack: dict[str, dict] = {}
    worst, masking, stages, not_applicable, seconds = {}, {}, {}, {}, {}
    for eps in eps_list:
        label = eps_label(eps)
        correct: dict[str, torch.Tensor] = {}
        fooled: dict[str, torch.Tensor] = {}
        for attack_name in attacks:
            started = time.perf_counter()
            parts, stage_parts, bar = [], {}, None
            try:
                bar = tqdm(batches, desc=f"{name} {attack_name} eps {label}", disable=not progress, dynamic_ncols=True)
                for batch_index, (images, labels) in enumerate(bar):
                    images, labels = images.to(device), labels.to(device)
                    extra = {"on_stage": lambda stage: bar.set_postfix_str(stage)} if attack_name == "autoattack" else {}
                    # One seed per batch (as the PGD figures always had), so that a batch's result does not
                    # depend on what ran before it.
                    attack = EVAL_ATTACKS[attack_name](classifier, eps, n_classes=n_classes,
                                                       seed=seed * 1_000_003 + batch_index, budget=budget, **extra)
                    if isinstance(attack, AutoAttack):
                        if attack.skipped:
                            not_applicable.setdefault(attack_name, {}).update(
                                {f"{stage} (left out of the sequence)": why for stage, why in attack.skipped.items()})
                        adversarial, stage_fooled = attack.run(images, labels)
                        for stage, mask in stage_fooled.items():
                            stage_parts.setdefault(stage, []).append(mask.cpu())
                    else:
                        adversarial = attack(images, labels)
                    parts.append((_predict(classifier, adversarial) == labels).cpu())
                    if progress:
                        done = torch.cat(parts)
                        bar.set_postfix(robust=f"{done.float().mean().item():.3f}", refresh=False)
            except AttackNotApplicable as err:
                not_applicable[attack_name] = str(err)
                continue
            finally:
                if bar is not None:
                    bar.close()
            correct[attack_name] = torch.cat(parts)
            seconds.setdefault(attack_name, {})[label] = round(time.perf_counter() - started, 2)
            if stage_parts:
                stage_masks = {stage: torch.cat(masks) for stage, masks in stage_parts.items()}
                remaining = clean.clone()
                stages.setdefault(attack_name, {})[label] = {}
                for stage, mask in stage_masks.items():
                    remaining &= ~mask
                    stages[attack_name][label][stage] = _fraction(remaining)  # robust accuracy after this stage
                    fooled[stage] = fooled[stage] | mask if stage in fooled else mask
            else:
                mask = clean & ~correct[attack_name]
                fooled[attack_name] = fooled[attack_name] | mask if attack_name in fooled else mask
        by_attack[label] = {a: (_fraction(correct[a]) if a in correct else None) for a in attacks}
        robust = clean.clone()
        for value in correct.values():
            robust &= value
        worst[label] = robust
        masking[label] = masking_check(fooled, n)
    return {
        "n": n, "clean_acc": _fraction(clean),
        "robust_acc": {k: _fraction(v) for k, v in worst.items()},
        "robust_ci95": {k: wilson_interval(int(v.sum()), n) for k, v in worst.items()},
        "robust_acc_by_attack": by_attack,
        "attacks": attacks, "attack_titles": {a: attack_title(a, budget) for a in attacks},
        "autoattack_stages": stages, "not_applicable": not_applicable, "masking": masking,
        "budget": budget.to_dict(), "attack_seconds": seconds,
        "precision": {"clean": clean_precision, "attacks": "fp32"},
    }


def evaluate(model: PromptedCLIP, data: LabeledDataset, eps_list: Sequence[float], steps: int = 100,
             batch_size: int = 64, max_samples: int | None = None, seed: int = 0, progress: bool = True,
             attacks: Sequence[str] = ("pgd",), budget: AttackBudget | None = None, precision: str = "fp32",
             hardware: Hardware | None = None) -> dict:
    """``steps`` is PGD's (it overrides ``budget.pgd_steps``); the other attacks' budgets are ``budget``'s,
    AutoAttack's standard by default. ``precision`` (auto, fp32, bf16, fp16; see ``eval_precision``)
    applies to the clean pass of a clean-only evaluation; attacks always run in float32."""
    attacks = check_attack_names(attacks)
    if not getattr(model, "_prompts_enabled", True):
        raise ValueError("evaluation attacks the tuned model: evaluate was called inside model.prompts_disabled() "
                         "(the frozen CLIP branch), whose robustness is not the tuned model's")
    budget = replace(budget or AttackBudget(), pgd_steps=steps)
    device = model.pixel_mean.device
    used = eval_precision(precision, eps_list, device, hardware)
    model.eval()
    classifier = ZeroShotClassifier(model, _class_embeddings(model, data))
    indices = list(range(len(data)))
    if max_samples is not None and max_samples < len(indices):
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
        indices = sorted(order[:max_samples].tolist())
    loader = DataLoader(Subset(data.dataset, indices), batch_size=batch_size, shuffle=False)
    result = attack_robustness(classifier, loader, len(data.classnames), eps_list, attacks=attacks, budget=budget,
                               seed=seed, progress=progress, name=f"eval {data.name}", device=device,
                               clean_precision=used["clean"])
    return {"dataset": data.name, "classes": len(data.classnames), **result, "pgd_steps": steps, "precision": used}


def _masking_cell(result: dict) -> str:
    checks = result.get("masking", {})
    checked = {eps: c for eps, c in checks.items() if c.get("checked")}
    if not checked:
        return "not checked (no Square run)"
    suspected = [f"{eps} ({100 * c['fraction']:.1f}% Square only)" for eps, c in checked.items() if c["suspected"]]
    if suspected:
        return "**masking suspected** at " + ", ".join(suspected)
    return f"no (Square only ≤ {100 * max(c['fraction'] for c in checked.values()):.1f}%)"


def markdown_table(results: list[dict]) -> str:
    """Clean accuracy, robust accuracy (%) per attack and eps, the worst case when more than one attack ran,
    and the gradient-masking check."""
    if not results:
        return ""
    first = results[0]
    eps_keys = list(first["robust_acc"])
    attacks = first.get("attacks", ["pgd"])
    budget = first.get("budget", {"pgd_steps": first.get("pgd_steps", 100)})
    header = ["dataset", "n", "clean"] + [f"{attack_title(a, budget)} {k}" for a in attacks for k in eps_keys]
    if len(attacks) > 1:
        header += [f"worst {k}" for k in eps_keys]
    header.append("gradient masking")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        by_attack = r.get("robust_acc_by_attack", {k: {"pgd": v} for k, v in r["robust_acc"].items()})
        cells = [r["dataset"], str(r["n"]), f"{100 * r['clean_acc']:.2f}"]
        for a in attacks:
            for k in eps_keys:
                value = by_attack.get(k, {}).get(a)
                cells.append("n/a" if value is None else f"{100 * value:.2f}")
        if len(attacks) > 1:
            cells += [f"{100 * r['robust_acc'][k]:.2f}" for k in eps_keys]
        cells.append(_masking_cell(r))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['dataset']}, {a}: " + (why if isinstance(why, str) else "; ".join(f"{s}: {w}" for s, w in why.items()))
             for r in results for a, why in r.get("not_applicable", {}).items()]
    return "\n".join(lines + ([""] + [f"n/a — {note}" for note in notes] if notes else [])) + "\n"


def write_results(results: list[dict], output_dir: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    json_path.write_text(json.dumps({**(extra or {}), "results": results}, indent=2))
    md_path.write_text(markdown_table(results))
    return json_path, md_path
