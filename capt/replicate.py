"""The replication grid: methods x shots x eps x seeds, in-distribution and cross-dataset, the
stronger attacks on the headline cells, robust accuracy on a finer eps grid, the ablations of CAPT's
loss, a JSON record, markdown tables (mean ± std over seeds, a Wilson interval per cell) and plots.

On the embedded default model (the toy CLIP) the protocol is: tune on the toy world's colour x shape
pairs (the seen pairs' training split), test on its test split (in-distribution) and, with the same
prompts, on held-out-pair images labelled by shape and by colour, on counting, and on Fashion-MNIST
(cross-dataset). ``--model ViT-B-32 --pretrained openai --train-data imagenet:/data/imagenet:train
--eval-data ...`` runs the paper's protocol on a GPU.

Every cell (one method, shots, eps and seed: its training run and its evaluations) is recorded under
``OUTPUT/cells/`` as it finishes, and training runs keep their checkpoints under ``OUTPUT/runs/``:
an interrupted grid run again continues where it stopped. On a CPU, ``workers`` processes of
``cores / workers`` threads each run cells side by side (the toy model's matrices are too small for
two threads to help one process much); a cell's figures do not depend on which worker ran it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import default_model
from .attacks.autoattack import check_attack_names, require_backend
from .checkpoint import LATEST_FILE, atomic_write_text, load_prompted_model
from .config import TrainConfig, load_method
from .data import DataUnavailable, load_dataset
from .data.templates import check_template
from .evaluate import eps_label, evaluate, wilson_interval
from .models import _is_random, create_clip, pixel_transform
from .prompts import PromptConfig, PromptedCLIP
from .train import _comparable, resolve_device, train

METHODS = ["zeroshot", "apt", "advvp", "advmaple", "fap", "capt"]
TOY_TRAIN = "toyworld_pairs::train"
TOY_EVAL = ["toyworld_pairs::test", "toyworld_shapes::heldout", "toyworld_colours::heldout", "toyworld_counts::test",
            "fashion_mnist"]
# The ablations of CAPT's loss and coupling (capt.losses): each a method with some of its sections overridden.
# "CE + TRADES KL with alpha 0" is the FAP-like method itself, and the full loss is "capt": both come from the grid.
ABLATIONS: dict[str, dict] = {
    "capt/ce-only": {"method": "capt", "loss": {"lam": 0.0}},
    "capt/no-consistency": {"method": "capt", "loss": {"consistency": False}},
    "capt/no-trades": {"method": "capt", "loss": {"trades": False}},
    "capt/alpha-hard": {"method": "capt", "loss": {"alpha_mode": "hard"}},
    "capt/alpha-fixed": {"method": "capt", "loss": {"alpha_mode": "fixed", "alpha": 0.5}},
    "capt/independent": {"method": "capt", "prompt": {"coupling": "independent"}},
}
ABLATION_BASELINES = ["capt", "fap"]  # the grid's cells the ablation table compares with
FINE_EPS = [0.5 / 255, 1 / 255, 2 / 255, 3 / 255, 4 / 255, 6 / 255, 8 / 255]
AUTO = "auto"  # GridConfig.reference_pretrained: the original CLIP when tuning on the default robust backbone


@dataclass
class GridConfig:
    """The default is the full grid, sized to finish within 90 minutes on 2 CPU cores (see the README
    for what each size costs in confidence); ``quick()`` is a few minutes."""
    model: str = default_model.ARCHITECTURE
    pretrained: str = default_model.relative(default_model.BASE_WEIGHTS)
    # The frozen CLIP f_0 of CAPT's consistency term: "auto" is the original toy CLIP when ``pretrained``
    # is the default robust backbone (as the served default is tuned), else the tuned model's own weights.
    reference_pretrained: str | None = AUTO
    quick_gelu: bool | None = None  # None: what the pretrained tag or the model name says (capt.models)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 5
    # Optimiser steps per run, at least this many for every shot count: epochs = ceil(steps / steps per
    # epoch), and at least 2 (the first epoch is the warm-up), so that on the toy world 1, 4 and 16 shots
    # take 30, 35 and 52 steps. None: ``epochs`` for every shot count.
    steps: int | None = 30
    max_steps: int | None = None  # stop every run after this many steps (a dry run of a protocol)
    grad_checkpointing: bool = False  # TrainConfig.grad_checkpointing: for 1000-class label sets on small memory
    batch_size: int = 32
    lr: float = 0.0035
    train_data: str = TOY_TRAIN
    eval_data: list[str] = field(default_factory=lambda: list(TOY_EVAL))
    eval_samples: int | None = 200      # in-distribution images per cell
    cross_samples: int | None = 64      # images per cross-dataset set per cell (None: eval_samples)
    pgd_steps: int = 10
    # Templates of every evaluation set instead of each dataset's own (None): ImageNet's 80 templates
    # cost 80 text passes of 1000 labels per hand-prompted model, minutes on a CPU.
    eval_templates: list[str] | None = None
    # Evaluation attacks of every cell (capt.attacks.autoattack.EVAL_ATTACKS); "robust" is the worst case.
    attacks: list[str] = field(default_factory=lambda: ["pgd"])
    # The headline cells (the largest shot count at these eps): PGD-headline_pgd_steps on the
    # in-distribution set, AutoAttack on the first headline seed for headline_autoattack_methods, and
    # robust accuracy at every eps of eps_curve (PGD-pgd_steps).
    headline_eps: list[float] = field(default_factory=lambda: [2 / 255])
    headline_pgd_steps: int = 100
    headline_samples: int | None = 100
    headline_autoattack_methods: list[str] = field(default_factory=lambda: ["zeroshot", "capt"])
    headline_autoattack_samples: int | None = 100
    eps_curve: list[float] = field(default_factory=lambda: list(FINE_EPS))
    eps_curve_samples: int | None = 100
    # The ablations (names of ABLATIONS) at the largest shot count, every seed, at each of ``ablation_at``
    # (None: the first headline eps), beside the grid's CAPT and FAP cells there.
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_at: list[float] | None = None
    workers: int | None = None  # None: 2 on a CPU, 1 on a GPU
    # Training precision (capt.hardware): fp32 by default, so that the grid's figures do not depend on
    # which CPU ran it (auto times bf16 on CPUs with native bf16); evaluation attacks are fp32 whatever this says.
    precision: str = "fp32"
    device: str = "auto"

    def __post_init__(self):
        # A list given twice over (--seeds 1 1) would give two cells one run folder.
        for name in ("methods", "shots", "eps", "seeds", "headline_eps", "eps_curve", "ablations",
                     "headline_autoattack_methods", "ablation_at"):
            if getattr(self, name) is not None:
                setattr(self, name, list(dict.fromkeys(getattr(self, name))))
        if self.reference_pretrained is not None and _is_random(self.reference_pretrained):
            # f_0 as random weights would be another draw than the tuned model's: "none" means the tuned weights.
            self.reference_pretrained = None
        if self.reference_pretrained == AUTO:
            robust_backbone = self.pretrained == default_model.relative(default_model.BASE_WEIGHTS)
            self.reference_pretrained = default_model.relative(default_model.WEIGHTS) if robust_backbone else None
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
        for method in self.methods:
            load_method(method)  # a misspelt method fails before anything runs
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or left out for no limit), got {self.max_steps}")
        for template in self.eval_templates or []:
            check_template(template)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for epochs), got {self.steps}")

    @classmethod
    def quick(cls, **overrides) -> "GridConfig":
        # 1/255: at 4/255 no method gets the default toy CLIP off zero robust accuracy, so nothing is compared
        values = dict(shots=[4], eps=[1 / 255], seeds=[1], epochs=3, steps=None, eval_samples=200, cross_samples=None,
                      pgd_steps=10, headline_eps=[], ablations=[], workers=1)
        values.update(overrides)
        return cls(**values)

    @property
    def headline_shots(self) -> int:
        return max(self.shots)

    @property
    def headline_eps_run(self) -> list[float]:
        """The headline eps the grid trains at (a headline eps outside ``eps`` has no cells)."""
        return [e for e in self.headline_eps if any(math.isclose(e, g) for g in self.eps)]

    @property
    def ablation_eps(self) -> list[float]:
        """Where the ablations run: ``ablation_at`` or the first headline eps, among the grid's eps (beside
        its CAPT and FAP cells there); none without CAPT among the methods."""
        if not self.ablations or "capt" not in self.methods:
            return []
        wanted = self.ablation_at if self.ablation_at is not None else self.headline_eps_run[:1]
        return [e for e in wanted if any(math.isclose(e, g) for g in self.eps)]


def _attack_for(eps: float) -> dict:
    """Training attack of the method page: 2 steps of eps at 1/255, 3 steps of eps/1.5 above."""
    return {"eps": eps, "alpha": eps, "steps": 2} if eps <= 1 / 255 + 1e-9 else {"eps": eps, "alpha": eps / 1.5, "steps": 3}


def epochs_for(steps: int, images: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimiser steps over ``images``, and at least 2: the
    schedule's first epoch is a warm-up at a tiny learning rate."""
    return max(2, math.ceil(steps / math.ceil(images / batch_size)))


