"""Bad input, faults and hostile files: every case ends in one line on stderr that names the problem
and the fix, with exit code 2 for bad input and 1 for a failure while running (130 when interrupted); no output,
partial folder or temporary file is left behind, and every input file is byte-identical afterwards. The inputs the
README says are converted (CMYK, 16-bit, palette with transparency, animated files, long concepts, --overwrite)
are checked to be handled correctly instead.

Each case is a small function that lays out its inputs and returns a `Case`; one parametrised test runs it through
the CLI (in-process), the Python API, or a real process where only a process shows it (signals)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_pictures
from fewshot_erase import erase
from fewshot_erase.errors import EraseError, EraseWarning, in_python_terms
from fewshot_erase.images import load_image
from fewshot_erase.apply import apply
from helpers import run_cli

PROGRESS_LINE = re.compile(r"^[^\w\s]?\s*(reading images|loading model|encoding images|erasing|measuring the effect|saving)\b")
RUN = {"steps": 2}  # cases that get as far as training keep it short
FAST = {"steps": 1}


@dataclass
class Case:
    arguments: list  # the command's arguments before -o: CONCEPT IMAGE_OR_DIR... (erase), PATCH CHECKPOINT (apply)
    options: dict = field(default_factory=dict)  # API keywords; the CLI gets them as --options
    exit_code: int = 2
    message: str = ""  # a phrase the one error line must contain
    output: Path | None = None  # default: the workspace's outputs/out
    accepted: Callable[[Path, list[str]], None] | None = None  # an accepted input: checks the output and warnings
    after: Callable[[], None] | None = None  # extra checks once the run is over (a marker that must not exist)
    interrupt_on: str | None = None  # process runs: send SIGINT once this text is on stderr
    interrupts: int = 1  # ... this many times, a moment apart (a user pressing Ctrl-C again)
    wrapper: str | None = None  # process runs: Python code to run instead of `-m fewshot_erase`
    command: str = "erase"


class Workspace:
    """A case's inputs live in `inputs` (hashed before and after); its output goes in `outputs`, which must hold
    nothing new afterwards; temporary files go to `tmp`, which must be empty afterwards."""

    def __init__(self, root: Path, tiny_model, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        self.inputs, self.outputs, self.tmp = root / "inputs", root / "outputs", root / "tmp"
        for folder in (self.inputs, self.outputs, self.tmp):
            folder.mkdir()
        self.output = self.outputs / "out"
        self._tiny_model = tiny_model
        self.used_model = None
        self.cleanups: list[Callable[[], None]] = []

    @property
    def tiny(self):
        """The tiny SD 1.x pipeline fixture; a case that uses it has its files hashed too."""
        self.used_model = self._tiny_model("sd1")
        return self.used_model

    def model(self, **options) -> dict:
        return {"model": str(self.tiny.folder), **options}

    def pictures(self, name: str = "pictures", count: int = 2) -> Path:
        return write_pictures(self.inputs / name, count=count)

    def file(self, name: str, data: bytes) -> Path:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def image(self, name: str, image: Image.Image, **save) -> Path:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save)
        return path

    def pipeline_copy(self, name: str = "pipeline") -> Path:
        return Path(shutil.copytree(self.tiny.folder, self.inputs / name))

    def hashed_roots(self) -> list[Path]:
        model = self.used_model
        return [self.inputs] + ([model.folder, model.single_file, model.config_dir] if model else [])


CASES: list[tuple[Callable, tuple[str, ...]]] = []


def case(*interfaces: str):
    def register(function):
        CASES.append((function, interfaces))
        return function
    return register


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# ---------------------------------------------------------------------------------------------------------- images

@case("cli", "api")
def image_path_missing(ws):
    return Case(["tiny robot", ws.inputs / "no-such-picture.png"], ws.model(), message="does not exist")


@case("cli", "api")
def image_folder_without_images(ws):
    ws.file("notes/readme.txt", b"pictures go here")
    return Case(["tiny robot", ws.inputs / "notes"], ws.model(), message="holds no images")


@case("cli", "api")
def no_images_at_all(ws):
    return Case(["tiny robot"], ws.model(), message="has no images")


@case("cli", "api")
def concept_empty(ws):
    return Case(["  ", ws.pictures()], ws.model(), message="concept is empty")


@case("cli", "api")
def image_zero_bytes(ws):
    return Case(["tiny robot", ws.pictures(), ws.file("empty.png", b"")], ws.model(), message="empty file")


@case("cli", "api")
def image_truncated_png(ws):
    data = encoded(noise())
    return Case(["tiny robot", ws.file("cut.png", data[: len(data) // 2])], ws.model(), message="damaged or truncated")


@case("cli", "api")
def image_truncated_jpeg(ws):
    data = encoded(noise(), "JPEG")
    return Case(["tiny robot", ws.file("cut.jpg", data[: len(data) // 2])], ws.model(), message="damaged or truncated")


@case("cli", "api")
def image_text_named_png(ws):
    return Case(["tiny robot", ws.file("notes.png", b"not a picture at all\n" * 10)], ws.model(),
                message="not an image Pillow can read")


@case("cli", "api")
def image_one_pixel(ws):
    return Case(["tiny robot", ws.image("dot.png", Image.new("RGB", (1, 1)))], ws.model(), message="too small to learn from")


@case("cli", "api")
def image_decompression_bomb(ws):
    """A few hundred bytes that claim 30000 x 30000 pixels, ten times Pillow's limit: refused before decoding."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
    return Case(["tiny robot", ws.file("bomb.png", data)], ws.model(), message="too large to decode safely")


