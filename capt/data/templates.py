"""Prompt templates per dataset (``{}`` marks the class name), for zero-shot evaluation."""
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

DEFAULT_TEMPLATES = ["a photo of a {}."]

# open_clip keeps the ImageNet templates as functions; a format string is what configs and requests use.
IMAGENET_TEMPLATES = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]

DATASET_TEMPLATES = {
    "imagenet": IMAGENET_TEMPLATES,
    "cifar10": ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.", "a photo of the small {}."],
    "cifar100": ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.", "a photo of the small {}."],
    "mnist": ['a photo of the number: "{}".'],
    "fashion_mnist": ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}."],
    "stl10": ["a photo of a {}.", "a photo of the {}."],
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "stanford_cars": ["a photo of a {}.", "a photo of my {}."],
}


def templates_for(dataset_name: str) -> list[str]:
    return list(DATASET_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATES))
