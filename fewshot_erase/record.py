"""The erase record: what was erased, from what, how, and with which libraries. Written to erase.json and, minus
what changes from run to run (timings, paths), into the weights' safetensors metadata."""

from __future__ import annotations

import hashlib
import platform

from .safetensors_file import tensor_bytes

RECORD_FORMAT = "fewshot-erase/1"
# Fields that differ between two identical runs; kept out of the weights so equal runs give equal bytes.
VOLATILE = ("timings", "images_paths", "output")


def tensors_sha256(state: dict) -> str:
    """One hash over (name, dtype, shape, bytes) in name order: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def library_versions() -> dict:
    import diffusers
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "fewshot_erase": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def stable_part(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in VOLATILE}


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _pictures(value) -> bool:
    return isinstance(value, list) and all(isinstance(image, dict) and isinstance(image.get("name"), str)
                                           and isinstance(image.get("sha256"), str) for image in value)


def _concept_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("concept"), str) and _pictures(entry.get("images"))
            and _strings(entry.get("templates")) and len(entry["templates"]) > 0)


# The fields the readers (inspect, export, apply, audit, compare) use, each with what it must be; every erase writes them.
SHAPES = {
    "base": lambda v: (isinstance(v, dict) and all(isinstance(v.get(key), str) for key in ("family", "model", "kind"))
                       and isinstance(v.get("text_encoders"), dict)
                       and all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in v["text_encoders"].values())),
    "concept": lambda v: isinstance(v, str),
    "concepts": lambda v: isinstance(v, list) and len(v) > 0 and all(_concept_entry(entry) for entry in v),
    "images": _pictures,
    "effects": lambda v: isinstance(v, dict),
    "settings": lambda v: isinstance(v, dict),
    "steps": lambda v: isinstance(v, int),
    "trained_tensors": lambda v: isinstance(v, dict) and all(_strings(names) for names in v.values()),
    "base_fingerprints": lambda v: isinstance(v, dict) and all(isinstance(prints, dict) for prints in v.values()),
}


OPTIONAL = ("effects", "steps")  # what the readers do without


def shape_problem(record) -> str | None:
    """The first field of an erase record that is not what fewshot-erase wrote, if any: a record another tool
    rewrote carelessly, or that was made to mislead, gets one clear error instead of a crash further in."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    missing = [field for field in SHAPES if field not in record and field not in OPTIONAL]
    if missing:
        return f"it has no {missing[0]!r}"
    return next((f"its {field!r} is malformed" for field, sound in SHAPES.items()
                 if field in record and not sound(record[field])), None)
