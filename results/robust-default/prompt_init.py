"""What CAPT's prompts cost before any training step: clean zero-shot accuracy of the robust backbone
with the default recipe's freshly initialised prompts (models/capt-toy/capt-default.yaml, initialised
as ``capt train`` does, one seed each), with MaPLe's random deep text prompts and with
``text_deep_init: identity``, against the backbone with no prompts, on every validation image (2000
seen-pair and 2000 held-out-pair images; never the test images the README's figures are on).

    python results/robust-default/prompt_init.py [--seeds 1 2 3]  ->  results/robust-default/prompt_init.json
"""
import argparse
import json
from pathlib import Path

import torch

from capt.config import TrainConfig
from capt.data import load_dataset
from capt.evaluate import evaluate
from capt.models import create_clip, pixel_transform
from capt.prompts import PromptConfig, PromptedCLIP

HERE = Path(__file__).parent
parser = argparse.ArgumentParser()
parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
args = parser.parse_args()
config = TrainConfig.from_yaml("models/capt-toy/capt-default.yaml")
sets = ["toyworld_pairs::val", "toyworld_pairs::heldout-val"]
rows = []
for init, seed in [(None, None)] + [(i, s) for i in ("random", "identity") for s in args.seeds]:
    torch.manual_seed(seed or 0)  # as capt train seeds the prompt initialisation
    clip = create_clip(config.model, config.pretrained)
    recipe = {**config.prompt.to_dict(), "text_deep_init": init}
    model = PromptedCLIP(clip, PromptConfig() if init is None else PromptConfig.from_dict(recipe))
    for name in sets:
        r = evaluate(model, load_dataset(name, pixel_transform(clip.preprocess_cfg)), [], progress=False)
        rows.append({"prompts": "none" if init is None else f"text_deep_init {init}, seed {seed}",
                     "dataset": r["dataset"], "n": r["n"], "clean_acc": r["clean_acc"]})
        print(json.dumps(rows[-1]), flush=True)
(HERE / "prompt_init.json").write_text(json.dumps({"recipe": "models/capt-toy/capt-default.yaml", "rows": rows},
                                                  indent=1) + "\n")