@case("cli", "api")
def image_symlink_loop_in_folder(ws):
    folder = ws.pictures()
    (folder / "again").symlink_to(".")  # a folder loop: never followed, folders are not recursed
    (folder / "loop.png").symlink_to("loop.png")
    return Case(["tiny robot", folder], ws.model(), message="symbolic link loop")


@case("cli", "api")
def image_broken_symlink(ws):
    (ws.inputs / "gone.png").symlink_to(ws.inputs / "deleted.png")
    return Case(["tiny robot", ws.inputs / "gone.png"], ws.model(), message="broken symbolic link")


@case("cli", "api")
def image_unreadable(ws):
    path = ws.image("locked.png", noise())
    path.chmod(0)
    ws.cleanups.append(lambda: path.chmod(0o644))
    if os.geteuid() == 0:  # permission bits do not stop root: make the read fail as it does for anyone else
        real_read = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_read(self)
        ws.monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return Case(["tiny robot", path], ws.model(), message="cannot read image")


def converted(path: Path, expected: tuple[int, int, int], warning: str | None = None):
    """An accepted picture: the erase finished, recorded the picture, and the pixels became the expected RGB."""
    def check(output: Path, warned: list[str]):
        record = json.loads((output / "erase.json").read_text())
        assert [item["name"] for item in record["images"]] == [path.name]
        assert (output / "model.safetensors").is_file()
        assert [w for w in warned if warning in w] if warning else not warned, warned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EraseWarning)  # the run's own warning is the one that counts
            pixel = load_image(path).image.getpixel((2, 2))
        assert max(abs(a - b) for a, b in zip(pixel, expected)) <= 2, pixel
    return check


@case("cli")
def image_cmyk_converted(ws):
    path = ws.image("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), quality=100)
    return Case(["tiny robot", path], ws.model(**FAST), exit_code=0, accepted=converted(path, (255, 0, 0)))


@case("cli")
def image_16_bit_converted(ws):
    path = ws.image("deep.png", Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)))
    assert Image.open(path).mode in ("I", "I;16")  # Pillow 10.1 reads a 16-bit PNG as 32-bit "I", 13.0 as "I;16"
    return Case(["tiny robot", path], ws.model(**FAST), exit_code=0, accepted=converted(path, (156, 156, 156)))


@case("cli")
def image_palette_with_transparency_converted(ws):
    """Index 0 is transparent and becomes white; the other half of the picture is opaque blue."""
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (20, 0, 40, 40))
    path = ws.image("palette.png", image, transparency=0)
    check = converted(path, (255, 255, 255))

    def both_halves(output, warned):
        check(output, warned)
        assert load_image(path).image.getpixel((30, 2)) == (0, 0, 255)
    return Case(["tiny robot", path], ws.model(**FAST), exit_code=0, accepted=both_halves)


@case("cli", "api")
def image_animated_gif_first_frame(ws):
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = ws.inputs / "moving.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return Case(["tiny robot", path], ws.model(**FAST), exit_code=0,
                accepted=converted(path, (255, 0, 0), warning="animated (3 frames); only the first frame is used"))


# ---------------------------------------------------------------------------------------------------------- models

@case("cli", "api")
def model_path_unknown(ws):
    return Case(["tiny robot", ws.pictures()], {"model": str(ws.inputs / "models" / "sd15")}, message="does not exist")


@case("cli", "api")
def model_hub_id_offline_not_cached(ws):
    """The tests run with HF_HUB_OFFLINE=1 (conftest); the id is in no cache."""
    return Case(["tiny robot", ws.pictures()], {"model": "fewshot-erase-tests/never-downloaded"},
                message="not in the local Hugging Face cache")


