"""Fuzzing the readers that take bytes from anywhere: the image loader, the safetensors header check, the pickle
checkpoint reader, and `apply`'s patch and checkpoint readers. Random bytes, and valid files mutated at the byte and
at the structure level: the only outcomes allowed are a loaded result or the tool's own one-line BadInput, never
another exception.

CI runs a bounded, derandomised pass (about a minute); `python -m benchmarks.fuzz` runs the same properties for
longer with fresh random inputs (it sets FEWSHOT_ERASE_FUZZ_SCALE and FEWSHOT_ERASE_FUZZ_RANDOM)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save

from fewshot_erase import images, safetensors_file
from fewshot_erase.errors import BadInput
from fewshot_erase.model_files import model_files
from fewshot_erase.models import pickle_to_safetensors
from fewshot_erase.patch import read_patch
from fewshot_erase.writers.text_encoder import METADATA_KEY

pytestmark = pytest.mark.slow

SCALE = float(os.environ.get("FEWSHOT_ERASE_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("FEWSHOT_ERASE_FUZZ_RANDOM") == "1"  # the long run explores; CI repeats the same inputs
# Pillow's own 89-megapixel limit would let a mutated header allocate hundreds of MB per example; a lower limit
# takes the same refusal path in milliseconds.
FUZZ_MAX_PIXELS = 4_000_000


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=not RANDOM, database=None,
                    print_blob=RANDOM, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fewshot-erase-fuzz-") as folder:
        yield Path(folder)


def loaded_or_refused(read):
    """The property every reader must keep: it returns, or raises the tool's own one-line BadInput."""
    try:
        result = read()
    except BadInput as error:
        assert str(error) and "\n" not in str(error)
        event("refused")
        return None
    event("loaded")
    return result


# ------------------------------------------------------------------------------------------------------ mutations

@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few byte-level edits: bit flips, cuts, insertions, deletions, extreme 32-bit values."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "delete", "extreme"]))
        if edit == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "cut":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 32))]
        else:
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\0\0\x10\0"]))
    return bytes(data)


JSON_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**65), st.floats(allow_nan=False), st.text(max_size=4))


@st.composite
def mutated_json(draw, value):
    """`value` with one node, anywhere in it, replaced by junk or removed: a record a careless tool rewrote."""
    if isinstance(value, (dict, list)) and value and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        copy = dict(value) if isinstance(value, dict) else list(value)
        if draw(st.integers(0, 4)) == 0:
            del copy[key]
        else:
            copy[key] = draw(mutated_json(value[key]))
        return copy
    return draw(st.one_of(JSON_JUNK, st.lists(JSON_JUNK, max_size=2), st.dictionaries(st.text(max_size=3), JSON_JUNK, max_size=2)))


# ---------------------------------------------------------------------------------------------------------- images

def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    return [
        encoded(rgb, "PNG"),
        encoded(rgb.convert("RGBA"), "PNG"),
        encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=0),
        encoded(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG"),
        encoded(rgb, "JPEG", exif=exif.tobytes()),
        encoded(rgb.convert("CMYK"), "JPEG"),
        encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encoded(rgb, "WEBP"),
    ]


IMAGE_SEEDS = image_seeds()
PNG_SEEDS = IMAGE_SEEDS[:4]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


@st.composite
def mutated_png(draw) -> bytes:
    """Byte edits inside one chunk with its CRC made right again, so that the edit reaches the decoder (a wrong CRC
    is refused up front, which is all byte-level fuzzing of a PNG mostly tests)."""
    chunks = png_chunks(draw(st.sampled_from(PNG_SEEDS)))
    index = draw(st.integers(0, len(chunks) - 1))
    kind, body = chunks[index]
    chunks[index] = (kind, draw(mutated([body])) if body else body)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


