"""Reading the user's pictures: find them, check them, convert them to what the VAE expects.

Everything is read and checked before any model is loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import BadInput, EraseWarning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


@dataclass(frozen=True)
class LoadedImage:
    path: Path
    sha256: str
    image: object  # PIL.Image.Image, RGB, as large as the file


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders contribute their image files (sorted, not recursive, so a symlink loop cannot trap us)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not entries:
                raise BadInput(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or point at another folder")
            found.extend(entries)
        elif path.is_file():
            found.append(path)
        elif path.is_symlink():
            raise BadInput(f"image path {path} is a broken symbolic link; point it at a real file")
        else:
            raise BadInput(f"image path {path} does not exist; check the path")
    if not found:
        raise BadInput("no images given; pass image files or folders of images after the concept")
    return found


def min_side(resolution: int) -> int:
    """Smaller pictures carry too little of the concept to learn from; 1/8 of the training size is the floor."""
    return max(8, resolution // 8)


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
        raise BadInput(f"cannot read image {path}: {error.strerror or error}; check its permissions") from None
    if not data:
        raise BadInput(f"image {path} is an empty file; replace it with a real picture")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            frames = getattr(image, "n_frames", 1)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); shrink it first") from None
    except UnidentifiedImageError:
        raise BadInput(f"{path} is not an image Pillow can read; remove it or convert it to PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"image {path} is damaged or truncated ({error}); replace it with a complete file") from None
    if frames > 1:
        warnings.warn(f"{path} is animated ({frames} frames); only the first frame is used", EraseWarning, stacklevel=2)
    return LoadedImage(path=path, sha256=sha256_bytes(data), image=_to_rgb(ImageOps.exif_transpose(image)))


def load_images(paths: Iterable[str | os.PathLike]) -> list[LoadedImage]:
    """Every picture read, decoded and checked; fails on the first bad one, before any model is loaded."""
    return [load_image(path) for path in find_image_files(paths)]


def to_pixels(images: list[LoadedImage], resolution: int, flip: bool):
    """A (N or 2N, 3, H, W) tensor in [-1, 1] of centre squares; with `flip`, the mirrored pictures follow."""
    import numpy as np
    import torch

    for item in images:
        if min(item.image.size) < min_side(resolution):
            raise BadInput(
                f"image {item.path} is {item.image.size[0]}x{item.image.size[1]}, too small to learn from at "
                f"{resolution}px; use pictures at least {min_side(resolution)}px on the short side"
            )
    squares = [np.asarray(center_square(item.image, resolution), dtype=np.float32) for item in images]
    arrays = np.stack(squares) / 127.5 - 1.0
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return pixels