def run_dir_for(config: TrainConfig, root: str | Path) -> Path:
    """The run folder of ``config`` under ``root``: a readable prefix, then a hash of everything that
    changes the result (the keys a resumed run must keep, as ``train`` compares them), so that runs of
    another model, weights, data, lr, batch size or eps never share a folder."""
    shots = "all" if config.shots is None else config.shots
    eps = eps_label(config.attack.eps).replace("/", "_")  # exact for multiples of 1/255, else 6 digits
    resolved = json.dumps(_comparable(config.to_dict()), sort_keys=True)
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return Path(root) / f"{config.method}-{shots}shot-eps{eps}-seed{config.seed}-{digest}"


@dataclass
class Evaluation:
    """One measurement of a cell: a dataset, its eps list, attacks and sample size."""
    part: str          # grid | headline | eps_curve
    dataset: str       # a dataset spec (capt.data)
    eps: list[float]
    attacks: list[str]
    pgd_steps: int
    samples: int | None
    in_distribution: bool


@dataclass
class Cell:
    """One method (or ablation), shot count, training eps and seed: a training run and its evaluations."""
    name: str
    method: str
    shots: int | None        # None: zero-shot (no training images)
    eps: float
    seed: int
    part: str                # grid | ablation
    overrides: dict = field(default_factory=dict)
    epochs: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return load_method(self.method).get("trainable", True)

    def train_config(self, grid: GridConfig, runs: Path) -> TrainConfig:
        values = {"model": grid.model, "pretrained": grid.pretrained, "quick_gelu": grid.quick_gelu,
                  "reference_pretrained": grid.reference_pretrained, "method": self.method, "data": grid.train_data,
                  "shots": self.shots, "seed": self.seed, "epochs": self.epochs, "max_steps": grid.max_steps,
                  "batch_size": grid.batch_size, "lr": grid.lr, "attack": _attack_for(self.eps), "device": grid.device,
                  "precision": grid.precision, "grad_checkpointing": grid.grad_checkpointing}
        if grid.max_steps is None:
            del values["max_steps"]  # the key's default: run folders of complete runs keep their names
        for section, overrides in self.overrides.items():
            values[section] = dict(overrides)
        config = TrainConfig.from_dict(values)
        config.output_dir = str(run_dir_for(config, runs))
        return config

    def key(self, grid: GridConfig, runs: Path) -> str:
        """What the cell's record depends on: its training run (or the zero-shot weights) and its evaluations."""
        trained = (Path(self.train_config(grid, runs).output_dir).name if self.trainable
                   else f"{self.method}:{grid.model}:{grid.pretrained}:{grid.quick_gelu}")
        payload = [trained, self.seed, [dataclasses.asdict(e) for e in self.evaluations]]
        if grid.eval_templates:
            payload.append(grid.eval_templates)
        payload = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan(grid: GridConfig, train_sizes: dict[int, int], eval_specs: list[str]) -> list[Cell]:
    """Every cell of ``grid`` in a fixed order; ``train_sizes``: training images per shot count."""
    in_dist, cross = eval_specs[0], eval_specs[1:]
    cross_samples = grid.cross_samples if grid.cross_samples is not None else grid.eval_samples

    def evaluations(name: str, shots: int | None, eps: float, seed: int, part: str) -> list[Evaluation]:
        found = [Evaluation("grid", in_dist, [eps], list(grid.attacks), grid.pgd_steps, grid.eval_samples, True)]
        found += [Evaluation("grid", spec, [eps], list(grid.attacks), grid.pgd_steps, cross_samples, False)
                  for spec in cross]
        headline = part == "grid" and shots in (None, grid.headline_shots) and any(
            math.isclose(eps, e) for e in grid.headline_eps_run)
        if headline:
            found.append(Evaluation("headline", in_dist, [eps], ["pgd"], grid.headline_pgd_steps, grid.headline_samples,
                                    True))
            if name in grid.headline_autoattack_methods and seed == grid.seeds[0]:
                found.append(Evaluation("headline", in_dist, [eps], ["autoattack"], grid.pgd_steps,
                                        grid.headline_autoattack_samples, True))
            if grid.eps_curve:
                found.append(Evaluation("eps_curve", in_dist, list(grid.eps_curve), ["pgd"], grid.pgd_steps,
                                        grid.eps_curve_samples, True))
        return found

    cells = []
    for method, shots, eps, seed in itertools.product(grid.methods, grid.shots, grid.eps, grid.seeds):
        if not load_method(method).get("trainable", True):
            if shots != grid.shots[0]:
                continue  # zero-shot CLIP depends on no shots; it is evaluated on every seed's images
            cells.append(Cell(method, method, None, eps, seed, "grid", evaluations=evaluations(method, None, eps, seed, "grid")))
            continue
        epochs = epochs_for(grid.steps, train_sizes[shots], grid.batch_size) if grid.steps else grid.epochs
        cells.append(Cell(method, method, shots, eps, seed, "grid", epochs=epochs,
                          evaluations=evaluations(method, shots, eps, seed, "grid")))
    shots = grid.headline_shots
    epochs = epochs_for(grid.steps, train_sizes[shots], grid.batch_size) if grid.steps and grid.ablation_eps else grid.epochs
    for eps in grid.ablation_eps:
        for name, seed in itertools.product(grid.ablations, grid.seeds):
            spec = ABLATIONS[name]
            cells.append(Cell(name, spec["method"], shots, eps, seed, "ablation",
                              {k: v for k, v in spec.items() if k != "method"}, epochs,
                              evaluations(name, shots, eps, seed, "ablation")))
    return cells


