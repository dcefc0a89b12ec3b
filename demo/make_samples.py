"""Write sample_images/<word>/*.png from the HELD-OUT split (deterministic).

    python -m demo.make_samples

The first K held-out images of each digit (in load_digits index order), grey on black,
upscaled nearest-neighbour from 8x8 to 64x64.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

try:
    from . import data
except ImportError:  # pragma: no cover
    import data  # type: ignore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "sample_images"))
    ap.add_argument("--per-digit", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    x, y, idx = data.heldout_split()
    chosen = {}
    for d in range(10):
        word = data.DIGIT_WORDS[d]
        folder = os.path.join(args.out, word)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            if f.endswith(".png"):
                os.remove(os.path.join(folder, f))
        sel = np.nonzero(y == d)[0][: args.per_digit]
        chosen[word] = [int(idx[j]) for j in sel]
        for j in sel:
            a = np.round(x[j] / 16.0 * 255).astype(np.uint8)
            im = Image.fromarray(a).resize((args.size, args.size), Image.NEAREST)
            im.save(os.path.join(folder, f"{word}_{int(idx[j]):04d}.png"), optimize=True)
    for w, ids in chosen.items():
        print(w, ids)
    return chosen


if __name__ == "__main__":
    main()
