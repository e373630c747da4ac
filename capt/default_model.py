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
    PROMPTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint / PROMPTS_FILE, PROMPTS / PROMPTS_FILE)
    meta = json.loads((checkpoint / META_FILE).read_text())
    meta["pretrained"] = relative(WEIGHTS)  # portable: resolved inside the repository
    (PROMPTS / META_FILE).write_text(json.dumps(meta, indent=2))
    return checkpoint


def rebuild(progress: bool = False) -> None:
    """Train the default model from scratch as committed: pretraining with ``capt pretrain``'s
    defaults, CAPT prompt tuning with ``RECIPE``, promotion (``make default-model``; seeded, about
    15 minutes on 2 idle cores)."""
    from .config import TrainConfig
    from .pretrain import PretrainConfig, pretrain
    from .train import train

    config = TrainConfig.from_yaml(RECIPE)
    config.output_dir = str(REPO_ROOT / config.output_dir)
    shutil.rmtree(MODEL_DIR / "pretrain_state", ignore_errors=True)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    pretrain(PretrainConfig(), MODEL_DIR, progress=progress)
    promote(train(config, progress=progress))


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["rebuild"]:
        raise SystemExit("usage: python -m capt.default_model rebuild")
    rebuild()