# --- one cell, in whichever process runs it ---------------------------------------------------------------

_CACHE: dict = {}  # per process: the zero-shot model and the evaluation sets, loaded once
_CELLS_STARTED = [0]  # per process: a cell's peak memory is its own only if it is the first the process ran


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _eval_set(spec: str, model: PromptedCLIP, templates: list[str] | None):
    key = ("data", spec, json.dumps(model.base_clip.preprocess_cfg, sort_keys=True, default=str))
    if key not in _CACHE:
        _CACHE[key] = load_dataset(spec, pixel_transform(model.base_clip.preprocess_cfg))
    data = _CACHE[key]
    return dataclasses.replace(data, templates=list(templates)) if templates else data


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def run_cell(grid: GridConfig, cell: Cell, output_dir: Path, progress: bool = False) -> dict:
    """Train ``cell`` (or resume or reuse its run) and evaluate it; returns the cell's record."""
    device = resolve_device(grid.device)
    started = time.perf_counter()
    rss_before = _peak_rss_mb()
    _CELLS_STARTED[0] += 1
    first_in_process = _CELLS_STARTED[0] == 1
    train_record, complete = {}, True
    if cell.trainable:
        config = cell.train_config(grid, output_dir / "runs")
        run_dir = Path(config.output_dir)
        # A run with checkpoints is resumed: train checks that its config.yaml is this config, continues
        # an unfinished run and leaves a finished one as it is.
        train(config, resume=(run_dir / LATEST_FILE).is_file(), progress=progress)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = history[-1]["step"] if history else 0
        # An interrupted run (stopped before its last epoch) gives rows, but no record to reuse.
        complete = bool(history) and (history[-1]["epoch"] >= config.epochs
                                      or (grid.max_steps is not None and steps >= grid.max_steps))
        seconds = sum(r["seconds"] for r in history)
        train_record = {"run": run_dir.name, "epochs": config.epochs, "steps": steps, "train_seconds": round(seconds, 2),
                        "step_seconds": round(seconds / steps, 4) if steps else None,
                        "alpha_by_epoch": [r.get("alpha") for r in history],
                        "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_rss_before_mb": round(rss_before, 1),
                        "first_in_process": first_in_process}
        model, _ = load_prompted_model(run_dir, pretrained=grid.pretrained, device=device)
    else:
        key = ("model", cell.method, grid.model, grid.pretrained, grid.quick_gelu, str(device))
        if key not in _CACHE:
            base = create_clip(grid.model, grid.pretrained, device=device, quick_gelu=grid.quick_gelu)
            _CACHE[key] = PromptedCLIP(base, PromptConfig.from_dict(load_method(cell.method).get("prompt"))).to(device)
        model = _CACHE[key]
    rows = []
    for evaluation in cell.evaluations:
        data = _eval_set(evaluation.dataset, model, grid.eval_templates)
        torch.manual_seed(cell.seed)
        result = evaluate(model, data, evaluation.eps, steps=evaluation.pgd_steps, max_samples=evaluation.samples,
                          seed=cell.seed, progress=progress, attacks=evaluation.attacks)
        for eps in evaluation.eps:
            label = eps_label(eps)
            n = result["n"]
            rows.append({"part": evaluation.part if cell.part == "grid" else cell.part, "method": cell.name,
                         "base_method": cell.method, "shots": cell.shots, "eps": label, "train_eps": eps_label(cell.eps),
                         "seed": cell.seed, "dataset": data.name, "in_distribution": evaluation.in_distribution,
                         "clean": result["clean_acc"], "robust": result["robust_acc"][label], "n": n,
                         "correct_clean": round(result["clean_acc"] * n), "correct_robust": round(result["robust_acc"][label] * n),
                         "attack": _attack_column(result), "robust_by_attack": result["robust_acc_by_attack"][label],
                         "masking": result["masking"][label], "not_applicable": result["not_applicable"],
                         "attack_seconds": result.get("attack_seconds", {}), **train_record})
    return {"cell": dataclasses.asdict(cell), "rows": rows, "seconds": round(time.perf_counter() - started, 2),
            "threads": torch.get_num_threads(), "complete": complete}