@case("cli", "api")
def model_folder_not_a_pipeline(ws):
    ws.file("checkpoints/notes.txt", b"weights elsewhere")
    return Case(["tiny robot", ws.pictures()], {"model": str(ws.inputs / "checkpoints")}, message="not a diffusers pipeline folder")


@case("cli", "api")
def model_pipeline_without_text_encoder(ws):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": [None, None]}
    ws.file("no-text-encoder/model_index.json", json.dumps(index).encode())
    return Case(["tiny robot", ws.pictures()], {"model": str(ws.inputs / "no-text-encoder")}, message="has no text_encoder")


@case("cli", "api")
def model_family_unsupported(ws):
    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    ws.file("pixart/model_index.json", json.dumps(index).encode())
    return Case(["tiny robot", ws.pictures()], {"model": str(ws.inputs / "pixart")}, message="which fewshot-erase does not support")


@case("cli", "api")
def model_single_file_without_unet(ws):
    """A LoRA or a bare text encoder saved as .safetensors is not a checkpoint to erase from."""
    from safetensors.torch import save_file

    path = ws.inputs / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 2)}, str(path))
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="holds no Stable Diffusion UNet")


@case("cli", "api")
def model_safetensors_header_not_json(ws):
    path = ws.file("bad.safetensors", struct.pack("<Q", 16) + b"{this is not js}" + b"\0" * 64)
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="malformed safetensors header")


@case("cli", "api")
def model_safetensors_header_oversized(ws):
    """The header says it is 1 TiB long: refused from the first 8 bytes, nothing allocated."""
    path = ws.file("huge.safetensors", struct.pack("<Q", 2**40) + b'{"a":' + b"\0" * 64)
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="malformed safetensors header")


