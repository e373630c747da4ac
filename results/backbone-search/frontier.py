"""The backbone search's clean/robust frontier on the validation images: one point per FARE run (and
WiSE-FT mixing weight w), zero-shot at w = 0, and the goal's region (robust >= zero-shot + 15, clean
>= zero-shot - 5) shaded.   python results/backbone-search/frontier.py  ->  frontier.png"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
LABELS = {"val-committed.json": "seen-pair train images, eps 2, cw 2 (the previous backbone)",
          "val-cw2.json": "every pair (images split), eps 2, cw 2", "val-eps3-cw2.json": "images, eps 3, cw 2",
          "val-eps4-cw2.json": "images, eps 4, cw 2", "val-eps4-cw4.json": "images, eps 4, cw 4 (the served backbone)",
          "val-eps4-cw8.json": "images, eps 4, cw 8"}
runs = {name: json.loads((HERE / "validation" / name).read_text())["rows"] for name in LABELS
        if (HERE / "validation" / name).is_file()}
zero = {r["dataset"]: r for rows in runs.values() for r in rows if r["w"] == 0}
fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
for ax, dataset in zip(axes, ["toyworld_pairs:val", "toyworld_pairs:heldout-val"]):
    z = zero[dataset]
    ax.axvspan(100 * z["clean"] - 5, 100, ymin=0, ymax=1, color="0.92")
    ax.axhline(100 * z["robust"]["2/255"] + 15, color="0.6", ls="--", lw=1)
    ax.plot(100 * z["clean"], 100 * z["robust"]["2/255"], "k*", ms=12, label="zero-shot")
    for name, rows in runs.items():
        points = sorted((r for r in rows if r["dataset"] == dataset and r["w"] > 0), key=lambda r: r["w"])
        if points:
            ax.plot([100 * r["clean"] for r in points], [100 * r["robust"]["2/255"] for r in points], "-o", ms=4,
                    label=LABELS[name])
            for r in points:
                if r["w"] < 1:
                    ax.annotate(f"w={r['w']:g}", (100 * r["clean"], 100 * r["robust"]["2/255"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"{dataset} ({z['n']} images, PGD-10)")
    ax.set_xlabel("clean accuracy (%)")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("robust accuracy at 2/255 (%)")
axes[0].legend(fontsize=7, loc="upper right")
fig.suptitle("FARE backbones, zero-shot: shaded = clean within 5 points of zero-shot; dashed = zero-shot + 15 robust")
fig.tight_layout()
fig.savefig(HERE / "frontier.png", dpi=110)
print(f"wrote {HERE / 'frontier.png'}")
