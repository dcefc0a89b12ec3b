"""What is erased and what is kept: concept specs (one, several, or a manifest file), anchors and the preserve set.
Pure functions over strings and small files; no models here but the embedding ranking's caller-supplied scores."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .prompts import check_concept

MANIFEST_FIELDS = {"concept", "images", "style", "anchor"}
REQUIRED_FIELDS = ("concept", "images")

# The automatic preserve set for Stable Diffusion: common objects, styles and people that an erase should leave
# alone. The nearest of them to the erased concept (by the original encoder) are kept most carefully.
COMMON_CONCEPTS = (
    "dog", "cat", "horse", "bird", "car", "bicycle", "airplane", "house", "tree", "flower", "mountain", "beach",
    "city street", "forest", "river", "chair", "table", "cup", "book", "guitar", "apple", "pizza", "clock", "boat",
    "train", "bridge", "castle", "robot", "dragon", "teddy bear", "man", "woman", "child", "old man", "astronaut",
    "chef", "doctor", "soldier", "king", "queen", "cartoon character", "superhero", "anime girl",
    "oil painting", "watercolor painting", "pencil sketch", "photograph", "Monet", "Picasso", "Rembrandt",
    "Van Gogh", "Andy Warhol", "Salvador Dali", "Claude Monet", "ukiyo-e", "pixel art", "3d render", "comic book",
)


@dataclass(frozen=True)
class ConceptSpec:
    concept: str
    images: tuple[str, ...]
    style: bool = False
    anchor: str | None = None


def one_or_many(images) -> tuple[str, ...]:
    """A folder or file given alone, or a list of them: a path string is one path, not its characters."""
    return (str(images),) if isinstance(images, (str, os.PathLike)) else tuple(str(image) for image in images)


def check_specs(specs: list[ConceptSpec], preserve: tuple[str, ...]) -> list[ConceptSpec]:
    """One concept once; an anchor is another concept; nothing preserved names a concept being erased."""
    if not specs:
        raise BadInput("no concept given; name one, or pass --concept NAME=DIR or --manifest FILE")
    specs = [ConceptSpec(check_concept(s.concept), one_or_many(s.images), s.style, None if s.anchor is None else named(s.anchor, "anchor"))
             for s in specs]
    seen = set()
    for spec in specs:
        key = spec.concept.lower()
        if key in seen:
            raise BadInput(f"concept {spec.concept!r} is given twice; list each concept once")
        seen.add(key)
        if spec.anchor and spec.anchor.lower() == key:
            raise BadInput(f"the anchor for {spec.concept!r} is the concept itself; choose a different concept to steer to")
        if not spec.images:
            raise BadInput(f"concept {spec.concept!r} has no images; give files or a folder for it")
    for text in preserve:
        for spec in specs:
            if spec.concept.lower() in text.lower():
                raise BadInput(f"preserve prompt {text!r} contains the erased concept {spec.concept!r}; remove it from the preserve list")
    return specs


def named(text: str, what: str) -> str:
    """`text`, which must name something (an anchor): an empty one would be read as no anchor at all."""
    text = " ".join(text.split())
    if not text:
        raise BadInput(f"the {what} is empty; name a concept, or leave the option out")
    return text


def parse_concept_option(value: str) -> ConceptSpec:
    """`--concept NAME=DIR`"""
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise BadInput(f"--concept {value!r} must be NAME=IMAGE_DIR, e.g. --concept seven=sample_images/seven")
    return ConceptSpec(name.strip(), (folder.strip(),))


def read_manifest(path: str | Path) -> list[ConceptSpec]:
    """A JSON or YAML list of {concept, images, style?, anchor?}; image paths are relative to the manifest."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BadInput(f"cannot read manifest {path}: {error.strerror or error}; check the path") from None
    except UnicodeDecodeError:
        raise BadInput(f"manifest {path} is not a text file; pass a JSON or YAML list of concepts") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            entries = yaml.safe_load(text)
        else:
            entries = json.loads(text)
    except Exception as error:  # json and yaml raise their own types; both mean a malformed file
        raise BadInput(f"manifest {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({str(error).splitlines()[0]}); fix its syntax") from None
    if isinstance(entries, dict) and "concepts" in entries:
        entries = entries["concepts"]
    if not isinstance(entries, list) or not entries:
        raise BadInput(f"manifest {path} must hold a list of concepts, each with 'concept' and 'images'")
    return [_manifest_entry(path, number, entry) for number, entry in enumerate(entries, start=1)]


def _manifest_entry(path: Path, number: int, entry) -> ConceptSpec:
    where = f"manifest {path}, entry {number}"
    if not isinstance(entry, dict):
        raise BadInput(f"{where} is not a mapping; write it as {{concept: ..., images: ...}}")
    unknown = sorted(set(entry) - MANIFEST_FIELDS)
    if unknown:
        raise BadInput(f"{where}: unknown field {unknown[0]!r}; allowed are {', '.join(sorted(MANIFEST_FIELDS))}")
    for field in REQUIRED_FIELDS:
        if field not in entry:
            raise BadInput(f"{where}: missing field {field!r}; every entry needs 'concept' and 'images'")
    images = entry["images"] if isinstance(entry["images"], list) else [entry["images"]]
    if not all(isinstance(image, str) for image in images) or not isinstance(entry["concept"], str):
        raise BadInput(f"{where}: 'concept' must be text and 'images' a path or a list of paths")
    resolved = tuple(str(image if Path(image).is_absolute() else path.parent / image) for image in images)
    return ConceptSpec(entry["concept"], resolved, bool(entry.get("style", False)), entry.get("anchor"))


def read_list_file(path: str | Path, what: str) -> tuple[str, ...]:
    """One entry a line (a concept to keep, a phrasing to try); blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read {what} {path}: {getattr(error, 'strerror', None) or error}; check the path") from None
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def read_preserve_file(path: str | Path) -> tuple[str, ...]:
    return read_list_file(path, "preserve file")


def automatic_preserve(erased: list[str], candidates: tuple[str, ...]) -> tuple[str, ...]:
    """The candidates that are not, and do not contain, a concept being erased."""
    lowered = [c.lower() for c in erased]
    return tuple(c for c in candidates if not any(e in c.lower() or c.lower() in e for e in lowered))


def nearest(scores: dict[str, float], count: int) -> tuple[str, ...]:
    """The `count` candidates most similar to the concept (scores from the original encoder)."""
    return tuple(sorted(scores, key=lambda name: (-scores[name], name))[:count])
