"""The scale of the prompts against the tokens they sit beside, and how far one SGD step moves each
trained tensor, for the default CAPT recipe on the embedded default CLIP (one batch of 32, eps 2/255).

    python results/learning-curves/prompt_scale.py  -> results/learning-curves/prompt_scale.json
"""
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from capt import default_model  # noqa: E402
from capt.config import TrainConfig  # noqa: E402
from capt.data import load_dataset  # noqa: E402
from capt.losses import capt_loss  # noqa: E402
from capt.models import create_clip, pixel_transform  # noqa: E402
from capt.prompts import PromptedCLIP  # noqa: E402
from capt.train import _TrainingStep  # noqa: E402

torch.manual_seed(1)
config = TrainConfig.from_dict({"model": "capt-toy-vit", "pretrained": str(default_model.WEIGHTS), "method": "capt",
                                "data": {"name": "toyworld_pairs", "split": "train"}, "attack": {"eps": "2/255"}})
clip = create_clip(config.model, config.pretrained)
model = PromptedCLIP(clip, config.prompt)
data = load_dataset(config.data, pixel_transform(clip.preprocess_cfg)).few_shot(16, 1)
images, labels = next(iter(DataLoader(data.dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))))
with torch.no_grad():
    image_tokens = clip.model.visual._embeds(images)  # after ln_pre: where the vision prompts are inserted
    text_tokens = clip.model.token_embedding(model.tokenize(data.classnames))
    vision_prompts = model._vision_prompts()
step = _TrainingStep(model, model.tokenize(data.classnames), config.attack, clean_in_graph=True)
model.train()
with torch.no_grad(), model.prompts_disabled():
    frozen = model.logits(model.encode_image(images), model.encode_labels(data.classnames))
clean_logits, adv_logits = step(images, labels, 0)
loss, parts = capt_loss(config.loss, labels, clean_logits, adv_logits, frozen)
loss.backward()
report = {
    "note": "one seeded batch of 32 training images; no timing, so no machine dependence beyond rounding",
    "logit_scale": clip.model.logit_scale.exp().item(),
    "token_norms": {
        "image_token_after_ln_pre": image_tokens.norm(dim=-1).mean().item(),
        "vision_prompt_layer0": vision_prompts[0].norm(dim=-1).mean().item(),
        "text_token_embedding": text_tokens.norm(dim=-1).mean().item(),
        "text_prompt_ctx": model.text_ctx.norm(dim=-1).mean().item(),
    },
    "loss_parts": {k: round(v.item(), 4) for k, v in parts.items()},
    "relative_update_per_step": {  # lr * |grad| / |param|: how far one SGD step (no momentum) moves it
        name: config.lr * p.grad.norm().item() / max(p.norm().item(), 1e-12)
        for name, p in model.prompt_parameters().items() if p.numel()},
}
out = Path(__file__).with_suffix(".json")
out.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
