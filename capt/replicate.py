"""The replication grid: methods x shots x eps x seeds, in-distribution and cross-dataset, with a
JSON record, a markdown table (mean ± std over seeds) and plots.

On the embedded default model (the toy CLIP) the protocol is: tune on the toy world's colour x shape
pairs (the seen pairs' training split), test on its test split (in-distribution) and, with the same
prompts, on held-out-pair images labelled by shape and by colour, on counting, and on Fashion-MNIST
(cross-dataset). ``--model ViT-B-32 --pretrained openai --train-data imagenet:/data/imagenet:train
--eval-data ...`` runs the paper's protocol on a GPU.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import default_model
from .attacks.autoattack import check_attack_names, require_backend
from .checkpoint import LATEST_FILE, load_prompted_model
from .config import TrainConfig, load_method
from .data import DataUnavailable, load_dataset
from .evaluate import eps_label, evaluate
from .models import create_clip, pixel_transform
from .prompts import PromptConfig, PromptedCLIP
from .train import _comparable, resolve_device, train

METHODS = ["zeroshot", "apt", "advvp", "advmaple", "fap", "capt"]
TOY_TRAIN = "toyworld_pairs::train"
TOY_EVAL = ["toyworld_pairs::test", "toyworld_shapes::heldout", "toyworld_colours::heldout", "toyworld_counts::test",
            "fashion_mnist"]


@dataclass
class GridConfig:
    model: str = default_model.ARCHITECTURE
    pretrained: str = default_model.relative(default_model.WEIGHTS)
    quick_gelu: bool | None = None  # None: what the pretrained tag or the model name says (capt.models)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])
    eps: list[float] = field(default_factory=lambda: [1 / 255, 4 / 255])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.0035
    train_data: str = TOY_TRAIN
    eval_data: list[str] = field(default_factory=lambda: list(TOY_EVAL))
    eval_samples: int | None = 500
    pgd_steps: int = 100
    # Evaluation attacks (capt.attacks.autoattack.EVAL_ATTACKS); "robust" is the worst case over them.
    attacks: list[str] = field(default_factory=lambda: ["pgd"])
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides) -> "GridConfig":
        # 1/255: at 4/255 no method gets the default toy CLIP off zero robust accuracy, so nothing is compared
        values = dict(shots=[4], eps=[1 / 255], seeds=[1], epochs=3, eval_samples=200, pgd_steps=10)
        values.update(overrides)
        return cls(**values)


def _attack_for(eps: float) -> dict:
    """Training attack of the method page: 2 steps of eps at 1/255, 3 steps of eps/1.5 above."""
    return {"eps": eps, "alpha": eps, "steps": 2} if eps <= 1 / 255 + 1e-9 else {"eps": eps, "alpha": eps / 1.5, "steps": 3}


def run_dir_for(config: TrainConfig, root: str | Path) -> Path:
    """The run folder of ``config`` under ``root``: a readable prefix, then a hash of everything that
    changes the result (the keys a resumed run must keep, as ``train`` compares them), so that runs of
    another model, weights, data, lr, batch size or eps never share a folder."""
    shots = "all" if config.shots is None else config.shots
    eps = eps_label(config.attack.eps).replace("/", "_")  # exact for multiples of 1/255, else 6 digits
    resolved = json.dumps(_comparable(config.to_dict()), sort_keys=True)
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return Path(root) / f"{config.method}-{shots}shot-eps{eps}-seed{config.seed}-{digest}"


def run_grid(grid: GridConfig, output_dir: str | Path, progress: bool = False) -> list[dict]:
    grid.attacks = check_attack_names(grid.attacks)  # before any training: a misspelt attack fails now
    require_backend(grid.attacks)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(grid.device)
    rows: list[dict] = []
    eval_sets = {}
    base = create_clip(grid.model, grid.pretrained, device=device, quick_gelu=grid.quick_gelu)
    transform = pixel_transform(base.preprocess_cfg)
    for spec in grid.eval_data:
        try:
            eval_sets[spec] = load_dataset(spec, transform)
        except DataUnavailable as err:
            print(f"skipping {spec}: {err}")
    for method, shots, eps, seed in itertools.product(grid.methods, grid.shots, grid.eps, grid.seeds):
        started = time.perf_counter()
        if not load_method(method).get("trainable", True):
            if shots != grid.shots[0] or seed != grid.seeds[0]:
                continue  # zero-shot CLIP does not depend on shots or seeds
            model = PromptedCLIP(base, PromptConfig.from_dict(load_method(method).get("prompt"))).to(device)
        else:
            config = TrainConfig.from_dict({
                "model": grid.model, "pretrained": grid.pretrained, "quick_gelu": grid.quick_gelu, "method": method, "data": grid.train_data,
                "shots": shots, "seed": seed, "epochs": grid.epochs, "batch_size": grid.batch_size, "lr": grid.lr,
                "attack": _attack_for(eps), "device": grid.device})
            run_dir = run_dir_for(config, output_dir / "runs")
            config.output_dir = str(run_dir)
            # A run with checkpoints is resumed: train checks that its config.yaml is this config, continues
            # an unfinished run and leaves a finished one as it is.
            train(config, resume=(run_dir / LATEST_FILE).is_file(), progress=progress)
            model, _ = load_prompted_model(run_dir, pretrained=grid.pretrained, device=device)
        train_seconds = time.perf_counter() - started
        for spec, data in eval_sets.items():
            torch.manual_seed(seed)
            result = evaluate(model, data, [eps], steps=grid.pgd_steps, max_samples=grid.eval_samples, seed=seed,
                              progress=progress, attacks=grid.attacks)
            label = eps_label(eps)
            rows.append({"method": method, "shots": shots, "eps": label, "seed": seed, "dataset": data.name,
                         "in_distribution": spec == grid.eval_data[0], "clean": result["clean_acc"],
                         "robust": result["robust_acc"][label], "n": result["n"],
                         "attack": _attack_column(result), "robust_by_attack": result["robust_acc_by_attack"][label],
                         "masking": result["masking"][label], "not_applicable": result["not_applicable"],
                         "train_seconds": round(train_seconds, 1)})
        print(f"{method} {shots}-shot eps {eps_label(eps)} seed {seed}: " + ", ".join(
            f"{r['dataset']} {100 * r['clean']:.1f}/{100 * r['robust']:.1f}"
            + (" (masking suspected)" if r["masking"]["suspected"] else "") for r in rows[-len(eval_sets):]), flush=True)
    (output_dir / "results.json").write_text(json.dumps({"grid": grid.__dict__, "rows": rows}, indent=2))
    (output_dir / "results.md").write_text(summary_table(rows))
    plot(rows, output_dir)
    return rows


def _attack_column(result: dict) -> str:
    """What "robust" means in a row: the attack, or the worst case over the attacks run."""
    titles = [result["attack_titles"][a] for a in result["attacks"]]
    return titles[0] if len(titles) == 1 else "worst of " + ", ".join(titles)


def _masking_summary(rows: list[dict]) -> str:
    """The gradient-masking check over a table row's runs: where Square alone fooled more than 1% of the
    images (capt.evaluate.masking_check), or "no", or "not checked" without Square."""
    checked = [r for r in rows if r.get("masking", {}).get("checked")]
    if not checked:
        return "not checked"
    suspected = [r for r in checked if r["masking"]["suspected"]]
    if not suspected:
        return "no"
    return "**masking suspected**: " + ", ".join(
        f"{r['dataset']} seed {r['seed']} ({100 * r['masking']['fraction']:.1f}%)" for r in suspected)


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summary_table(rows: list[dict]) -> str:
    """clean / robust accuracy (%), mean ± std over seeds; cross-dataset = mean over the other sets."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["shots"], r["eps"]) for r in rows))
    header = (["method", "shots", "eps", "robust under", "gradient masking"] + [f"{d} clean / robust" for d in datasets]
              + ["cross-dataset mean clean / robust"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, shots, eps in keys:
        mine = [r for r in rows if (r["method"], r["shots"], r["eps"]) == (method, shots, eps)]
        cells = []
        for d in datasets:
            cell = [r for r in mine if r["dataset"] == d]
            cells.append(f"{_mean_std([r['clean'] for r in cell])} / {_mean_std([r['robust'] for r in cell])}" if cell else "–")
        cross = {}
        for r in mine:
            if not r["in_distribution"]:
                cross.setdefault(r["seed"], []).append(r)
        clean = [statistics.fmean(x["clean"] for x in v) for v in cross.values()]
        robust = [statistics.fmean(x["robust"] for x in v) for v in cross.values()]
        cells.append(f"{_mean_std(clean)} / {_mean_std(robust)}" if clean else "–")
        attack = " / ".join(dict.fromkeys(r.get("attack", "PGD") for r in mine))
        lines.append("| " + " | ".join([method, str(shots if method != "zeroshot" else "–"), eps, attack,
                                        _masking_summary(mine)] + cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], output_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    in_dist = [r for r in rows if r["in_distribution"]]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in in_dist):
        mine = [r for r in in_dist if r["method"] == method]
        axis.scatter([100 * r["robust"] for r in mine], [100 * r["clean"] for r in mine], label=method)
    axis.set_xlabel("robust accuracy (%)")
    axis.set_ylabel("clean accuracy (%)")
    axis.set_title("in-distribution: clean vs robust")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "clean_vs_robust.png", dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in in_dist):
        by_eps = {}
        for r in in_dist:
            if r["method"] == method:
                by_eps.setdefault(r["eps"], []).append(r["robust"])
        xs = sorted(by_eps, key=lambda e: float(e.split("/")[0]) if "/" in e else float(e) * 255)
        axis.plot(xs, [100 * statistics.fmean(by_eps[x]) for x in xs], marker="o", label=method)
    axis.set_xlabel("eps (train and test)")
    axis.set_ylabel("robust accuracy (%)")
    axis.set_title("in-distribution robust accuracy against eps")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "robust_vs_eps.png", dpi=120)
    plt.close(figure)
