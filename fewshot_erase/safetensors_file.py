"""Check a .safetensors file's header before anything else trusts it (the format's own promise, enforced here
so a damaged or hostile file gets one clear error instead of a crash deep inside a loader)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import BadInput

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def read_header(path: Path) -> dict:
    """The header's tensor entries and `__metadata__`, each offset checked against the file's real size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BadInput(f"{path} is too short to be a safetensors file (truncated?); re-download or re-export it")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise BadInput(f"{path} has a malformed safetensors header (says {length} bytes); the file is damaged or not safetensors")
            raw = handle.read(length)
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror or error}; check the path and its permissions") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(f"{path} has a malformed safetensors header (not JSON); the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a malformed safetensors header; the file is damaged or not safetensors")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise BadInput(f"{path} has malformed safetensors metadata; the file is damaged")
            continue
        _check_entry(path, name, entry, data_size)
    return header


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        valid = all(isinstance(n, int) and n >= 0 for n in (*shape, start, end)) and end - start == expected
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise BadInput(f"{path}: tensor {name!r} has a malformed header entry; the file is damaged")
    if end > data_size:
        raise BadInput(f"{path} is truncated (tensor {name!r} ends past the end of the file); re-download or re-export it")


def tensor_names(header: dict) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def metadata(header: dict) -> dict:
    return dict(header.get("__metadata__") or {})


TORCH_DTYPES = {  # torch dtype name -> safetensors dtype code
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def write(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on the tensors and metadata given: the library's own writer
    orders metadata keys by hash, so two identical runs would otherwise differ in their header."""
    import torch

    entries, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        data = tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        code = TORCH_DTYPES[str(tensor.dtype).replace("torch.", "")]
        entries[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"__metadata__": dict(sorted(metadata.items())), **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for data in blobs:
            handle.write(data)
