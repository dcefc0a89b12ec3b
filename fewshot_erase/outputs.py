"""Reading an `erase` output back: its record and its text encoders, checked against a base pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from . import safetensors_file
from .errors import BadInput, first_line
from .families import FAMILIES
from .record import shape_problem, tensors_sha256
from .writers.text_encoder import RECORD_NAME, WEIGHTS_NAME, canonical_state, encoder_folder


def read_record(output: Path) -> dict:
    path = Path(output) / RECORD_NAME
    if not Path(output).is_dir() or not path.is_file():
        raise BadInput(f"{output} is not a fewshot-erase output (no {RECORD_NAME}); pass the folder `fewshot-erase erase -o` wrote")
    try:
        record = json.loads(path.read_text())
        record["base"]["family"], record["concept"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{path} is damaged (not an erase record); re-run the erase") from None
    if shape_problem(record):
        raise BadInput(f"{path} is damaged ({shape_problem(record)}); re-run the erase")
    family = FAMILIES.get(record["base"]["family"])
    for name in family.encoders if family else ():  # before any model is loaded for it
        weights = encoder_folder(Path(output), family, name) / WEIGHTS_NAME
        if not weights.is_file():
            raise BadInput(f"{output} lacks its erased {name} ({WEIGHTS_NAME}); the erase output is damaged, re-run the erase")
        safetensors_file.read_header(weights)  # a truncated or foreign file: its own one line, here
    return record


def check_same_base(record: dict, parts) -> None:
    """The erased encoders only make sense on the model they were erased from."""
    if parts.family.name != record["base"]["family"]:
        raise BadInput(f"the erase was made on an {record['base']['family']} model but --model is {parts.family.label}; pass the base model it was erased from ({record['base']['model']})")
    for name, expected in record["base"]["text_encoders"].items():
        if tensors_sha256(canonical_state(parts.text_encoder(name))) != expected["sha256"]:
            raise BadInput(f"--model's {name} differs from the one the erase was made from ({record['base']['model']}); pass that base model")


def load_erased_encoders(output: Path, parts) -> dict:
    """The erased text encoders, in the classes the base pipeline uses."""
    encoders = {}
    for name in parts.family.encoders:
        base = parts.text_encoder(name)
        folder = encoder_folder(Path(output), parts.family, name)
        try:
            loaded = type(base).from_pretrained(str(folder))
        except (OSError, ValueError) as error:  # a missing or damaged weights file or config
            raise BadInput(f"the erased {name} in {folder} cannot be read ({first_line(error)}); the erase output is damaged, re-run the erase") from None
        encoders[name] = loaded.to(device=base.device, dtype=base.dtype)
    return encoders
