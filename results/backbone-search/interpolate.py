"""Weight-space interpolation of the image tower (WiSE-FT; Wortsman et al., CVPR 2022) between the
original CLIP and a robust backbone: theta(w) = (1 - w) * theta_0 + w * theta_robust, text tower
untouched. Zero-shot clean / PGD accuracy of each w on the validation images of the seen and the
held-out pairs (never the test images that the README's figures are reported on).

    python results/backbone-search/interpolate.py ROBUST.safetensors OUT.json [--weights 0.5 0.75 1]
"""
import argparse
import json
import sys
import time

import torch
from safetensors.torch import load_file

from capt.data import load_dataset
from capt.evaluate import evaluate
from capt.models import create_clip, pixel_transform
from capt.prompts import PromptConfig, PromptedCLIP

ORIGINAL = "models/capt-toy/weights.safetensors"

parser = argparse.ArgumentParser()
parser.add_argument("robust")
parser.add_argument("output")
parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.7, 0.85, 1.0])
parser.add_argument("--samples", type=int, default=200)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--data", nargs="+", default=["toyworld_pairs::val", "toyworld_pairs::heldout-val"])
args = parser.parse_args()

original, robust = load_file(ORIGINAL), load_file(args.robust)
if set(original) != set(robust):
    sys.exit("the two state dicts hold different keys")
rows = []
for w in args.weights:
    mixed = {k: (v.float() if not k.startswith("visual.") else (1 - w) * v.float() + w * robust[k].float())
             for k, v in original.items()}
    clip = create_clip("capt-toy-vit", ORIGINAL)
    clip.model.load_state_dict(mixed)
    model = PromptedCLIP(clip, PromptConfig())
    transform = pixel_transform(clip.preprocess_cfg)
    for name in args.data:
        started = time.perf_counter()
        r = evaluate(model, load_dataset(name, transform), [1 / 255, 2 / 255], steps=args.steps, batch_size=100,
                     max_samples=args.samples, seed=0, progress=False)
        rows.append({"w": w, "dataset": r["dataset"], "n": r["n"], "clean": r["clean_acc"], "robust": r["robust_acc"],
                     "attack": f"PGD-{args.steps}", "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
json.dump({"robust": args.robust, "original": ORIGINAL, "rows": rows}, open(args.output, "w"), indent=1)
