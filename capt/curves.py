"""``capt curves``: learning curves against optimisation steps, from the points that ``capt train``
(with a ``curve:`` section) and ``capt robustify`` record: clean and PGD accuracy on held-out images
and, for prompt tuning, on the run's own training images."""
from __future__ import annotations

import json
from pathlib import Path

from .robustify import CURVE_FILE


def read_curve(run_dir: str | Path) -> dict:
    """``{"name", "kind", "points": [{"step", "heldout": {...}, "train": {...} | None}]}`` of a run."""
    run_dir = Path(run_dir)
    if (run_dir / CURVE_FILE).is_file():
        points = [json.loads(line) for line in (run_dir / CURVE_FILE).read_text().splitlines() if line.strip()]
        return {"name": run_dir.name, "kind": "robustify",
                "points": [{"step": p["step"], "heldout": p, "train": None} for p in points]}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CURVE_FILE} and no metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    points = [{"step": r["step"], **r["curve"]} for r in records if "curve" in r]
    if not points:
        raise ValueError(f"{run_dir}: the run recorded no curve (train it with a curve: section)")
    return {"name": run_dir.name, "kind": "train", "points": points}


def flattened_at(points: list[dict], key: str, tolerance: float = 0.02) -> int | None:
    """The first step from which ``key`` (e.g. ``"2/255"`` or ``"clean"``) of the held-out curve stays
    within ``tolerance`` of its final value; None for fewer than three points."""
    if len(points) < 3:
        return None
    values = [_value(p["heldout"], key) for p in points]
    final = values[-1]
    for i in range(len(values)):
        if all(abs(v - final) <= tolerance for v in values[i:]):
            return points[i]["step"]
    return points[-1]["step"]


def _value(entry: dict, key: str) -> float:
    return entry["clean_acc"] if key == "clean" else entry["robust_acc"][key]


def plot_curves(run_dirs: list[str | Path], output: str | Path, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [read_curve(d) for d in run_dirs]
    eps_keys = sorted({k for c in curves for p in c["points"] for k in p["heldout"]["robust_acc"]},
                      key=lambda k: float(k.split("/")[0]))
    panels = ["clean", *eps_keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for i, curve in enumerate(curves):
            colour = f"C{i}"
            steps = [p["step"] for p in curve["points"]]
            n = curve["points"][-1]["heldout"]["n"]
            ax.plot(steps, [100 * _value(p["heldout"], key) for p in curve["points"]], "-o", ms=3, color=colour,
                    label=f"{curve['name']} held-out ({n})")
            if all(p.get("train") for p in curve["points"]):
                ax.plot(steps, [100 * _value(p["train"], key) for p in curve["points"]], "--", color=colour,
                        alpha=0.7, label=f"{curve['name']} train")
        ax.set_title("clean" if key == "clean" else f"robust at {key}")
        ax.set_xlabel("optimisation steps")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    attack = curves[0]["points"][0]["heldout"].get("attack") or curves[0]["points"][0].get("attack", "PGD")
    fig.suptitle(title or f"learning curves ({attack}; held-out images per run in the legend)")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _run(args) -> None:
    path = plot_curves(args.runs, args.output, args.title)
    for run in args.runs:
        curve = read_curve(run)
        keys = ["clean", *curve["points"][-1]["heldout"]["robust_acc"]]
        flat = {k: flattened_at(curve["points"], k) for k in keys}
        print(f"{curve['name']}: flat (within 2 points of the end) from step " +
              ", ".join(f"{k} {v}" for k, v in flat.items()))
    print(f"written {path}")


def register(subparsers) -> tuple[type[BaseException], ...]:
    """Adds ``curves`` to the ``capt`` sub-commands (entry point of the ``capt.commands`` group)."""
    p = subparsers.add_parser("curves", help="plot learning curves (clean and robust accuracy against steps)")
    p.add_argument("runs", nargs="+", help="run directories of capt train (with curve:) or capt robustify")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title")
    p.set_defaults(run=_run)
    return ()