def _run_cell_in_worker(grid: GridConfig, cell: Cell, output_dir: str) -> dict:
    return run_cell(grid, cell, Path(output_dir))


# --- the grid ------------------------------------------------------------------------------------------------

def _materialise_random_weights(grid: GridConfig, output_dir: Path, device) -> GridConfig:
    """Random weights (``pretrained: none``) are drawn once, seeded, and written to the output folder, so
    that every cell, every process and a run's evaluation use the same network (each ``create_clip`` of
    "none" would draw another)."""
    if not _is_random(grid.pretrained):
        return grid
    from safetensors.torch import save_file
    path = output_dir / f"random-weights-{grid.model}{'-quickgelu' if grid.quick_gelu else ''}-seed{grid.seeds[0]}.safetensors"
    if not path.is_file():
        torch.manual_seed(grid.seeds[0])
        clip = create_clip(grid.model, None, device="cpu", quick_gelu=grid.quick_gelu)
        state = {k: v.detach().contiguous().clone() for k, v in clip.model.state_dict().items()}
        partial = path.with_suffix(".partial")
        save_file(state, str(partial))
        os.replace(partial, path)
    return dataclasses.replace(grid, pretrained=str(path.resolve()))


def _left_out(grid: GridConfig) -> list[str]:
    """What the grid was asked for but will not run, said before it runs."""
    notes = []
    missing = [eps_label(e) for e in grid.headline_eps if e not in grid.headline_eps_run]
    if missing:
        notes.append(f"headline eps {', '.join(missing)} not among the grid's eps ({', '.join(map(eps_label, grid.eps))}): "
                     "no headline cells there")
    if grid.ablations and not grid.ablation_eps:
        why = ("capt is not among the methods" if "capt" not in grid.methods
               else "none of their eps (--ablation-eps, or the first headline eps) is among the grid's eps")
        notes.append(f"the ablations do not run: {why}")
    return notes


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_weights_unchanged(grid: GridConfig, output_dir: Path) -> None:
    """Cells and runs are keyed by the weights' paths: a folder whose weights files changed since its
    cells were recorded (e.g. ``capt pretrain`` again into the same path) is refused, not reused."""
    from .models import REPO_ROOT
    stamps = {}
    for role, source in (("pretrained", grid.pretrained), ("reference_pretrained", grid.reference_pretrained)):
        if source is None:
            continue
        path = Path(source) if Path(source).is_file() else REPO_ROOT / source
        if path.is_file():  # a pretrained tag (e.g. openai) names fixed weights
            stamps[f"{role}:{source}"] = _sha256(str(path))
    record = output_dir / "weights.json"
    known = json.loads(record.read_text()) if record.is_file() else {}
    changed = [k.split(":", 1)[1] for k, v in stamps.items() if k in known and known[k] != v]
    if changed:
        raise ValueError(f"the weights in {', '.join(changed)} changed since {output_dir}'s cells were recorded "
                         f"(sha256 in {record}); use another --output, or delete {output_dir}/cells and "
                         f"{output_dir}/runs to measure the new weights")
    if stamps.keys() - known.keys():
        atomic_write_text(record, json.dumps({**known, **stamps}, indent=1))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_grid(grid: GridConfig, output_dir: str | Path, progress: bool = False) -> list[dict]:
    grid.attacks = check_attack_names(grid.attacks)  # before any training: a misspelt attack fails now
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(grid.device)
    if grid.workers is None:
        grid = dataclasses.replace(grid, workers=2 if device.type == "cpu" else 1)
    if grid.workers > 1 and device.type != "cpu":
        raise ValueError(f"workers > 1 share a CPU's cores; on {device.type} run one worker")
    for note in _left_out(grid):
        warnings.warn(note, UserWarning, stacklevel=2)
    requested = dataclasses.asdict(grid)
    grid = _materialise_random_weights(grid, output_dir, device)
    _check_weights_unchanged(grid, output_dir)

    # What is there to evaluate on and to train with (loaded once here; each worker loads its own).
    base = create_clip(grid.model, grid.pretrained, device="cpu", quick_gelu=grid.quick_gelu)
    transform = pixel_transform(base.preprocess_cfg)
    del base
    eval_specs = []
    for spec in grid.eval_data:
        try:
            load_dataset(spec, transform)
            eval_specs.append(spec)
        except DataUnavailable as err:
            if spec == grid.eval_data[0]:
                raise
            print(f"skipping {spec}: {err}")
    train_sizes = {}
    if any(load_method(m).get("trainable", True) for m in grid.methods) or grid.ablations:
        train_set = load_dataset(grid.train_data, transform)
        train_sizes = {shots: len(train_set.few_shot(shots, grid.seeds[0])) for shots in grid.shots}
    cells = plan(grid, train_sizes, eval_specs)
    require_backend(sorted({a for cell in cells for e in cell.evaluations for a in e.attacks}))

    cell_dir = output_dir / "cells"
    cell_dir.mkdir(exist_ok=True)
    runs = output_dir / "runs"
    keys = [cell.key(grid, runs) for cell in cells]
    records: dict[str, dict] = {}
    for key in keys:
        path = cell_dir / f"{key}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("complete"):
                records[key] = record
    pending = [(key, cell) for key, cell in zip(keys, cells) if key not in records]
    threads = max(1, _usable_cores() // grid.workers) if device.type == "cpu" else torch.get_num_threads()
    print(f"{len(cells)} cells, {len(cells) - len(pending)} recorded before; {len(pending)} to run on "
          f"{grid.workers} worker(s) of {threads} thread(s)", flush=True)
    started = time.perf_counter()

    def finished(key: str, record: dict, bar) -> None:
        record["key"] = key
        if record["complete"]:
            atomic_write_text(cell_dir / f"{key}.json", json.dumps(record, indent=1))
        records[key] = record
        bar.update(1)
        cell = record["cell"]
        shown = [r for r in record["rows"] if r["part"] in ("grid", "ablation")]
        bar.write(f"{cell['name']} {str(cell['shots']) + '-shot' if cell['shots'] else 'zero-shot'} eps {eps_label(cell['eps'])} seed {cell['seed']} "
                  f"({record['seconds']:.0f} s): " + ", ".join(
                      f"{r['dataset']} {100 * r['clean']:.1f}/{100 * r['robust']:.1f}"
                      + (" (masking suspected)" if r["masking"]["suspected"] else "") for r in shown))

    with tqdm(total=len(pending), desc="replicate", unit="cell", disable=not progress, dynamic_ncols=True) as bar:
        if grid.workers == 1 or len(pending) <= 1:
            previous = torch.get_num_threads()
            if device.type == "cpu":
                torch.set_num_threads(threads)
            try:
                for key, cell in pending:
                    finished(key, run_cell(grid, cell, output_dir, progress=progress), bar)
            finally:
                torch.set_num_threads(previous)
                _CACHE.clear()
        else:
            context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
            with concurrent.futures.ProcessPoolExecutor(grid.workers, mp_context=context, initializer=_init_worker,
                                                        initargs=(threads,)) as pool:
                futures = {pool.submit(_run_cell_in_worker, grid, cell, str(output_dir)): key for key, cell in pending}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        finished(futures[future], future.result(), bar)
                except BaseException:
                    # Queued cells never start; running ones finish (their runs are checkpointed either way).
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    wall = time.perf_counter() - started
    rows = [row for key in keys for row in records[key]["rows"]]
    timing = {"wall_seconds_this_call": round(wall, 1), "cells_run_this_call": len(pending),
              "cell_seconds_total": round(sum(records[k]["seconds"] for k in keys), 1), "workers": grid.workers,
              "threads_per_worker": threads}
    (output_dir / "results.json").write_text(json.dumps(
        {"grid": requested, "timing": timing, "rows": rows}, indent=1))
    alpha = alpha_report(grid, [records[k] for k in keys], output_dir)
    (output_dir / "results.md").write_text(report(rows, alpha))
    plot(rows, output_dir)
    return rows


def _attack_column(result: dict) -> str:
    """What "robust" means in a row: the attack, or the worst case over the attacks run."""
    titles = [result["attack_titles"][a] for a in result["attacks"]]
    return titles[0] if len(titles) == 1 else "worst of " + ", ".join(titles)


# --- tables ---------------------------------------------------------------------------------------------------

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


def pooled_interval(rows: list[dict], key: str = "robust") -> list[float] | None:
    """Wilson 95% interval (in %) of the images of ``rows`` pooled over their seeds: the binomial
    uncertainty of a cell's figure from the number of images alone (the std over seeds adds training's)."""
    if not rows or any("n" not in r for r in rows):
        return None
    n = sum(r["n"] for r in rows)
    successes = sum(round(r[key] * r["n"]) for r in rows)
    return [round(100 * x, 1) for x in wilson_interval(successes, n)]


def _with_interval(rows: list[dict], key: str) -> str:
    interval = pooled_interval(rows, key)
    text = _mean_std([r[key] for r in rows])
    return f"{text} [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else text


def summary_table(rows: list[dict]) -> str:
    """clean / robust accuracy (%), mean ± std over seeds; cross-dataset = mean over the other sets."""
    rows = [r for r in rows if r.get("part", "grid") in ("grid", "ablation")]
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
        lines.append("| " + " | ".join([method, str(shots if shots is not None and method != "zeroshot" else "–"), eps,
                                        attack, _masking_summary(mine)] + cells) + " |")
    return "\n".join(lines) + "\n"


def _images(rows: list[dict]) -> str:
    sizes = sorted({r["n"] for r in rows})
    return "/".join(map(str, sizes)) + " images" + (" per seed" if len({r["seed"] for r in rows}) > 1 else "")


def headline_table(rows: list[dict]) -> str:
    """The headline cells, in-distribution: clean accuracy, robust accuracy under every cell's attack, the
    headline's longer PGD and AutoAttack; each column says its attack and its images."""
    head = [r for r in rows if r["in_distribution"] and r["part"] in ("grid", "headline")]
    keys = list(dict.fromkeys((r["method"], r["shots"], r["eps"]) for r in head if r["part"] == "headline"))
    if not keys:
        return ""
    columns = {"grid": [r for r in head if r["part"] == "grid" and (r["method"], r["shots"], r["eps"]) in keys],
               "pgd": [r for r in head if r["part"] == "headline" and "autoattack" not in r["robust_by_attack"]],
               "autoattack": [r for r in head if r["part"] == "headline" and "autoattack" in r["robust_by_attack"]]}
    titles = {name: f"robust, {' / '.join(dict.fromkeys(r['attack'] for r in found))} ({_images(found)})"
              for name, found in columns.items() if found}
    header = ["method", "shots", "eps", f"clean ({_images(columns['grid'])})"] + [titles[n] for n in columns if n in titles]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        mine = {name: [r for r in found if (r["method"], r["shots"], r["eps"]) == key] for name, found in columns.items()}
        cells = [_with_interval(mine["grid"], "clean") if mine["grid"] else "–"]
        cells += [_with_interval(mine[name], "robust") if mine[name] else "–" for name in columns if name in titles]
        method, shots, eps = key
        lines.append("| " + " | ".join([method, str(shots if shots is not None else "–"), eps] + cells) + " |")
    return "\n".join(lines) + "\n"


def eps_curve_table(rows: list[dict]) -> str:
    curve = [r for r in rows if r["part"] == "eps_curve"]
    if not curve:
        return ""
    eps_values = sorted(dict.fromkeys(r["eps"] for r in curve), key=_eps_value)
    lines = ["| method (trained at) | " + " | ".join(eps_values) + " |", "|---|" + "---|" * len(eps_values)]
    for method, train_eps in dict.fromkeys((r["method"], r["train_eps"]) for r in curve):
        mine = [r for r in curve if (r["method"], r["train_eps"]) == (method, train_eps)]
        cells = [_mean_std([r["robust"] for r in mine if r["eps"] == e]) if any(r["eps"] == e for r in mine) else "–"
                 for e in eps_values]
        lines.append(f"| {method} ({'zero-shot' if mine[0]['shots'] is None else train_eps}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def step_table(rows: list[dict]) -> str:
    """Training cost per method at each shot count: mean seconds per optimiser step, steps, peak memory."""
    trained = {}
    for r in rows:
        if r.get("step_seconds") and r["part"] in ("grid", "ablation"):
            trained.setdefault((r["method"], r["shots"]), {})[(r["seed"], r["train_eps"])] = r
    if not trained:
        return ""
    lines = ["| method | shots | steps per run | seconds per step (mean ± std over runs) | training s per run | "
             "peak memory by the end of training (MB) |", "|---|---|---|---|---|---|"]
    for (method, shots), runs in trained.items():
        values = list(runs.values())
        # A process's peak memory is the largest of every cell it ran: only a process's first cell has its own.
        memory = [v["peak_rss_mb"] for v in values if v.get("first_in_process")]
        lines.append(f"| {method} | {shots} | {values[0]['steps']} | "
                     f"{_plain_mean_std([v['step_seconds'] for v in values], 3)} | "
                     f"{_plain_mean_std([v['train_seconds'] for v in values], 1)} | "
                     f"{_plain_mean_std(memory, 0) if memory else '–'} |")
    return "\n".join(lines) + "\n"


def _plain_mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def ablation_table(rows: list[dict]) -> str:
    """The ablations beside the grid's CAPT, FAP-like and zero-shot cells at the same shots and eps."""
    ablation = [r for r in rows if r["part"] == "ablation"]
    tables = []
    for eps in sorted(dict.fromkeys(r["eps"] for r in ablation), key=_eps_value):
        mine = [r for r in ablation if r["eps"] == eps]
        shots = mine[0]["shots"]
        baselines = [r for r in rows if r["part"] == "grid" and r["eps"] == eps
                     and r["method"] in ABLATION_BASELINES + ["zeroshot"] and r["shots"] in (shots, None)]
        tables.append(summary_table(baselines + mine))
    return "\n".join(tables)


def report(rows: list[dict], alpha: dict | None = None) -> str:
    """results.md: the grid, then (when run) the headline cells, the eps curve, the ablations, alpha and training cost."""
    sections = [summary_table([r for r in rows if r["part"] == "grid"])]
    for title, table in (("Headline cells (in-distribution; mean ± std over seeds [Wilson 95% interval of the pooled "
                          "images])", headline_table(rows)),
                         ("Ablations (mean ± std over seeds)", ablation_table(rows)),
                         ("CAPT's adaptive weight alpha", alpha_table(alpha or {})),
                         ("Robust accuracy against eps (in-distribution, PGD; mean ± std over seeds)",
                          eps_curve_table(rows)),
                         ("Training cost", step_table(rows))):
        if table:
            sections.append(f"### {title}\n\n{table}")
    return "\n".join(sections)


# --- plots ----------------------------------------------------------------------------------------------------

def _eps_value(label: str) -> float:
    return float(label.split("/")[0]) / float(label.split("/")[1]) if "/" in label else float(label)


def plot(rows: list[dict], output_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    in_dist = [r for r in rows if r["in_distribution"] and r.get("part", "grid") == "grid"]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in in_dist):
        mine = [r for r in in_dist if r["method"] == method]
        axis.scatter([100 * r["robust"] for r in mine], [100 * r["clean"] for r in mine], label=method)
    axis.set_xlabel("robust accuracy (%)")
    axis.set_ylabel("clean accuracy (%)")
    axis.set_title("in-distribution: clean vs robust (every cell and seed)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "clean_vs_robust.png", dpi=120)
    plt.close(figure)

    curve = [r for r in rows if r.get("part") == "eps_curve"]
    fine = bool(curve)
    if not fine:  # the grid's own cells, at its largest shot count: one model per eps
        largest = max((r["shots"] for r in in_dist if r["shots"] is not None), default=None)
        curve = [{**r, "train_eps": "its eps"} for r in in_dist if r["shots"] in (None, largest)]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method, train_eps in dict.fromkeys((r["method"], r["train_eps"]) for r in curve):
        by_eps = {}
        for r in curve:
            if (r["method"], r["train_eps"]) == (method, train_eps):
                by_eps.setdefault(r["eps"], []).append(100 * r["robust"])
        xs = sorted(by_eps, key=_eps_value)
        means = [statistics.fmean(by_eps[x]) for x in xs]
        errors = [statistics.stdev(by_eps[x]) if len(by_eps[x]) > 1 else 0.0 for x in xs]
        several = len({r["train_eps"] for r in curve if r["method"] == method}) > 1
        axis.errorbar([255 * _eps_value(x) for x in xs], means, yerr=errors, marker="o", capsize=3,
                      label=f"{method} (trained at {train_eps})" if several else method)
    axis.set_xlabel("eps (x/255)" + ("" if fine else ", train and test"))
    axis.set_ylabel("robust accuracy (%)")
    axis.set_title("in-distribution robust accuracy against eps" + (" (headline runs)" if fine else ""))
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "robust_vs_eps.png", dpi=120)
    plt.close(figure)

    shots_values = sorted({r["shots"] for r in in_dist if r["shots"] is not None})
    eps_values = sorted(dict.fromkeys(r["eps"] for r in in_dist), key=_eps_value)
    if len(shots_values) > 1:
        figure, axes = plt.subplots(1, len(eps_values), figsize=(4.5 * len(eps_values), 4), squeeze=False)
        for axis, eps in zip(axes[0], eps_values):
            for method in dict.fromkeys(r["method"] for r in in_dist):
                mine = [r for r in in_dist if r["method"] == method and r["eps"] == eps]
                if not mine:
                    continue
                if mine[0]["shots"] is None:  # zero-shot: a line across the shot counts
                    axis.axhline(100 * statistics.fmean(r["robust"] for r in mine), color="grey", linestyle="--",
                                 label=method)
                    continue
                means = [100 * statistics.fmean([r["robust"] for r in mine if r["shots"] == s] or [math.nan])
                         for s in shots_values]
                axis.plot(shots_values, means, marker="o", label=method)
            axis.set_xscale("log", base=2)
            axis.set_xticks(shots_values, [str(s) for s in shots_values])
            axis.set_xlabel("shots per class")
            axis.set_ylabel("robust accuracy (%)")
            axis.set_title(f"trained and tested at {eps}")
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(output_dir / "robust_vs_shots.png", dpi=120)
        plt.close(figure)

    ablation = [r for r in rows if r["in_distribution"] and r.get("part") == "ablation"]
    if ablation:
        eps_values = sorted(dict.fromkeys(r["eps"] for r in ablation), key=_eps_value)
        names = list(dict.fromkeys(["zeroshot"] + ABLATION_BASELINES + [r["method"] for r in ablation]))
        figure, axes = plt.subplots(1, len(eps_values), figsize=((1.1 * len(names) + 2) * len(eps_values), 4.5),
                                    squeeze=False)
        for axis, eps in zip(axes[0], eps_values):
            shots = next(r["shots"] for r in ablation if r["eps"] == eps)
            compared = [r for r in in_dist if r["method"] in ABLATION_BASELINES + ["zeroshot"] and r["eps"] == eps
                        and r["shots"] in (shots, None)] + [r for r in ablation if r["eps"] == eps]
            for offset, key in ((-0.2, "clean"), (0.2, "robust")):
                values = [[100 * r[key] for r in compared if r["method"] == n] or [math.nan] for n in names]
                axis.bar([i + offset for i in range(len(names))], [statistics.fmean(v) for v in values], width=0.4,
                         yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], capsize=3, label=key)
            axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
            axis.set_ylabel("accuracy (%)")
            axis.set_title(f"{shots} shots, trained and tested at {eps} (mean ± std over seeds)")
            axis.legend()
        figure.tight_layout()
        figure.savefig(output_dir / "ablations.png", dpi=120)
        plt.close(figure)


# --- CAPT's adaptive weight ------------------------------------------------------------------------------------

def alpha_report(grid: GridConfig, records: list[dict], output_dir: Path) -> dict:
    """How CAPT's soft alpha (the frozen CLIP's probability of the true class, capt.losses) is distributed
    over the headline runs' training images, seed by seed, and the mean alpha of each epoch of the grid's
    CAPT runs (from their records). Written to alpha.json and alpha.png; {} when no CAPT cell ran."""
    capt_runs = [r for r in records if r["cell"]["name"] == "capt" and r["rows"] and r["rows"][0].get("alpha_by_epoch")]
    if not capt_runs or grid.max_steps is not None:
        return {}  # a dry run's few steps say nothing of alpha, and the report would encode every training image
    from torch.utils.data import DataLoader
    device = resolve_device(grid.device)
    clip = create_clip(grid.model, grid.reference_pretrained or grid.pretrained, device=device, quick_gelu=grid.quick_gelu)
    reference = PromptedCLIP(clip, PromptConfig()).to(device).eval()
    train_set = load_dataset(grid.train_data, pixel_transform(clip.preprocess_cfg))
    distribution = {}
    for seed in grid.seeds:
        data = train_set.few_shot(grid.headline_shots, seed)
        probabilities, labels = [], []
        with torch.no_grad():
            text = reference.encode_labels(data.classnames)  # the hand prompt, as the trainer's f_0 sees it
            for images, batch_labels in DataLoader(data.dataset, batch_size=128):
                logits = reference.logits(reference.encode_image(images.to(device)), text).float()
                probabilities.append(torch.softmax(logits, -1).cpu())
                labels.append(batch_labels)
        probabilities, labels = torch.cat(probabilities), torch.cat(labels)
        alpha = probabilities.gather(1, labels[:, None]).squeeze(1)
        quantiles = torch.quantile(alpha, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
        distribution[seed] = {"images": alpha.numel(), "mean": round(alpha.mean().item(), 4),
                              "quantiles_10_25_50_75_90": [round(q, 4) for q in quantiles],
                              "share_below_0.1": round((alpha < 0.1).float().mean().item(), 4),
                              "share_above_0.9": round((alpha > 0.9).float().mean().item(), 4),
                              "frozen_top1": round((probabilities.argmax(-1) == labels).float().mean().item(), 4),
                              "histogram_0_to_1_in_10": torch.histc(alpha, bins=10, min=0, max=1).int().tolist(),
                              "values": [round(a, 4) for a in alpha.tolist()]}
    by_epoch = [{"run": r["rows"][0].get("run"), "shots": r["cell"]["shots"], "eps": eps_label(r["cell"]["eps"]),
                 "seed": r["cell"]["seed"], "alpha_by_epoch": r["rows"][0]["alpha_by_epoch"]} for r in capt_runs]
    report = {"reference": grid.reference_pretrained or grid.pretrained, "shots": grid.headline_shots,
              "by_seed": distribution, "by_epoch": by_epoch}
    (output_dir / "alpha.json").write_text(json.dumps(report, indent=1))
    _plot_alpha(report, output_dir)
    return report


def alpha_table(alpha: dict) -> str:
    if not alpha:
        return ""
    lines = [f"Soft alpha = the frozen CLIP's ({alpha['reference']}) probability of the true class, on each seed's "
             f"{alpha['shots']}-shot training images:", "",
             "| seed | images | mean | 10/25/50/75/90% quantiles | alpha < 0.1 | alpha > 0.9 | frozen CLIP top-1 |",
             "|---|---|---|---|---|---|---|"]
    for seed, d in alpha["by_seed"].items():
        lines.append(f"| {seed} | {d['images']} | {d['mean']:.3f} | "
                     + " / ".join(f"{q:.2f}" for q in d["quantiles_10_25_50_75_90"])
                     + f" | {100 * d['share_below_0.1']:.1f}% | {100 * d['share_above_0.9']:.1f}% | {100 * d['frozen_top1']:.1f}% |")
    spreads = [max(e["alpha_by_epoch"]) - min(e["alpha_by_epoch"]) for e in alpha["by_epoch"] if len(e["alpha_by_epoch"]) > 1]
    if spreads:
        lines += ["", f"Mean alpha per epoch in the grid's {len(alpha['by_epoch'])} CAPT runs: largest change from one "
                      f"epoch to another within a run {max(spreads):.2g} (alpha is the frozen CLIP's, on fixed images: "
                      "it cannot change during training; a partial epoch or an epoch of other images would move its mean)."]
    return "\n".join(lines) + "\n"


def _plot_alpha(report: dict, output_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    values = [v for d in report["by_seed"].values() for v in d["values"]]
    left.hist(values, bins=20, range=(0, 1), color="tab:blue")
    left.set_xlabel("alpha (frozen CLIP's probability of the true class)")
    left.set_ylabel("training images (all seeds)")
    left.set_title(f"soft alpha, {report['shots']}-shot training images")
    for run in report["by_epoch"]:
        right.plot(range(1, len(run["alpha_by_epoch"]) + 1), run["alpha_by_epoch"], marker="o", alpha=0.6,
                   label=f"{run['shots']}-shot {run['eps']} seed {run['seed']}")
    right.set_xlabel("epoch")
    right.set_ylabel("mean alpha over the epoch's images")
    right.set_title("CAPT runs: mean alpha per epoch")
    if len(report["by_epoch"]) <= 12:
        right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "alpha.png", dpi=120)
    plt.close(figure)
