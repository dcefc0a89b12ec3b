"""Reading the user's pictures: find them, check them, convert them to what the VAE expects.

Everything is read and checked before any model is loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import BadInput, EraseWarning, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
MIN_SIDE = 8  # pixels on the short side, whatever the training resolution


@dataclass(frozen=True)
class LoadedImage:
    path: Path
    sha256: str
    image: object  # PIL.Image.Image, RGB, as large as the file


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders contribute their image files (sorted, not recursive, so a symlink loop cannot trap us).
    An image-named entry that is not a readable file (a broken link, a link loop, a pipe) is an error, not skipped:
    a script that meant to pass it should hear about it."""
    if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            try:
                entries = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            except OSError as error:
                raise BadInput(f"cannot list folder {path}: {error.strerror or error}; check its permissions") from None
            if not entries:
                raise BadInput(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or point at another folder")
            found.extend(entries)
        else:
            found.append(path)
    if not found:
        raise BadInput("no images given; pass image files or folders of images after the concept")
    for path in found:
        check_is_file(path)
    first: dict[Path, Path] = {}
    for path in found:
        first.setdefault(path.resolve(), path)
    repeated = sum(count > 1 for count in Counter(path.resolve() for path in found).values())
    if repeated:
        counted = "1 picture was" if repeated == 1 else f"{repeated} pictures were"
        warnings.warn(f"{counted} given more than once (the same file by two paths, or a path repeated); each is "
                      "used once", EraseWarning, stacklevel=2)
    return list(first.values())


def check_is_file(path: Path) -> None:
    """Say precisely why a path is not a picture file; reading a pipe or a device would block or never end."""
    if path.is_file():
        return
    if path.is_symlink():
        try:
            path.stat()
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise BadInput(f"image path {path} is a symbolic link loop; remove it or point it at a real file") from None
        raise BadInput(f"image path {path} is a broken symbolic link; point it at a real file")
    if path.exists():
        raise BadInput(f"image path {path} is not a regular file; pass picture files or folders of them")
    raise BadInput(f"image path {path} does not exist; check the path")


def check_size(path: Path, size: tuple[int, int], resolution: int | None = None) -> None:
    """Smaller pictures carry too little of the concept to learn from: 1/8 of the training size, and never under
    MIN_SIDE. Checked on reading (before any model is loaded) and again once the training resolution is known."""
    floor = max(MIN_SIDE, (resolution or 0) // 8)
    if min(size) < floor:
        at = f" at {resolution}px" if resolution else ""
        lower = f", or a lower --resolution" if resolution and resolution // 8 > MIN_SIDE else ""
        raise BadInput(f"image {path} is {size[0]}x{size[1]}, too small to learn from{at}; use pictures at least "
                       f"{floor}px on the short side{lower}")


def _to_rgb(image):
    """Every mode Pillow reads becomes 8-bit RGB; transparency is laid on white, 16-bit is scaled, not clipped."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * (255.0 if values.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def center_square(image, resolution: int):
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_image(path: Path) -> LoadedImage:
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(f"cannot read image {path}: {error.strerror or error}; check that it exists and that you may read it") from None
    if not data:
        raise BadInput(f"image {path} is an empty file; replace it with a real picture")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            frames = getattr(image, "n_frames", 1)
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); shrink it first") from None
    except UnidentifiedImageError:
        raise BadInput(f"{path} is not an image Pillow can read; remove it or convert it to PNG or JPEG") from None
    except Exception as error:  # Pillow's decoders raise many types on damaged bytes; all mean the same to the user
        raise BadInput(f"image {path} is damaged or truncated ({first_line(error, 120)}); replace it with a complete file") from None
    if frames > 1:
        warnings.warn(f"{path} is animated ({frames} frames); only the first frame is used", EraseWarning, stacklevel=2)
    check_size(path, rgb.size)
    return LoadedImage(path=path, sha256=sha256_bytes(data), image=rgb)


def load_images(paths: Iterable[str | os.PathLike]) -> list[LoadedImage]:
    """Every picture read, decoded and checked; fails on the first bad one, before any model is loaded."""
    return once_each([load_image(path) for path in find_image_files(paths)])


def once_each(loaded: list[LoadedImage]) -> list[LoadedImage]:
    """A picture whose bytes another one has already (a copy under another name) is used once: twice would weigh it
    double."""
    first: dict[str, LoadedImage] = {}
    for item in loaded:
        first.setdefault(item.sha256, item)
    unique = list(first.values())
    copies = len(loaded) - len(unique)
    if copies:
        counted = "1 picture is a copy" if copies == 1 else f"{copies} pictures are copies"
        warnings.warn(f"{counted} of another under another name (the same bytes); each is used once", EraseWarning,
                      stacklevel=3)
    return unique


def to_pixels(images: list[LoadedImage], resolution: int, flip: bool):
    """A (N or 2N, 3, H, W) tensor in [-1, 1] of centre squares; with `flip`, the mirrored pictures follow."""
    import numpy as np
    import torch

    for item in images:
        check_size(item.path, item.image.size, resolution)
    squares = [np.asarray(center_square(item.image, resolution), dtype=np.float32) for item in images]
    arrays = np.stack(squares) / 127.5 - 1.0
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return pixels
