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
