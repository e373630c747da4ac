"""CAPT: consistency-guided adversarial prompt tuning of open_clip CLIP models."""
from .models import ClipModel, create_clip, list_models, pixel_transform
from .prompts import PromptConfig, PromptedCLIP, ZeroShotClassifier

__version__ = "0.1.0"
__all__ = ["ClipModel", "create_clip", "list_models", "pixel_transform", "PromptConfig", "PromptedCLIP",
           "ZeroShotClassifier"]
