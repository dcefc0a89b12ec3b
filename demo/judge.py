"""The judge: a scikit-learn SVC trained on the HELD-OUT split of load_digits.

``judge(images)`` accepts PIL images or float arrays in [0, 1] (any size, grey or RGB)
and downsamples everything to 8x8 the same way (grey -> area average), scaled 0..16
like load_digits.
"""
from __future__ import annotations

import functools

import numpy as np

try:  # package-relative or script use
    from . import data
except ImportError:  # pragma: no cover
    import data  # type: ignore


def to_8x8(images) -> np.ndarray:
    """List/array of images -> [N, 64] features in load_digits' 0..16 scale."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
        else:
            a = np.asarray(im, dtype=np.float64)
            if hasattr(im, "detach"):
                a = im.detach().cpu().numpy().astype(np.float64)
            if a.ndim == 3:  # HWC or CHW
                a = a.mean(axis=-1) if a.shape[-1] in (1, 3, 4) else a.mean(axis=0)
        a = np.clip(a, 0.0, 1.0)
        h, w = a.shape
        if (h, w) != (8, 8):
            if h % 8 == 0 and w % 8 == 0:
                a = a.reshape(8, h // 8, 8, w // 8).mean(axis=(1, 3))
            else:
                a = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((8, 8), Image.BOX),
                               dtype=np.float64) / 255.0
        out.append(a.reshape(64) * 16.0)
    return np.stack(out)


def _fit(x, y):
    from sklearn.svm import SVC

    clf = SVC(C=10.0, gamma=0.001)
    clf.fit(x.reshape(len(x), 64), y)
    return clf


@functools.lru_cache(maxsize=1)
def load_judge():
    """SVC trained on the whole held-out split (deterministic, well under a second)."""
    x, y, _ = data.heldout_split()
    return _fit(x, y)


def judge(images) -> np.ndarray:
    return load_judge().predict(to_8x8(images))


def self_check(seed: int = 0):
    """Accuracy of the judge recipe on a stratified 70/30 split of the held-out data itself."""
    from sklearn.model_selection import train_test_split

    x, y, _ = data.heldout_split()
    a, b, ya, yb = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    clf = _fit(a, ya)
    acc_inner = float((clf.predict(b.reshape(len(b), 64)) == yb).mean())
    # also: judge (trained on all held-out) on the generator's TRAINING split, for reference
    xt, yt, _ = data.train_split()
    acc_train_split = float((judge(xt / 16.0) == yt).mean())
    return {"heldout_internal_split_acc": acc_inner, "n_fit": len(a), "n_test": len(b),
            "acc_on_generator_training_split": acc_train_split}


if __name__ == "__main__":
    import json, time

    t = time.time(); load_judge(); print("fit seconds", round(time.time() - t, 3))
    print(json.dumps(self_check(), indent=1))
