"""Caption templates with the concept put in: pure functions, no models."""

from __future__ import annotations

from typing import Sequence

from .errors import BadInput

# The textual-inversion template lists, which the paper's reference code uses for objects and styles.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def default_templates(style: bool) -> tuple[str, ...]:
    return STYLE_TEMPLATES if style else OBJECT_TEMPLATES


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Every template must hold exactly one `{}` where the concept goes."""
    if not templates:
        raise BadInput("no caption templates given; pass templates that contain '{}', e.g. 'a photo of a {}'")
    for template in templates:
        if template.count("{}") != 1:
            raise BadInput(f"template {template!r} must contain '{{}}' exactly once, where the concept goes")
    return tuple(templates)


def check_concept(concept: str) -> str:
    concept = " ".join(concept.split())
    if not concept:
        raise BadInput("the concept is empty; give the word or name to erase, e.g. 'seven' or 'Van Gogh'")
    return concept


def fill(template: str, concept: str) -> str:
    return template.replace("{}", concept)

