"""A patch: what an erase changed in a model's text encoder(s), read from an `erase` output folder or from a file
`export` wrote, its record checked before anything in it is trusted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint_layouts as layouts
from . import families, safetensors_file
from .errors import BadInput
from .record import shape_problem
from .writers import EXPORT_READERS
from .writers.text_encoder import METADATA_KEY, WEIGHTS_NAME, encoder_folder

ERASE_OUTPUT = "erase output"


@dataclass(frozen=True)
class Patch:
    source: Path
    kind: str  # ERASE_OUTPUT, or the format `export` wrote: "delta", "lora-kohya", "lora-diffusers"
    record: dict
    family: families.Family
    tensors: dict  # encoder -> canonical name -> the erased tensor (an erase output) or the difference to add

    def patched(self, encoder: str, name: str, original):
        """What replaces `original` in a model: in its dtype, so an fp16 checkpoint stays fp16."""
        change = self.tensors[encoder][name]
        new = change if self.kind == ERASE_OUTPUT else original.float() + change.float()
        return new.to(original.dtype)

    @property
    def count(self) -> int:
        return sum(map(len, self.tensors.values()))


def read_patch(path) -> Patch:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"patch {path} does not exist; pass an `erase` output folder or a .safetensors file `export` wrote")
    if path.is_dir():
        return _read_erase_output(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return _read_exported(path)
    raise BadInput(f"patch {path} is neither an `erase` output folder nor a .safetensors file `export` wrote; pass one of those")


def record_in(header: dict, where) -> dict | None:
    """The erase record a file carries in its metadata, None if it has none."""
    text = safetensors_file.metadata(header).get(METADATA_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        record["base"]["family"], record["trained_tensors"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{where} has a damaged fewshot-erase record in its metadata; re-create the file") from None
    if shape_problem(record):
        raise BadInput(f"{where} has a damaged fewshot-erase record in its metadata ({shape_problem(record)}); re-create the file")
    return record


def is_exported_patch(record: dict) -> bool:
    """A file `export` wrote; a model patched from one keeps its "export" entry, but beside "applied"."""
    return "export" in record and "applied" not in record


def _family(record: dict, where) -> families.Family:
    family = families.FAMILIES.get(record["base"]["family"])
    if family is None:
        raise BadInput(f"{where} was made on an unknown model family {record['base']['family']!r}; it was not written by this fewshot-erase")
    return family


def _check_feed_forward_only(record: dict, where) -> None:
    extra = [name for names in record["trained_tensors"].values() for name in names if not layouts.is_feed_forward(name)]
    if extra:
        raise BadInput(f"{where} also changed {extra[0]} (--train {record['settings']['train']}); patches carry feed-forward weights only: erase again with --train ffn")


def _check_patch_record(record: dict, where) -> None:
    """What a patch adds to the erase record its reader has already checked (record.shape_problem): an export entry
    that names its format."""
    export = record.get("export", {})
    if not (isinstance(export, dict) and ("export" not in record or isinstance(export.get("format"), str))):
        raise BadInput(f"{where} has a damaged fewshot-erase record; re-create it with fewshot-erase")


def _read_erase_output(folder: Path) -> Patch:
    from .outputs import read_record

    record = read_record(folder)
    _check_patch_record(record, folder)
    family = _family(record, folder)
    _check_feed_forward_only(record, folder)
    tensors = {
        encoder: safetensors_file.read_tensors(encoder_folder(folder, family, encoder) / WEIGHTS_NAME, {name: name for name in names})
        for encoder, names in record["trained_tensors"].items() if names
    }
    return Patch(folder, ERASE_OUTPUT, record, family, tensors)


def _read_exported(path: Path) -> Patch:
    header = safetensors_file.read_header(path)
    record = record_in(header, path)
    if record is None:
        raise BadInput(f"{path} carries no fewshot-erase record; pass an `erase` output folder or a file `fewshot-erase export` wrote")
    _check_patch_record(record, path)
    kind = record["export"]["format"] if is_exported_patch(record) else None
    if kind not in EXPORT_READERS:
        raise BadInput(f"{path} is a model patched by fewshot-erase, not a patch; pass the `erase` output folder or a file `export` wrote")
    family = _family(record, path)
    tensors = safetensors_file.read_tensors(path, {name: name for name in safetensors_file.tensor_names(header)})
    return Patch(path, kind, record, family, EXPORT_READERS[kind](tensors, record, family))


