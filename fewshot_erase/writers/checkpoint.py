"""`apply` to a single-file checkpoint: a copy in which only the patched tensors' bytes differ.

A patched tensor keeps its dtype and shape, so it takes exactly the bytes it replaces: the file is copied as it is
(never loaded whole), then those byte ranges are overwritten one tensor at a time. Every other tensor keeps its bytes
and its offset; the header changes only by the erase record added to the file's metadata.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

from .. import safetensors_file
from ..errors import RunFailure
from ..record import stable_part
from .atomic import staged_file
from .text_encoder import METADATA_KEY

COPY_CHUNK = 64 * 1024 * 1024


def with_patch_record(metadata: dict, patch, differing: list[str]) -> dict:
    """A patched file's metadata: the input's, plus the erase record and how it was applied. A record already
    there (a model patched before) is kept inside the new one."""
    record = {**stable_part(patch.record), "applied": {"patch": patch.kind, "base_matched": not differing}}
    if METADATA_KEY in metadata:
        try:
            record["applied"]["over"] = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:  # another tool's damage is kept as found, not repaired
            record["applied"]["over"] = metadata[METADATA_KEY]
    # transformers 4.x refuses a weights file with metadata but no "format" (it takes no metadata as "pt").
    return {"format": "pt", **metadata, METADATA_KEY: json.dumps(record, sort_keys=True)}


def write_patched_file(source: Path, target: Path, header: dict, metadata: dict,
                       replacements: dict[str, Callable[[], object]]) -> None:
    """Copy `source` (whose checked header is `header`) to `target` with `metadata`, each tensor named in
    `replacements` rewritten with what its function returns."""
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    encoded = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with open(source, "rb") as reader, open(target, "wb") as writer:
        (length,) = struct.unpack("<Q", reader.read(8))
        reader.seek(8 + length)
        writer.write(struct.pack("<Q", len(encoded)) + encoded)
        data_start = writer.tell()
        shutil.copyfileobj(reader, writer, COPY_CHUNK)
        for key, make in replacements.items():
            begin, end = entries[key]["data_offsets"]
            data = safetensors_file.tensor_bytes(make())
            if len(data) != end - begin:
                raise RunFailure(f"patched tensor {key} came out {len(data)} bytes instead of {end - begin}; nothing was written (a bug: please report it)")
            writer.seek(data_start + begin)
            writer.write(data)


def patched_tensors(patch, file) -> dict[str, Callable[[], object]]:
    """The file's key -> a function computing its patched tensor, for every patched tensor the file holds."""
    def patched(encoder, name):
        return lambda: patch.patched(encoder, name, file.read(encoder, name))

    return {file.keys[encoder][name]: patched(encoder, name)
            for encoder, tensors in patch.tensors.items() for name in tensors if file.holds(encoder, name)}


def write_patched_checkpoint(patch, file, target: Path, differing: list[str], overwrite: bool) -> int:
    """`target`: the single file `file` with `patch` applied; returns how many tensors were patched."""
    replacements = patched_tensors(patch, file)
    metadata = with_patch_record(safetensors_file.metadata(file.header), patch, differing)
    with staged_file(target, overwrite) as staging:
        write_patched_file(file.path, staging, file.header, metadata, replacements)
    return len(replacements)
