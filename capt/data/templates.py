"""Prompt templates per dataset (``{}`` marks the class name), for zero-shot evaluation."""
import string

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


def check_template(template: str) -> None:
    """Raises ValueError unless ``template`` is a format string whose only replacement field is one
    empty, auto-numbered ``{}`` (no name or index, no conversion, no format spec); literal braces are
    written ``{{`` and ``}}``. Counting ``"{}"`` is not enough: ``"{x} a {}"`` or ``"{0.__class__} {}"``
    pass a count and then fail (or read attributes) in ``template.format(label)``."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    braces = "write literal braces as '{{' and '}}'"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"template is not a valid format string ({err}; {braces}): {template!r}") from None
    if len(fields) != 1:
        raise ValueError(f"template must contain '{{}}' exactly once, found {len(fields)} replacement "
                         f"field(s) ({braces}): {template!r}")
    if fields[0] != ("", "", None):
        raise ValueError(f"template's placeholder must be a plain '{{}}', without a name, index, conversion or "
                         f"format spec ({braces}): {template!r}")