@case("cli", "api")
def model_safetensors_truncated(ws):
    data = ws.tiny.single_file.read_bytes()
    path = ws.file("cut.safetensors", data[: len(data) * 2 // 3])
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="is truncated")


@case("cli")
def model_tensor_shapes_do_not_match_the_family(ws):
    """The tiny SD 1.x file read with the packaged full-size SD 1.5 configs (no --config)."""
    return Case(["tiny robot", ws.pictures()], {"model": str(ws.tiny.single_file)}, message="tensor shapes do not match")


@case("cli")
def model_pipeline_weights_truncated(ws):
    folder = ws.pipeline_copy()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return Case(["tiny robot", ws.pictures()], {"model": str(folder)}, message="is truncated")


class RunsCode:
    """Unpickling this writes the marker file: what a hostile checkpoint would do, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def hostile_checkpoint(ws, name: str, legacy: bool = False) -> tuple[Path, Path]:
    marker = ws.root / "MARKER-code-ran"
    path = ws.inputs / name
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "payload": RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path, marker


def test_the_hostile_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """The control for the pickle cases: loaded the unsafe way, the checkpoint does write its marker."""
    ws = Workspace(tmp_path, tiny_model=None, monkeypatch=None)
    path, marker = hostile_checkpoint(ws, "model.ckpt")
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def marker_absent(marker: Path):
    def check():
        assert not marker.exists(), "the checkpoint's code ran"
    return check


@case("cli", "api")
def model_pickle_without_allow_pickle(ws):
    path, marker = hostile_checkpoint(ws, "model.ckpt")
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="pass --allow-pickle", after=marker_absent(marker))


@case("cli", "api")
def model_pickle_that_runs_code_with_allow_pickle(ws):
    path, marker = hostile_checkpoint(ws, "model.ckpt")
    return Case(["tiny robot", ws.pictures()], {"model": str(path), "allow_pickle": True},
                message="it was not loaded", after=marker_absent(marker))


@case("cli")
def model_legacy_pickle_that_runs_code_with_allow_pickle(ws):
    path, marker = hostile_checkpoint(ws, "model.pt", legacy=True)
    return Case(["tiny robot", ws.pictures()], {"model": str(path), "allow_pickle": True},
                message="it was not loaded", after=marker_absent(marker))


@case("cli")
def model_pickle_renamed_safetensors(ws):
    path, marker = hostile_checkpoint(ws, "model.safetensors")
    return Case(["tiny robot", ws.pictures()], {"model": str(path)}, message="malformed safetensors header",
                after=marker_absent(marker))


# --------------------------------------------------------------------------------------------------------- outputs

def existing_output(ws) -> Path:
    (ws.output / "text_encoder").mkdir(parents=True)
    (ws.output / "erase.json").write_text('{"from": "an earlier run"}\n')
    (ws.output / "text_encoder" / "model.safetensors").write_bytes(b"earlier weights")
    return ws.output


@case("cli", "api")
def output_exists(ws):
    existing_output(ws)
    return Case(["tiny robot", ws.pictures()], ws.model(), message="already exists")


@case("cli")
def output_exists_with_overwrite_is_replaced(ws):
    existing_output(ws)

    def replaced(output, warned):
        assert sorted(p.name for p in output.iterdir()) == ["config.json", "erase.json", "model.safetensors"]
        assert json.loads((output / "erase.json").read_text())["concept"] == "tiny robot"
        assert not warned
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True, **FAST), exit_code=0, accepted=replaced)


@case("cli", "api")
def output_cannot_be_moved_aside_to_be_replaced(ws):
    """The old output stays as it was, and the hidden folder it was to be moved into goes."""
    existing_output(ws)
    moved = os.replace

    def busy(source, destination):
        if Path(source) == ws.output:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return moved(source, destination)
    ws.monkeypatch.setattr(os, "replace", busy)
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True, **FAST), exit_code=1, message="resource busy",
                after=lambda: _still_the_earlier_output(ws.output))


def _still_the_earlier_output(output: Path) -> None:
    assert (output / "erase.json").read_text() == '{"from": "an earlier run"}\n'
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]


@case("cli", "api")
def output_inside_an_input_folder(ws):
    folder = ws.pictures()
    return Case(["tiny robot", folder], ws.model(), output=folder / "erased", message="inside the input folder")


@case("cli", "api")
def output_is_the_model(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True), output=ws.tiny.folder, message="same path as the input")


@case("cli", "api")
def output_contains_an_input_with_overwrite(ws):
    """--overwrite would replace the folder that holds the pictures, deleting them."""
    ws.pictures()
    return Case(["tiny robot", ws.inputs / "pictures"], ws.model(overwrite=True), output=ws.inputs,
                message="which replacing it would delete")


@case("cli", "api")
def overwrite_of_a_folder_of_the_users_own(ws):
    """--overwrite replaces an earlier output, never a folder of other files."""
    ws.file("documents/letter.txt", b"keep me\n")
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True), output=ws.inputs / "documents",
                message="is a folder of other files")


@case("cli", "api")
def overwrite_of_the_current_folder(ws):
    folder = ws.inputs / "here"
    folder.mkdir()
    ws.monkeypatch.chdir(folder)
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True), output=folder, message="is the current folder")


@case("cli", "api")
def output_names_a_file(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(), output=ws.outputs / "erased.safetensors",
                message="names a .safetensors file, but an erase writes a folder")


@case("cli", "api")
def output_parent_missing(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(), output=ws.outputs / "not" / "here", message="does not exist; create it first")


@case("cli", "api")
def output_read_only_location(ws):
    if os.geteuid() == 0:  # permission bits do not bind root; sysfs refuses new entries to everyone
        return Case(["tiny robot", ws.pictures()], ws.model(), output=Path("/sys/fewshot-erase-out"), message="cannot write to /sys")
    ws.outputs.chmod(0o555)
    ws.cleanups.append(lambda: ws.outputs.chmod(0o755))
    return Case(["tiny robot", ws.pictures()], ws.model(), message="cannot write to")


@case("cli", "api")
def output_disk_fills_up_while_saving(ws):
    """The first weights file gets half written, then the disk is full."""
    from fewshot_erase import safetensors_file

    def half_then_full(path, tensors, metadata):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    ws.monkeypatch.setattr(safetensors_file, "write", half_then_full)
    return Case(["tiny robot", ws.pictures()], ws.model(**RUN), exit_code=1, message="the disk is full")


# -------------------------------------------------------------------------------------------------------- run time

@case("cli", "api")
def loss_becomes_nan(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(steps=3, lr=1e30), exit_code=1, message="lower --lr")


@case("cli", "api")
def weights_blow_up_at_the_last_step(ws):
    """No loss reads the last step's update: what it made of the encoder is checked before anything is written."""
    return Case(["tiny robot", ws.pictures()], ws.model(steps=1, lr=1e30), exit_code=1, message="lower --lr")


@case("cli", "api")
def lr_infinite(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(lr=float("inf")), message="--lr must be a finite positive number")


@case("cli", "api")
def preserve_weight_infinite(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(preserve_weight=float("inf")),
                message="--preserve-weight must be a finite number")


@case("cli", "api")
def anchor_empty(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(anchor=" "), message="the anchor is empty")


@case("cli")
def concept_to_preserve_empty(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(preserve=" "), message="the concept to preserve is empty")


@case("cli", "api")
def seed_too_large_for_torch(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(seed=2**70), message="--seed must be between 0 and 2**63 - 1")


@case("cli")
def pictures_given_twice(ws):
    folder = ws.pictures()
    def used_once(output, warned):
        assert len(json.loads((output / "erase.json").read_text())["images"]) == 2
        assert len(warned) == 1 and "2 pictures were given more than once" in warned[0]
    return Case(["tiny robot", folder, folder / sorted(p.name for p in folder.iterdir())[0], folder], ws.model(**FAST),
                exit_code=0, accepted=used_once)


@case("cli", "api")
def steps_and_epochs_both(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(steps=5, epochs=2), message="both set the run's length; give one")


@case("cli", "api")
def resolution_the_pipeline_would_not_generate_at(ws):
    """The tiny pipelines' VAE halves the size once: an odd --resolution is no size they draw at."""
    return Case(["tiny robot", ws.pictures()], ws.model(resolution=17), message="--resolution must be a multiple of 2 for this model")


@case("cli", "api")
def resolution_larger_than_the_pictures_can_fill(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(resolution=100000), message="or a lower --resolution")


@case("cli", "api")
def a_picture_copied_under_another_name(ws):
    """The same bytes twice would weigh that picture double, as a path given twice would."""
    folder = ws.pictures()
    first = sorted(folder.iterdir())[0]
    (folder / f"copy of {first.name}").write_bytes(first.read_bytes())
    def used_once(output, warned):
        recorded = json.loads((output / "erase.json").read_text())["images"]
        assert len(recorded) == 2 and len({image["sha256"] for image in recorded}) == 2
        assert len(warned) == 1 and "1 picture is a copy of another under another name" in warned[0]
    return Case(["tiny robot", folder], ws.model(**FAST), exit_code=0, accepted=used_once)


@case("cli")
def concept_longer_than_77_tokens(ws):
    def warned_and_erased(output, warned):
        assert json.loads((output / "erase.json").read_text())["steps"] == 1
        assert len(warned) == 1 and "over CLIP's 77" in warned[0]
    return Case([" ".join(["tiny robot"] * 45), ws.pictures()], ws.model(**FAST), exit_code=0, accepted=warned_and_erased)


@case("cli", "api")
def output_name_longer_than_the_file_system_takes(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(), output=ws.outputs / ("b" * 300), message="choose a shorter")


@case("cli")
def output_name_long_but_valid(ws):
    """Its hidden staging name beside it must fit too."""
    def erased(output, warned):
        assert json.loads((output / "erase.json").read_text())["steps"] == 1
    return Case(["tiny robot", ws.pictures()], ws.model(**FAST), output=ws.outputs / ("c" * 240), exit_code=0,
                accepted=erased)


@case("cli", "api")
def device_unknown(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(device="tpu"), message="unknown --device 'tpu'")


@case("cli", "api")
def device_cuda_without_a_gpu(ws):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    return Case(["tiny robot", ws.pictures()], ws.model(device="cuda"), message="no CUDA GPU is visible")


@case("cli", "api")
def threads_out_of_range(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(threads=0), message="--threads must be at least 1")


@case("cli", "api")
def settings_out_of_range(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(steps=0), message="--steps must be at least 1")


@case("cli", "api")
def cuda_out_of_memory(ws):
    from diffusers import UNet2DConditionModel

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    ws.monkeypatch.setattr(UNet2DConditionModel, "forward", out_of_memory)
    return Case(["tiny robot", ws.pictures()], ws.model(**RUN), exit_code=1, message="ran out of memory even with --low-memory; pass a smaller --batch-size")


SLOW_SAVE = """
import sys, time
from fewshot_erase import safetensors_file
from fewshot_erase.cli import main

def write_then_stall(path, tensors, metadata):
    write(path, tensors, metadata)
    print("test: a weights file is staged, the output is not complete", file=sys.stderr, flush=True)
    for _ in range(6000):  # short naps: a SIGINT the kernel hands to another thread wakes no long sleep of this one
        time.sleep(0.1)

write, safetensors_file.write = safetensors_file.write, write_then_stall
main(prog_name="fewshot-erase")
"""


@case("process")
def interrupted_while_loading(ws):
    # Phases print when they end: "reading images" means loading has begun (importing diffusers alone takes seconds).
    return Case(["tiny robot", ws.pictures()], ws.model(**RUN), exit_code=130, interrupt_on="reading images")


@case("process")
def interrupted_twice_while_erasing(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(steps=5000), exit_code=130, interrupt_on="encoding images",
                interrupts=2)


@case("process")
def interrupted_while_erasing(ws):
    return Case(["tiny robot", ws.pictures()], ws.model(steps=5000), exit_code=130, interrupt_on="encoding images")


@case("process")
def interrupted_while_saving_over_an_existing_output(ws):
    """With --overwrite: the earlier output must survive whole."""
    existing_output(ws)
    return Case(["tiny robot", ws.pictures()], ws.model(overwrite=True, **RUN), exit_code=130,
                interrupt_on="test: a weights file is staged", wrapper=SLOW_SAVE)


# ----------------------------------------------------------------------------------------------------------- apply

@pytest.fixture(scope="module")
def erase_output(tiny_model, tmp_path_factory) -> Path:
    """One erase of the tiny SD 1.x pipeline: the patch the apply cases use (each copies it into its inputs)."""
    output = tmp_path_factory.mktemp("patch") / "erased"
    result = run_cli("erase", "tiny robot", write_pictures(output.parent / "pictures"), "-o", output,
                     "--model", tiny_model("sd1").folder, "--steps", "1", "--lr", "1e-3")
    assert result.exit_code == 0, result.stderr
    return output


def other_base(ws) -> Path:
    """The tiny SD 1.x checkpoint with one feed-forward weight of its text encoder changed: another fine-tune."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ws.tiny.single_file))
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    tensors[key] = tensors[key] + 0.01
    path = ws.inputs / "fine-tune.safetensors"
    save_file(tensors, str(path))
    return path


@case("cli", "api")
def apply_patch_to_another_base(ws):
    patch = Path(shutil.copytree(ws.erase_output, ws.inputs / "patch"))
    return Case([patch, other_base(ws)], {}, command="apply", output=ws.outputs / "patched.safetensors",
                message="is not the base the patch was made from")


@case("cli", "api")
def apply_to_an_erase_output(ws):
    patch = Path(shutil.copytree(ws.erase_output, ws.inputs / "patch"))
    return Case([patch, patch], {}, command="apply", output=ws.outputs / "patched", message="is an erase output, not a model")


@case("cli", "api")
def apply_new_is_the_input(ws):
    patch = Path(shutil.copytree(ws.erase_output, ws.inputs / "patch"))
    checkpoint = Path(shutil.copy(ws.tiny.single_file, ws.inputs / "model.safetensors"))
    return Case([patch, checkpoint], {"overwrite": True}, command="apply", output=checkpoint, message="same path as the input")


# ------------------------------------------------------------------------------------------------------ the checks

def cli_args(case: Case, output: Path) -> list[str]:
    args = [case.command, *map(str, case.arguments), "-o", str(output)]
    for key, value in case.options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def tree_hashes(roots: list[Path]) -> dict[str, str]:
    hashes = {}
    for root in roots:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_symlink() or not path.exists():
                hashes[str(path)] = "link -> " + os.readlink(path) if path.is_symlink() else "missing"
            elif not os.access(path, os.R_OK):
                hashes[str(path)] = "unreadable"
            elif path.is_file():
                with open(path, "rb") as handle:
                    hashes[str(path)] = hashlib.file_digest(handle, "sha256").hexdigest()
            else:
                hashes[str(path)] = "folder"
    return hashes


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def run_cli_case(case: Case, output: Path):
    result = run_cli(*cli_args(case, output))
    return result.exit_code, result.stderr, result.stdout


def run_api_case(case: Case, output: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EraseWarning)
        try:
            if case.command == "erase":
                erase(case.arguments[0], case.arguments[1:], output, **case.options)
            else:
                apply(*case.arguments, output, **case.options)
        except EraseError as error:
            assert "\n" not in str(error)
            return error.exit_code, f"error: {error}\n", ""
    warned = "".join(f"warning: {w.message}\n" for w in caught if issubclass(w.category, EraseWarning))
    return 0, warned, ""


def run_process_case(case: Case, output: Path, ws: Workspace):
    env = {**os.environ, "TMPDIR": str(ws.tmp), "PYTHONUNBUFFERED": "1"}
    program = ["-c", case.wrapper] if case.wrapper else ["-m", "fewshot_erase"]
    # A shell runs background jobs with SIGINT ignored, and Python then leaves it ignored; a user's terminal does not.
    process = subprocess.Popen([sys.executable, *program, *cli_args(case, output)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, process.kill)  # a run that hangs fails the test instead of stalling it
    watchdog.start()
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if case.interrupt_on in line:
                for count in range(case.interrupts):
                    time.sleep(0.005 * count)
                    process.send_signal(signal.SIGINT)
                break
        stdout, rest = process.communicate()
    finally:
        watchdog.cancel()
    return process.returncode, "".join(seen) + rest, stdout


def check_stderr(stderr: str, case: Case, accepted: bool, interface: str) -> list[str]:
    """Only progress lines, warning lines (for accepted inputs) and, for a failure, exactly one error line."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("test: ")]
    warned = [line for line in lines if line.startswith("warning: ")]
    ends = [line for line in lines if line.startswith(("error:", "interrupted:"))]
    others = [line for line in lines if line not in warned + ends and not PROGRESS_LINE.match(line)]
    assert not others, stderr
    if accepted:
        assert not ends, stderr
        return warned
    assert not warned, stderr
    assert len(ends) == 1 and ends[0] == lines[-1], stderr
    line = ends[0]
    if case.exit_code == 130:
        assert line.startswith("interrupted:") and "nothing was written" in line
    else:
        assert line.startswith("error: ") and "unexpected" not in line, line
        expected = in_python_terms(case.message) if interface == "api" else case.message  # the API names keywords
        assert expected in line, f"{expected!r} not in {line!r}"
        assert interface != "api" or "--" not in line, line
        assert ";" in line or " must " in line, f"the line should name the problem, then the fix: {line!r}"
    return warned


CATALOGUE = [pytest.param(function, interface, id=f"{function.__name__}-{interface}")
             for function, interfaces in CASES for interface in interfaces]
PROCESS_CASES = [function for function, interfaces in CASES if "process" in interfaces]


@dataclass
class Prepared:
    """A case laid out, and what its inputs and its output's folder held before the run."""

    ws: Workspace
    case: Case
    output: Path
    roots: list[Path]
    before: dict
    outputs_before: dict
    parent_before: set


def prepare(make_case, ws: Workspace) -> Prepared:
    case = make_case(ws)
    output = case.output or ws.output
    roots = ws.hashed_roots()
    return Prepared(ws, case, output, roots, tree_hashes(roots), tree_hashes([ws.outputs]), listing(output.parent))


def check(prepared: Prepared, code: int, stderr: str, stdout: str, interface: str) -> None:
    case, output, ws = prepared.case, prepared.output, prepared.ws
    assert code == case.exit_code, stderr
    warned = check_stderr(stderr, case, accepted=case.accepted is not None, interface=interface)
    assert tree_hashes(prepared.roots) == prepared.before, "an input changed"
    assert not list(ws.tmp.iterdir()), "a temporary file was left behind"
    if case.accepted:
        assert listing(output.parent) == prepared.parent_before | {output.name}, "staging leftovers beside the output"
        case.accepted(output, [w.removeprefix("warning: ") for w in warned])
    else:
        assert stdout == ""
        assert listing(output.parent) == prepared.parent_before, "something was left beside the output"
        assert tree_hashes([ws.outputs]) == prepared.outputs_before, "the outputs folder changed"
    if case.after:
        case.after()


def two_runs_at_once(folder: Path, model: Path, pictures: Path) -> list[tuple[str, int]]:
    """Two erases with different seeds writing the same output; each run's stderr and exit code."""
    output = folder / "outputs" / "out"
    output.parent.mkdir()
    env = {**os.environ, "TMPDIR": str(folder)}
    runs = [subprocess.Popen([sys.executable, "-m", "fewshot_erase", "erase", "tiny robot", str(pictures), "-o",
                              str(output), "--model", str(model), "--steps", "2", "--seed", str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for seed in (1, 2)]
    return [(run.communicate(timeout=300)[1], run.returncode) for run in runs]


@pytest.fixture(scope="module")
def processes(request, tmp_path_factory, tiny_model, pictures):
    """The selected runs that need real processes start together at the module's first test and go on beside the
    in-process cases: each spends many seconds importing diffusers, which would otherwise add up."""
    selected = {item.callspec.params["make_case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and item.callspec.params["interface"] == "process"}
    with ThreadPoolExecutor(max_workers=len(PROCESS_CASES) + 1) as pool:
        started = {}
        for function in PROCESS_CASES:
            if function in selected:
                prepared = prepare(function, Workspace(tmp_path_factory.mktemp(function.__name__), tiny_model, None))
                started[function.__name__] = (prepared, pool.submit(run_process_case, prepared.case, prepared.output, prepared.ws))
        if any(item.name == "test_two_runs_writing_the_same_output_at_once" for item in request.session.items):
            folder = tmp_path_factory.mktemp("two-runs")
            started["two runs"] = (folder, pool.submit(two_runs_at_once, folder, tiny_model("sd1").folder, pictures))
        yield started


def test_catalogue_is_complete():
    assert len({function for function, _ in CASES}) >= 30


@pytest.mark.parametrize("make_case, interface", CATALOGUE)
def test_bad_input(make_case, interface, tmp_path, tiny_model, monkeypatch, request, processes):
    if interface == "process":
        prepared, run = processes[make_case.__name__]
        check(prepared, *run.result(), interface)
        return
    ws = Workspace(tmp_path, tiny_model, monkeypatch)
    if make_case.__name__.startswith("apply_"):
        ws.erase_output = request.getfixturevalue("erase_output")
    monkeypatch.setattr(tempfile, "tempdir", str(ws.tmp))
    prepared = prepare(make_case, ws)
    try:
        run = run_cli_case if interface == "cli" else run_api_case
        code, stderr, stdout = run(prepared.case, prepared.output)
    finally:
        for cleanup in ws.cleanups:
            cleanup()
    check(prepared, code, stderr, stdout, interface)


def test_two_runs_writing_the_same_output_at_once(processes):
    """One wins whole; the other fails cleanly (exit 1) and leaves nothing; the output is one run's, not a mix."""
    from safetensors import safe_open

    folder, run = processes["two runs"]
    finished = run.result()
    assert sorted(code for _, code in finished) == [0, 1], finished
    loser = next(stderr for stderr, code in finished if code == 1)
    assert [line for line in loser.splitlines() if line.startswith("error:")][-1].count("another run") == 1, loser
    output = folder / "outputs" / "out"
    assert listing(output.parent) == {"out"}
    assert not [p for p in folder.iterdir() if p.name != "outputs"], "a temporary file was left behind"
    record = json.loads((output / "erase.json").read_text())
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        stamped = json.loads(weights.metadata()["fewshot_erase"])
    assert stamped["settings"]["seed"] == record["settings"]["seed"]


@pytest.mark.parametrize("arguments", [["erase"], ["erase", "seven", "sample_images/seven"], ["erase", "--bogus"],
                                       ["apply", "only-one"], ["no-such-command"]])
def test_usage_errors_are_one_line_and_exit_2(arguments):
    result = run_cli(*arguments)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0]


@pytest.mark.parametrize("options, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, zero or more"),
    (["--guidance-scale", "-5"], "--guidance-scale must be a finite number, zero or more"),
])
def test_compare_refuses_generation_settings_out_of_range_before_loading(erased, tmp_path, options, message):
    _, output = erased("sd1")
    result = run_cli("compare", output, "-o", tmp_path / "grid.png", *options)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "grid.png").exists()


def test_compare_refuses_a_grid_not_named_png_and_a_row_too_wide(erased, tmp_path):
    _, output = erased("sd1")
    for grid, options, message in [("grid.jpg", [], "must end in .png"), ("grid.png", ["--images", "0"], "--images must be 1 to 64"),
                                   ("grid.png", ["--images", "100000"], "--images must be 1 to 64")]:
        result = run_cli("compare", output, "-o", tmp_path / grid, *options)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["erase", "export drop-in", "apply to a folder", "compare"])
def test_overwrite_never_turns_a_users_file_into_a_folder_or_a_folder_into_a_file(erased, pictures, tmp_path, command):
    """--overwrite replaces an earlier output of the same kind; a README in the way of an erase, or a folder in the
    way of a grid, is the user's own."""
    tiny, output = erased("sd1")
    if command == "compare":
        mine = tmp_path / "mine.png"
        (mine / "kept").mkdir(parents=True)
        (mine / "kept" / "note.txt").write_text("keep me\n")
    else:
        mine = tmp_path / "README.md"
        mine.write_text("keep me\n")
    arguments = {"erase": ["erase", "tiny robot", pictures, "--model", tiny.folder, "--steps", "1", "-o", mine],
                 "export drop-in": ["export", output, "--format", "drop-in", "-o", mine],
                 "apply to a folder": ["apply", output, tiny.folder, "-o", mine],
                 "compare": ["compare", output, "-o", mine]}[command]
    result = run_cli(*arguments, "--overwrite")
    kind = "is a folder, and this writes a file" if command == "compare" else "is a file, and this writes a folder"
    assert result.exit_code == 2 and kind in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.output
    assert (mine / "kept" / "note.txt").read_text() == "keep me\n" if command == "compare" else mine.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]