@fuzz_settings(1600)
@given(data=st.one_of(st.binary(max_size=512), mutated(IMAGE_SEEDS), mutated_png()))
def test_image_loader(scratch, data):
    path = scratch / "picture.png"
    path.write_bytes(data)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(Image, "MAX_IMAGE_PIXELS", FUZZ_MAX_PIXELS)
        warnings.simplefilter("ignore")
        loaded = loaded_or_refused(lambda: images.load_image(path))
    if loaded:
        assert loaded.image.mode == "RGB" and min(loaded.image.size) >= images.MIN_SIDE


# ---------------------------------------------------------------------------------------------------- safetensors

def checkpoint_tensors() -> dict:
    """A little single-file checkpoint in the SD 1.x layout, with the dtypes and shapes real files carry."""
    prefix = "cond_stage_model.transformer.text_model.encoder.layers."
    tensors = {f"{prefix}{layer}.mlp.{module}.{kind}": torch.ones(4, 4) if kind == "weight" else torch.zeros(4)
               for layer in range(2) for module in ("fc1", "fc2") for kind in ("weight", "bias")}
    tensors.update({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 3, dtype=torch.float16),
                    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)[None],
                    "empty": torch.zeros(0)})
    return tensors


SAFETENSORS_SEEDS = [save(checkpoint_tensors(), metadata={"format": "pt"})]


@st.composite
def edited_checkpoint(draw) -> bytes:
    """The seed checkpoint with tensors dropped, renamed or reshaped, written properly, so that the edit reaches
    what reads the names (family and layout detection) rather than the header check."""
    tensors = checkpoint_tensors()
    for name in draw(st.lists(st.sampled_from(sorted(tensors)), min_size=1, max_size=4, unique=True)):
        edit = draw(st.sampled_from(["drop", "rename", "reshape"]))
        tensor = tensors.pop(name)
        if edit == "rename":
            parts = name.split(".")
            parts[draw(st.integers(0, len(parts) - 1))] = draw(st.text(max_size=5))
            tensors[".".join(parts)] = tensor
        elif edit == "reshape":
            tensors[name] = torch.ones(draw(st.lists(st.integers(0, 5), max_size=3)))
    return save(tensors)
DTYPES = sorted(safetensors_file.DTYPE_BYTES) + ["F4", "C64", "F8_E8M0", "", "f32"]


@st.composite
def built_safetensors(draw) -> bytes:
    """A well-formed file built from parts (names, dtypes, shapes, metadata), then, most of the time, one fault a
    buggy or hostile writer makes: a junk value in the header, offsets shifted, data cut or padded, a lying length."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"), max_size=4, unique=True))
    header, position = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(safetensors_file.DTYPE_BYTES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = int(np.prod(shape)) * safetensors_file.DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    data = draw(st.binary(min_size=position, max_size=position))
    fault = draw(st.sampled_from(["none", "junk", "offsets", "data", "length"]))
    if fault == "junk" and names:
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(sorted(entry)))
        junk = st.one_of(JSON_JUNK, st.sampled_from(DTYPES), st.lists(JSON_JUNK, max_size=3))
        if isinstance(entry[field], list) and entry[field] and draw(st.booleans()):
            entry[field][draw(st.integers(0, len(entry[field]) - 1))] = draw(junk)
        else:
            entry[field] = draw(junk)
    elif fault == "offsets" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["data_offsets"] = [max(0, n + draw(st.integers(-4, 4))) for n in entry["data_offsets"]]
    elif fault == "data":
        data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + draw(st.binary(min_size=1, max_size=8))
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    length = draw(st.integers(0, 2**64 - 1)) if fault == "length" else len(raw)
    return struct.pack("<Q", length) + raw + data


@fuzz_settings(2000)
@given(data=st.one_of(st.binary(max_size=256), mutated(SAFETENSORS_SEEDS), built_safetensors()))
def test_safetensors_check_accepts_only_what_the_library_loads(scratch, data):
    path = scratch / "model.safetensors"
    path.write_bytes(data)
    header = loaded_or_refused(lambda: safetensors_file.read_header(path))
    if header is not None:
        tensors = load_file(str(path))
        assert sorted(tensors) == sorted(safetensors_file.tensor_names(header))
        assert all(list(tensors[name].shape) == header[name]["shape"] for name in tensors)


@fuzz_settings(400)
@given(data=st.one_of(mutated(SAFETENSORS_SEEDS), edited_checkpoint()))
def test_checkpoint_reader_of_apply(scratch, data):
    """What `apply` reads of a checkpoint: its family and where it keeps the text encoders' feed-forward tensors."""
    path = scratch / "checkpoint.safetensors"
    path.write_bytes(data)
    found = loaded_or_refused(lambda: model_files(path, str(path)))
    if found:
        family, files = found
        assert files and family.encoders


