"""CAPT: consistency-guided adversarial prompt tuning of open_clip CLIP models."""
from importlib import import_module

__version__ = "0.1.0"
# Imported on first use (PEP 562), so that `capt.default_model` and the CLI's argument parsing do
# not load torch and open_clip.
_EXPORTS = {"ClipModel": "models", "create_clip": "models", "list_models": "models", "pixel_transform": "images",
            "PromptConfig": "prompts", "PromptedCLIP": "prompts", "ZeroShotClassifier": "prompts"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'capt' has no attribute {name!r}")
