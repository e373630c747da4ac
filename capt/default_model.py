"""The embedded default model: where it lives in this repository and how a training run becomes it.

One home for these paths: the served default (``make serve``), ``make default-model``, the
replication grid, the tests and the benchmarks all read them from here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# No torch here: the benchmarks' parent process reads these paths and never loads model code.
REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "capt-toy"
WEIGHTS = MODEL_DIR / "weights.safetensors"        # the toy CLIP, from `capt pretrain --output MODEL_DIR`
# Its image tower made robust (FARE), from `capt robustify --config ROBUSTIFY_RECIPE --output ROBUST_DIR`.
ROBUST_DIR = MODEL_DIR / "robust"
ROBUST_WEIGHTS = ROBUST_DIR / "weights.safetensors"
ROBUSTIFY_RECIPE = MODEL_DIR / "robustify.yaml"
BASE_WEIGHTS = ROBUST_WEIGHTS                      # what the default prompts sit on: exported and served
PROMPTS = MODEL_DIR / "prompts"                    # CAPT prompts, from `capt train --config RECIPE`
RECIPE = MODEL_DIR / "capt-default.yaml"
ARCHITECTURE = "capt-toy-vit"
SAMPLE_DATA = "toyworld_pairs::test"               # real images for the export's top-1 parity check
STORE_NAME = "capt-default"                        # its name in the BentoML model store
STORE_TAG = f"{STORE_NAME}:latest"


def relative(path: Path) -> str:
    """A repository path as written in configs and checkpoints (portable between clones)."""
    return str(path.relative_to(REPO_ROOT))


def promote(run_dir: str | Path) -> Path:
    """Copy a run's latest prompts into ``PROMPTS`` as the embedded default."""
    from .checkpoint import META_FILE, PROMPTS_FILE, resolve_checkpoint
    checkpoint = resolve_checkpoint(run_dir)
    meta = json.loads((checkpoint / META_FILE).read_text())
    base = Path(meta.get("pretrained") or "")
    base = (base if base.is_absolute() else REPO_ROOT / base).resolve()
    if not base.is_file() or REPO_ROOT not in base.parents:
        raise ValueError(f"{checkpoint} sits on {meta.get('pretrained')!r}: the default model's base weights must "
                         f"be a file inside the repository (e.g. {relative(BASE_WEIGHTS)})")
    meta["pretrained"] = relative(base)  # portable: resolved inside the repository
    PROMPTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint / PROMPTS_FILE, PROMPTS / PROMPTS_FILE)
    (PROMPTS / META_FILE).write_text(json.dumps(meta, indent=2))
    return checkpoint


def rebuild(progress: bool = False) -> None:
    """Train the default model from scratch as committed: pretraining with ``capt pretrain``'s
    defaults (fp32), the robust image tower with ``ROBUSTIFY_RECIPE``, CAPT prompt tuning on it with
    ``RECIPE``, promotion (``make default-model``; seeded; see the README for the time it takes)."""
    import yaml

    from .config import TrainConfig
    from .pretrain import PretrainConfig, pretrain
    from .robustify import RobustifyConfig, robustify
    from .train import train

    config = TrainConfig.from_yaml(RECIPE)
    config.output_dir = str(REPO_ROOT / config.output_dir)
    shutil.rmtree(MODEL_DIR / "pretrain_state", ignore_errors=True)
    shutil.rmtree(ROBUST_DIR, ignore_errors=True)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    pretrain(PretrainConfig(precision="fp32"), MODEL_DIR, progress=progress)
    robustify(RobustifyConfig.from_dict(yaml.safe_load(ROBUSTIFY_RECIPE.read_text())), ROBUST_DIR, progress=progress)
    shutil.rmtree(ROBUST_DIR / "robustify_state", ignore_errors=True)  # resumable state, not part of the model
    promote(train(config, progress=progress))


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["rebuild"]:
        raise SystemExit("usage: python -m capt.default_model rebuild")
    rebuild()
