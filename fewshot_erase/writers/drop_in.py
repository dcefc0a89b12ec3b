"""`export --format drop-in`: each erased text encoder as the single file ComfyUI, Forge and A1111 load from their
text-encoder folders: `clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`, fp16, keyed as those
tools detect them (CLIP under `text_model.*` with its `text_projection` where it has one; T5 under `shared.weight` and
`encoder.block.*`, as transformers names it), the erase record in each file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

from .. import safetensors_file
from .text_encoder import METADATA_KEY, WEIGHTS_NAME, encoder_folder

FORMAT = "drop-in"
FILE_NAMES = {"clip-l": "clip_l.safetensors", "clip-g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors"}


def drop_in_names(family, encoders) -> dict[str, str]:
    """Encoder -> the file name the ecosystem gives it (SD 1.x's one CLIP-L is `clip_l` too; SD 2.x's OpenCLIP-H
    has no drop-in name, and is written as `clip_h.safetensors`)."""
    kinds = family.kinds
    return {name: FILE_NAMES.get(kinds[name], kinds[name].replace("-", "_") + ".safetensors") for name in encoders}


def write_drop_in(folder: Path, patch, record: dict) -> dict:
    """Write one file per erased encoder into `folder` (a staging folder); return what the export reports: each
    file's name and the worst relative change fp16 makes to a changed tensor."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    names = drop_in_names(patch.family, [encoder for encoder, tensors in patch.tensors.items() if tensors])
    worst = 0.0
    for encoder, file_name in names.items():
        source = encoder_folder(patch.source, patch.family, encoder) / WEIGHTS_NAME
        header = safetensors_file.read_header(source)
        tensors = safetensors_file.read_tensors(source, {name: name for name in safetensors_file.tensor_names(header)})
        stored = {name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}
        for name in patch.tensors[encoder]:
            size = tensors[name].float().norm().item()
            if size > 0:
                worst = max(worst, (stored[name].float() - tensors[name].float()).norm().item() / size)
        report = {"format": FORMAT, "dtype": "float16", "encoder": encoder}
        metadata = {"format": "pt", METADATA_KEY: json.dumps({**record, "export": report}, sort_keys=True)}
        safetensors_file.write(folder / file_name, stored, metadata)
    return {"format": FORMAT, "dtype": "float16", "files": names, "rounding_error": worst}
