"""The words the personalization methods train and measure in, per model domain (`contract/domains.py`).

- `templates`: the captions of a concept's training images ("a photo of a <s1> dog"). On a general model they are
  textual inversion's photo templates (Gal et al. 2023, the ones its code trains with), which DreamBooth's "a [V]
  [class]" prompts also fit; on a ShapesWorld model, captions in the zoo's own vocabulary (it knows no "photo").
- `caption_corpus`: the captions whose text encodings give Perfusion's covariance C and Custom Diffusion's merge
  its regularisation features. Both papers use a large corpus of real captions; none is bundled (nothing may be
  downloaded), so a general model gets seeded captions composed from common objects, their attributes, scenes and
  picture styles, a stand-in with the statistics of plain English captions rather than of one world's. A
  ShapesWorld model gets seeded ShapesWorld captions, the words it was trained on.
- `context_prompts`: captions with a new token in varied contexts (Perfusion's mean encoding of S*).

Every list is seeded, so a job's captions do not change between runs.
"""

from __future__ import annotations

import numpy as np

from contract.domains import Domain
from models.shapes.world import caption, sample_scene

CORPUS_SIZE = 400
CORPUS_SEED = 1234

SHAPES_TEMPLATES: tuple[str, ...] = (
    "a {concept}",
    "a {concept} on a light background",
    "a {concept} against a light background",
    "a {concept} on light",
)
"""ShapesWorld captions with the concept in them. They name no colour, size or position, so those stay with the
words that the prompt adds at inference."""

GENERAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {concept}",
    "a rendering of a {concept}",
    "a cropped photo of the {concept}",
    "the photo of a {concept}",
    "a photo of a clean {concept}",
    "a dark photo of the {concept}",
    "a photo of my {concept}",
    "a photo of the cool {concept}",
    "a close-up photo of a {concept}",
    "a bright photo of the {concept}",
    "a cropped photo of a {concept}",
    "a good photo of the {concept}",
    "a photo of one {concept}",
    "a close-up photo of the {concept}",
    "a rendition of the {concept}",
    "a photo of a nice {concept}",
    "a photo of the small {concept}",
    "a photo of the large {concept}",
)
"""Photo captions with the concept in them, as textual inversion trains with on Stable Diffusion."""

SUBJECTS = (
    "person", "man", "woman", "child", "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "bear", "zebra",
    "giraffe", "car", "bicycle", "motorcycle", "bus", "train", "truck", "boat", "airplane", "chair", "couch", "bed",
    "table", "lamp", "clock", "vase", "cup", "bottle", "bowl", "book", "laptop", "phone", "backpack", "umbrella",
    "teddy bear", "guitar", "kite", "skateboard", "surfboard", "pizza", "cake", "apple", "banana", "sandwich",
    "flower", "tree", "house", "bridge", "mountain", "castle", "robot", "shoe", "hat", "toy", "sculpture",
)  # fmt: skip
ATTRIBUTES = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "old", "new", "small", "large", "wooden",
    "shiny", "cute", "colorful", "broken", "vintage", "tiny", "giant", "fluffy",
)  # fmt: skip
SCENES = (
    "on a table", "in a park", "on a city street", "at the beach", "in a kitchen", "in the snow", "next to a window",
    "in a forest", "on a wooden floor", "under a blue sky", "at night", "in a living room", "on the grass",
    "in front of a building", "in the rain", "on a shelf", "in a field", "by a lake", "in a garden", "in the desert",
)  # fmt: skip
STYLES = (
    "a photo of", "a close-up photo of", "a painting of", "a drawing of", "a 3d rendering of",
    "a black and white photo of", "a watercolor painting of", "a picture of", "an illustration of", "a sketch of",
)  # fmt: skip


def templates(domain: Domain) -> tuple[str, ...]:
    """The training captions of a concept ("{concept}" in each) for a model of `domain`."""
    return SHAPES_TEMPLATES if domain == "shapesworld" else GENERAL_TEMPLATES


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _general_caption(rng: np.random.Generator, subject: str | None = None) -> str:
    """One plain English caption: [style] a [attribute] <subject> [and a <second subject>] [scene]; `subject`
    (a new token) replaces the first subject."""
    first = subject or str(rng.choice(SUBJECTS))
    if rng.random() < 0.5:
        first = f"{rng.choice(ATTRIBUTES)} {first}"
    phrase = f"{_article(first)} {first}"
    if rng.random() < 0.25:
        second = str(rng.choice(SUBJECTS))
        phrase += f" and {_article(second)} {second}"
    if rng.random() < 0.7:
        phrase += f" {rng.choice(SCENES)}"
    if rng.random() < 0.6:
        phrase = f"{rng.choice(STYLES)} {phrase}"
    return phrase


def caption_corpus(domain: Domain, count: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """`count` seeded captions of `domain`'s kind (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    if domain == "shapesworld":
        return [caption(sample_scene(rng), rng) for _ in range(count)]
    return [_general_caption(rng) for _ in range(count)]


def context_prompts(domain: Domain, token: str, count: int = 32, seed: int = CORPUS_SEED) -> list[str]:
    """Captions with `token` in varied contexts: the training templates, then seeded corpus captions with the token
    as their (first) subject ("a small blue <s1> at the top left on a dark background", "a painting of a <s1> in a
    park")."""
    prompts = [template.format(concept=token) for template in templates(domain)][:count]
    rng = np.random.default_rng(seed)
    while len(prompts) < count:
        if domain != "shapesworld":
            prompts.append(_general_caption(rng, token))
            continue
        scene = sample_scene(rng, n_objects=1)
        text = caption(scene, rng)
        shape = scene.objects[0].shape
        if f" {shape}" in text:
            prompts.append(text.replace(f" {shape}", f" {token}", 1))
    return prompts