# -------------------------------------------------------------------------------------------------------- pickles

def pickle_seeds() -> list[bytes]:
    state = {"state_dict": {"model.diffusion_model.w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.float16)}}
    seeds = []
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        seeds.append(buffer.getvalue())
    return seeds


@fuzz_settings(450)
@given(data=st.one_of(st.binary(max_size=256), mutated(pickle_seeds())))
def test_pickle_reader(scratch, data):
    """A damaged or hostile pickle is refused; one that loads becomes a safetensors file the library reads."""
    path = scratch / "model.ckpt"
    path.write_bytes(data)
    with tempfile.TemporaryDirectory(dir=scratch) as workdir:
        converted = loaded_or_refused(lambda: pickle_to_safetensors(path, Path(workdir)))
        if converted:
            assert all(isinstance(t, torch.Tensor) for t in load_file(str(converted)).values())


# -------------------------------------------------------------------------------------------------------- patches

FFN = ["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.bias"]
PATCH_TENSORS = {FFN[0]: torch.ones(8, 4), FFN[1]: torch.zeros(8)}
PICTURE = {"name": "robot.png", "sha256": "0" * 64}
ERASE_RECORD = {"format": 1, "concept": "tiny robot", "settings": {"train": "ffn"}, "images": [PICTURE],
                "concepts": [{"concept": "tiny robot", "images": [PICTURE], "templates": ["a photo of a {}"]}],
                "base": {"family": "sd1", "model": "tiny/sd1", "kind": "folder",
                         "text_encoders": {"text_encoder": {"sha256": "0" * 64}}},
                "trained_tensors": {"text_encoder": FFN}, "base_fingerprints": {"text_encoder": {}}}
DELTA_RECORD = {**ERASE_RECORD, "export": {"format": "delta", "dtype": "float16", "tensors": 2}}


def write_delta(path: Path, record) -> Path:
    """A delta patch as `export` writes it, carrying `record`, whatever that is."""
    tensors = {f"text_encoder.{name}": tensor.half() for name, tensor in PATCH_TENSORS.items()}
    safetensors_file.write(path, tensors, {"format": "pt", METADATA_KEY: json.dumps(record)})
    return path


def delta_seed() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_delta(Path(folder) / "delta.safetensors", DELTA_RECORD).read_bytes()


@fuzz_settings(700)
@given(data=st.one_of(mutated([delta_seed()]), mutated_json(DELTA_RECORD)))
def test_patch_reader_on_exported_files(scratch, data):
    path = scratch / "delta.safetensors"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        write_delta(path, data)
    loaded_or_refused(lambda: read_patch(path))


@fuzz_settings(400)
@given(record=mutated_json(ERASE_RECORD), weights=st.one_of(st.none(), mutated(SAFETENSORS_SEEDS)))
def test_patch_reader_on_erase_outputs(scratch, record, weights):
    folder = scratch / "erase-output"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "erase.json").write_text(json.dumps(record))
    safetensors_file.write(folder / "model.safetensors", PATCH_TENSORS, {"format": "pt"})
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    loaded_or_refused(lambda: read_patch(folder))
