"""A procedural image-caption world for pretraining and testing a small CLIP offline.

Each image holds one to three copies of one object (a shape in a colour, with a size, a texture and a
position) on a varied background, and comes with several truthful captions built from templates.
A set of colour x shape pairs is never captioned together in pretraining (see ``caption_sample``), so
zero-shot accuracy on them measures composition, not memory: each held-out colour and shape is
captioned with other partners. Everything is a function of a seed, so the world is reproducible and images can
be drawn on the fly.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "arrow"]
COLOURS = {
    "red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (240, 215, 40), "green": (40, 165, 60),
    "blue": (40, 80, 225), "purple": (135, 50, 185), "pink": (245, 135, 195), "brown": (125, 80, 40),
}
COLOUR_NAMES = list(COLOURS)
SIZES = ["small", "large"]
TEXTURES = ["plain", "striped", "dotted"]
POSITIONS = ["left", "right", "top", "bottom", "middle"]
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
IMAGE_SIZE = 64


def held_out_pairs(fraction: float = 0.2, seed: int = 0) -> set[tuple[str, str]]:
    """Colour x shape pairs kept out of training; every colour and every shape keeps partners."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    target = round(fraction * len(pairs))
    chosen: set[tuple[str, str]] = set()
    for colour, shape in rng.sample(pairs, len(pairs)):
        per_colour = sum(c == colour for c, _ in chosen)
        per_shape = sum(s == shape for _, s in chosen)
        if len(chosen) < target and per_colour < 2 and per_shape < 2:
            chosen.add((colour, shape))
    return chosen


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    texture: str
    count: int
    position: str  # where a single object sits ("middle" for several)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def polygon(radii, n, offset=0.0):
        return [(cx + radii[i % len(radii)] * math.cos(offset + angle + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(offset + angle + 2 * math.pi * i / n)) for i in range(n)]
    if shape == "square":
        return polygon([r * 1.05], 4, math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.8, cy), (cx, cy + r * 1.2), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return polygon([r * 1.1], 3, -math.pi / 2 - angle)
    if shape == "star":
        return polygon([r * 1.15, r * 0.45], 10, -math.pi / 2 - angle)
    if shape == "cross":
        t = r * 0.38
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
                (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "arrow":
        t = r * 0.35
        return [(cx - r, cy - t), (cx + r * 0.1, cy - t), (cx + r * 0.1, cy - r * 0.8), (cx + r, cy),
                (cx + r * 0.1, cy + r * 0.8), (cx + r * 0.1, cy + t), (cx - r, cy + t)]
    raise ValueError(shape)


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.random()
    base = rng.randint(40, 215)
    tint = [base + rng.randint(-20, 20) for _ in range(3)]
    if kind < 0.4:
        array = np.full((size, size, 3), tint, dtype=np.float32)
    elif kind < 0.7:
        other = [rng.randint(40, 215)] * 3
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        ramp = ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2)
        array = np.array(tint, np.float32) * (1 - ramp) + np.array(other, np.float32) * ramp
    else:
        noise = np.random.default_rng(rng.randrange(2 ** 31)).normal(0, 1, (size // 8, size // 8, 1)).astype(np.float32)
        noise = np.kron(noise, np.ones((8, 8, 1), np.float32))
        array = np.array(tint, np.float32) + 18 * noise
    array = array + np.random.default_rng(rng.randrange(2 ** 31)).normal(0, 4, (size, size, 1))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _centres(scene: Scene, rng: random.Random, radius: float, size: int) -> list[tuple[float, float]]:
    margin = radius + 2
    if scene.count == 1:
        lo, hi = margin, size - margin
        third = size / 3
        box = {"left": (lo, third, lo, hi), "right": (size - third, hi, lo, hi), "top": (lo, hi, lo, third),
               "bottom": (lo, hi, size - third, hi), "middle": (third, size - third, third, size - third)}[scene.position]
        x0, x1, y0, y1 = box
        return [(rng.uniform(min(x0, x1), max(x0, x1)), rng.uniform(min(y0, y1), max(y0, y1)))]
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == scene.count:
            break
        c = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        if all(math.dist(c, o) > 2 * radius + 1 for o in centres):
            centres.append(c)
    return centres


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    rng = random.Random(seed)
    image = _background(rng, size)
    colour = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[scene.colour])
    radius = (rng.uniform(8, 10) if scene.size == "small" else rng.uniform(14, 17)) * (size / 64)
    if scene.count > 1:
        radius = min(radius, size / 6)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy in _centres(scene, rng, radius, size):
        angle = rng.uniform(-0.25, 0.25)
        if scene.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        elif scene.shape == "ring":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=255, width=max(2, int(radius / 2.5)))
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, radius, angle), fill=255)
    fill = Image.new("RGB", (size, size), colour)
    if scene.texture != "plain":
        dark = tuple(int(v * 0.45) for v in colour)
        pattern = ImageDraw.Draw(fill)
        step = rng.choice([4, 5])
        if scene.texture == "striped":
            for x in range(-size, size, step):
                pattern.line([(x, 0), (x + size, size)], fill=dark, width=2)
        else:
            for y in range(1, size, step):
                for x in range(1 + (y // step) % 2 * 2, size, step):
                    pattern.ellipse([x - 1, y - 1, x + 1, y + 1], fill=dark)
    image.paste(fill, (0, 0), mask.filter(ImageFilter.GaussianBlur(0.5)))
    return image


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


Facts = frozenset  # of (attribute, value) pairs


@dataclass(frozen=True)
class Caption:
    """A caption and what it asserts: it is true of any image whose facts include its ``claims``,
    which is how pretraining knows that "a star" also describes the other star images in a batch."""

    text: str
    claims: Facts


def scene_facts(scene: Scene) -> Facts:
    return frozenset({("shape", scene.shape), ("colour", scene.colour), ("size", scene.size),
                      ("texture", scene.texture), ("count", scene.count), ("position", scene.position)})


def captions(scene: Scene, rng: random.Random) -> list[Caption]:
    """One truthful caption of each kind in ``CAPTION_KINDS``. Shape-only and colour-only captions are
    frequent on purpose: without them a small CLIP learns shapes only through colour-shape pairs."""
    shape, colour, n, size, texture = scene.shape, scene.colour, scene.count, scene.size, scene.texture
    noun = shape if n == 1 else _plural(shape)
    article = "an" if colour[0] in "aeiou" else "a"
    det = article if n == 1 else COUNT_WORDS[n]
    det_shape = ("an" if shape[0] in "aeiou" else "a") if n == 1 else COUNT_WORDS[n]
    a_or_count = "a" if n == 1 else COUNT_WORDS[n]
    # "a star" is true of an image of two stars as well; only number words claim a count
    counted = {("count", n)} if n > 1 else set()

    def caption(text: str, *claims: tuple[str, object]) -> Caption:
        return Caption(text, frozenset(claims))

    extras = [caption(f"{a_or_count} {size} {colour} {noun}", *counted, ("size", size), ("colour", colour), ("shape", shape))]
    if texture != "plain":
        extras.append(caption(f"{a_or_count} {texture} {colour} {noun}", *counted, ("texture", texture),
                              ("colour", colour), ("shape", shape)))
        extras.append(caption(f"{a_or_count} {texture} {noun}", *counted, ("texture", texture), ("shape", shape)))
    if n == 1 and scene.position != "middle":
        extras.append(caption(f"{det} {colour} {noun} on the {scene.position}", *counted, ("colour", colour),
                              ("shape", shape), ("position", scene.position)))
    if n > 1:
        extras.append(caption(f"{COUNT_WORDS[n]} {noun}", *counted, ("shape", shape)))
    pair = caption(f"{det} {colour} {noun}", *counted, ("colour", colour), ("shape", shape))
    phrases = {
        "pair": [pair],
        "shape": [caption(f"{det_shape} {noun}", *counted, ("shape", shape)),
                  caption(f"the shape of {'an' if shape[0] in 'aeiou' else 'a'} {shape}", ("shape", shape))],
        "colour": [caption(f"{article} {colour} object" if n == 1 else f"{COUNT_WORDS[n]} {colour} objects",
                           *counted, ("colour", colour)),
                   caption(f"something {colour}", ("colour", colour)),
                   caption(f"the colour {colour}", ("colour", colour))],
        "extra": extras,
    }
    frames = ["a photo of {}.", "{}", "an image of {}.", "a picture of {}.", "a drawing of {}."]
    chosen = []
    for options in phrases.values():
        phrase = rng.choice(options)
        chosen.append(Caption(rng.choice(frames).format(phrase.text), phrase.claims))
    return chosen


CAPTION_KINDS = ("pair", "shape", "colour", "extra")
CAPTION_WEIGHTS = (0.3, 0.45, 0.1, 0.15)


def sample_scene(rng: random.Random, allowed_pairs: list[tuple[str, str]]) -> Scene:
    colour, shape = rng.choice(allowed_pairs)
    count = rng.choices([1, 2, 3], weights=[0.6, 0.2, 0.2])[0]
    return Scene(shape, colour, rng.choice(SIZES), rng.choices(TEXTURES, weights=[0.6, 0.2, 0.2])[0], count,
                 rng.choice(POSITIONS) if count == 1 else "middle")


def seen_pairs(held_out: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]


def names_a_held_out_pair(caption: Caption) -> bool:
    return {"colour", "shape"} <= {attribute for attribute, _ in caption.claims}


def caption_sample(index: int, seed: int, held_out: set[tuple[str, str]], draw_held_out: bool = True
                   ) -> tuple[Image.Image, Caption, Facts]:
    """The ``index``-th (image, caption, facts of the image) of the pretraining stream.

    Held-out colour x shape pairs are never captioned together. With ``draw_held_out`` their images
    are drawn (a purple star captioned "a star", "something purple", "two stars", never "a purple
    star"), so the held-out label set tests whether the text side composes what it never read
    together; without it they are never drawn either (compositional generalisation of the image side)."""
    rng = random.Random(seed * 1_000_003 + index)
    pairs = [(c, s) for c in COLOURS for s in SHAPES] if draw_held_out else seen_pairs(held_out)
    scene = sample_scene(rng, pairs)
    options = captions(scene, rng)
    weights = list(CAPTION_WEIGHTS)
    if (scene.colour, scene.shape) in held_out:
        weights = [0.0 if names_a_held_out_pair(c) else w for c, w in zip(options, weights)]
    caption = rng.choices(options, weights=weights)[0]
    return render(scene, rng.randrange(2 ** 31)), caption, scene_facts(scene)


# ---- labelled tasks over the toy world (the dataset interface of ``capt train`` / ``capt eval``) ----
TASKS = {
    # task: (class names, template, label of a scene)
    "pairs": ([f"{c} {s}" for c in COLOURS for s in SHAPES], "a photo of a {}.", lambda sc: f"{sc.colour} {sc.shape}"),
    "shapes": (list(SHAPES), "a photo of a {}.", lambda sc: sc.shape),
    "colours": (list(COLOURS), "a photo of a {} object.", lambda sc: sc.colour),
    "counts": (list(COUNT_WORDS.values()), "a photo of {} objects.", lambda sc: COUNT_WORDS[sc.count]),
}
# split: (seed, default size, which pairs). "images" draws every pair, as pretraining does, and is for
# stages that read no labels (``capt robustify``): pretraining drew the held-out pairs' images too (only
# their captions never name the pair), so it adds no caption and no label of a held-out pair. A labelled
# run on it (``capt train``) would see the held-out pairs' labels; its own seed keeps its images apart
# from those of ``test`` and ``heldout``.
# "val" and "heldout-val" are for choosing a recipe without looking at the images its figures are
# reported on ("test", "heldout").
SPLITS = {"train": (1, 4000, "seen"), "test": (2, 2000, "seen"), "heldout": (3, 2000, "heldout"),
          "images": (4, 4000, "all"), "val": (5, 2000, "seen"), "heldout-val": (6, 2000, "heldout")}


class ToyWorldTask:
    """A labelled toy-world task: ``split`` is ``train``/``test`` (pairs seen in pretraining),
    ``heldout`` (only the held-out colour x shape pairs), ``val`` / ``heldout-val`` (other images of the
    same pairs, for choosing recipes) or ``images`` (every pair, for stages that read no labels; see
    ``SPLITS``). Images are rendered on access."""

    def __init__(self, task: str, split: str = "test", transform=None, size: int | None = None, seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"unknown toy-world task '{task}'; known: {sorted(TASKS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown toy-world split '{split}'; known: {sorted(SPLITS)}")
        self.classnames, template, label_of = TASKS[task]
        self.templates = [template]
        split_seed, default_size, which = SPLITS[split]
        held_out = held_out_pairs(seed=seed)
        pairs = {"heldout": sorted(held_out), "seen": seen_pairs(held_out),
                 "all": [(c, s) for c in COLOURS for s in SHAPES]}[which]
        self.transform = transform
        self.scenes, self.render_seeds = [], []
        for index in range(size or default_size):
            rng = random.Random((seed + 1) * 104_729 + split_seed * 1_000_003 + index)
            self.scenes.append(sample_scene(rng, pairs))
            self.render_seeds.append(rng.randrange(2 ** 31))
        self.targets = [self.classnames.index(label_of(scene)) for scene in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        image = render(self.scenes[index], self.render_seeds[index])
        return (self.transform(image) if self.transform else image), self.targets[index]
