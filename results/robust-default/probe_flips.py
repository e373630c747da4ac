"""How often the server's probe flips the served default against zero-shot CLIP, on the same images.

Both models are exported as bundles and loaded by ``serving.model.ServingModel`` (the server's own
code); each image of the pair test split and of the held-out pairs is probed as a client would:
``probe(image, labels=the 64 pair names, true_label=its class, eps, steps=10, attack="apgd")``, judged
on the 8-bit adversarial image. A flip counts only where the clean prediction was right.

    python results/robust-default/probe_flips.py [--images 100] [--eps 2/255]
        -> results/robust-default/probe_flips.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def zero_shot_checkpoint(directory: Path, weights: Path) -> Path:
    """A checkpoint with no prompts on ``weights``: zero-shot CLIP in the bundle format."""
    from capt import PromptedCLIP, create_clip
    from capt.checkpoint import save_checkpoint
    from capt.prompts import PromptConfig
    model = PromptedCLIP(create_clip("capt-toy-vit", str(weights)), PromptConfig())
    return save_checkpoint(directory, 0, model, {"method": "zeroshot", "classnames": []})


def main() -> None:
    from capt import default_model
    from capt.config import parse_eps
    from capt.data.toyworld import ToyWorldTask
    from export import export_bundle
    from serving.model import ServingModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=parse_eps, default=2 / 255)
    parser.add_argument("--output", default=str(REPO / "results/robust-default/probe_flips.json"))
    args = parser.parse_args()
    results = {"images_per_set": args.images, "eps": args.eps, "attack": "apgd, 10 steps, 1 restart, seed 0",
               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundles = {"zero-shot": (zero_shot_checkpoint(tmp / "zs", default_model.WEIGHTS), default_model.WEIGHTS),
                   "served default": (default_model.PROMPTS, default_model.BASE_WEIGHTS)}
        for name, (checkpoint, weights) in bundles.items():
            bundle = tmp / f"bundle-{name.replace(' ', '-')}"
            export_bundle(checkpoint, bundle, pretrained=str(weights), sample_data=default_model.SAMPLE_DATA)
            model = ServingModel(bundle)
            per_set = {}
            for split in ("test", "heldout"):
                task = ToyWorldTask("pairs", split)
                started, right, flipped = time.perf_counter(), 0, 0
                for index in range(args.images):
                    image, label = task[index]
                    answer = model.probe(image, task.classnames, true_label=task.classnames[label], eps=args.eps,
                                         steps=10, attack="apgd")
                    if answer["clean"]["label"] == task.classnames[label]:
                        right += 1
                        flipped += bool(answer["flipped"])
                per_set[f"toyworld_pairs:{split}"] = {
                    "images": args.images, "clean_right": right, "flipped": flipped,
                    "flip_rate_of_right": round(flipped / max(right, 1), 4),
                    "still_right_after_probe": right - flipped, "seconds": round(time.perf_counter() - started, 1)}
                print(name, split, per_set[f"toyworld_pairs:{split}"], flush=True)
            results["models"][name] = per_set
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
