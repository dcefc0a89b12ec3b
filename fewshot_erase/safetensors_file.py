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
    """The header's tensor entries and `__metadata__`, checked as strictly as the safetensors library checks them
    (a file this accepts, the library loads): exact JSON types, offsets that tile the data with no gap or overlap."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BadInput(f"{path} is too short to be a safetensors file (truncated?); re-download or re-export it")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise BadInput(f"{path} has a malformed safetensors header (says {length} bytes); the file is damaged or not safetensors")
            if 8 + length > size:
                raise BadInput(f"{path} is truncated or not safetensors (its header alone claims {length} bytes); re-download or re-export it")
            raw = handle.read(length)
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror or error}; check the path and its permissions") from None
    try:
        # Decoding first: json.loads would accept bytes with a byte-order mark, which the library refuses.
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(f"{path} has a malformed safetensors header (not JSON); the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a malformed safetensors header; the file is damaged or not safetensors")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise BadInput(f"{path} has malformed safetensors metadata; the file is damaged")
            continue
        spans.append((*_checked_span(path, name, entry), name))
    _check_tiling(path, sorted(spans), size - 8 - length)
    return header


def _is_count(value) -> bool:
    """A JSON unsigned 64-bit integer, as the library's parser requires (Python would take True as 1)."""
    return type(value) is int and 0 <= value < 2**64


def _checked_span(path: Path, name: str, entry) -> tuple[int, int]:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid = (isinstance(dtype, str) and isinstance(shape, list) and all(_is_count(n) for n in (*shape, start, end))
                 and start <= end)
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise BadInput(f"{path}: tensor {name!r} has a malformed header entry; the file is damaged")
    if dtype not in DTYPE_BYTES:
        raise BadInput(f"{path}: tensor {name!r} has dtype {str(dtype)[:20]!r}, which fewshot-erase does not read; convert the file to fp32, fp16 or bf16")
    if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise BadInput(f"{path}: tensor {name!r} has a malformed header entry (its size does not match its shape); the file is damaged")
    return start, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must cover the data exactly, in offset order: a gap, an overlap or trailing bytes mean damage."""
    position = 0
    for start, end, name in spans:
        if end > data_size:
            raise BadInput(f"{path} is truncated (tensor {name!r} ends past the end of the file); re-download or re-export it")
        if start != position:
            raise BadInput(f"{path}: tensor {name!r} overlaps another or leaves a gap in the data; the file is damaged")
        position = end
    if position != data_size:
        raise BadInput(f"{path} has extra bytes after its last tensor; the file is damaged or not safetensors")


def tensor_names(header: dict) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def metadata(header: dict) -> dict:
    return dict(header.get("__metadata__") or {})


TORCH_DTYPES = {  # torch dtype name -> safetensors dtype code
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def tensor_bytes(tensor) -> bytes:
    """A tensor's raw bytes as safetensors stores them (little-endian, C order), whatever its dtype."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def write(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on the tensors and metadata given: the library's own writer
    orders metadata keys by hash, so two identical runs would otherwise differ in their header."""
    entries, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        data = tensor_bytes(tensor)
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


def read_tensors(path: Path, wanted: dict[str, str]) -> dict:
    """`wanted` maps the names to return to the file's keys; the header is checked before anything is read."""
    from safetensors import safe_open

    present = set(tensor_names(read_header(path)))
    missing = sorted(set(wanted.values()) - present)
    if missing:
        raise BadInput(f"{path} lacks tensor {missing[0]!r} (and {len(missing) - 1} more); the file is damaged or incomplete, re-create it")
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(key) for name, key in wanted.items()}
