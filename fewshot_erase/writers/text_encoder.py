"""The `erase` output: a folder that `CLIPTextModel.from_pretrained` loads (SDXL, SD 3.x, FLUX.1: one per encoder, in
text_encoder/, text_encoder_2/, text_encoder_3/, as in a pipeline; T5 loads with `T5EncoderModel`), with the
canonical key names and the erase record."""

from __future__ import annotations

import json
from pathlib import Path

from .. import keys, safetensors_file
from ..record import stable_part

WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "erase.json"
METADATA_KEY = "fewshot_erase"


def encoder_folder(output: Path, family, encoder_name: str) -> Path:
    """SD 1.x/2.x: the output folder is the text encoder; otherwise one subfolder per encoder, named as in a pipeline."""
    return output if len(family.encoders) == 1 else output / encoder_name


def canonical_state(text_encoder) -> dict:
    kind = keys.encoder_kind(text_encoder)
    return {keys.canonical_key(kind, name): tensor.detach().cpu().contiguous()
            for name, tensor in text_encoder.state_dict().items() if not (kind == "t5" and name == keys.T5_TIED)}


def write_text_encoder(folder: Path, text_encoder, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.config.to_json_file(str(folder / "config.json"))
    metadata = {"format": "pt", METADATA_KEY: json.dumps(stable_part(record), sort_keys=True)}
    safetensors_file.write(folder / WEIGHTS_NAME, canonical_state(text_encoder), metadata)


def write_erase_output(staging: Path, pipeline, family, record: dict) -> None:
    for name in family.encoders:
        write_text_encoder(encoder_folder(staging, family, name), getattr(pipeline, name), record)
    (staging / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
