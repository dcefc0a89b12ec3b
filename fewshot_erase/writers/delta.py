"""`export --format delta`: the feed-forward differences an erase made, fp16, one tensor per changed tensor under
`<encoder>.<canonical name>`, with the erase record in the file's metadata. `apply` adds them to a model whose
originals match the record's fingerprints."""

from __future__ import annotations

import json

from .. import checkpoint_layouts, safetensors_file
from ..errors import BadInput
from .text_encoder import METADATA_KEY

FORMAT = "delta"


def write_delta(path, differences: dict, record: dict) -> dict:
    """Write the file; return what the export reports (also stored in the record): the fp16 rounding error."""
    import torch

    tensors, worst = {}, 0.0
    for encoder, changes in differences.items():
        for name, difference in changes.items():
            stored = difference.to(torch.float16)
            tensors[f"{encoder}.{name}"] = stored
            size = difference.norm().item()
            if size > 0:
                worst = max(worst, (stored.float() - difference).norm().item() / size)
    report = {"format": FORMAT, "dtype": "float16", "tensors": len(tensors), "rounding_error": worst}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({**record, "export": report}, sort_keys=True)}
    safetensors_file.write(path, tensors, metadata)
    return report


def read_differences(tensors: dict, record: dict, family) -> dict:
    differences = {}
    for key, tensor in tensors.items():
        encoder, _, name = key.partition(".")
        if encoder not in family.encoders or not checkpoint_layouts.is_feed_forward(name):
            raise BadInput(f"delta patch holds {key!r}, which is no {family.label} text-encoder feed-forward tensor; the file is damaged or not a delta export")
        differences.setdefault(encoder, {})[name] = tensor
    return differences
